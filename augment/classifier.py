"""Image classifiers: the quality judge of the filters and the downstream model of the evaluation.

One recipe, `train_classifier`, for every use: a small CNN (default) or a scikit-learn estimator on pixels,
optionally with classic augmentation (random affine jitter) and with synthetic examples mixed in: each training
example is synthetic with probability `synthetic_prob` (DA-Fusion-style), whatever the sizes of the two sets.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from augment.config import ClassifierConfig
from augment.diffusion import autocast, to_tensor, to_uint8
from augment.diffusion.tensors import bf16_native, resolve_precision


class SmallCNN(nn.Module):
    """conv-BN-ReLU x2 per level, max-pool between levels down to <= 4 px, global average pool, linear head."""

    def __init__(self, channels: int, num_classes: int, image_size: int, width: int = 32, dropout: float = 0.2):
        super().__init__()
        levels = max(2, min(5, int(math.log2(max(image_size, 4) / 4)) + 1))
        layers, c_in = [], channels
        for i in range(levels):
            c_out = width * 2 ** min(i, 2)
            layers += [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True),
                       nn.Conv2d(c_out, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]
            if i < levels - 1:
                layers.append(nn.MaxPool2d(2))
            c_in = c_out
        self.body = nn.Sequential(*layers)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(c_in, num_classes)
        self.feature_dim = c_in

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x).mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.features(x)))


def classic_augment(x: torch.Tensor, gen: torch.Generator, flip: bool = False) -> torch.Tensor:
    """Random affine jitter: rotation +-12 deg, scale 0.9-1.1, shift +-12.5%, optional horizontal flip."""
    n = x.shape[0]
    u = torch.rand(n, 5, generator=gen)
    angle = (u[:, 0] - 0.5) * 2 * math.radians(12)
    scale = 0.9 + 0.2 * u[:, 1]
    tx, ty = (u[:, 2] - 0.5) * 0.25, (u[:, 3] - 0.5) * 0.25
    sx = torch.where(u[:, 4] < 0.5, -1.0, 1.0) if flip else torch.ones(n)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos * sx, -sin, tx], 1), torch.stack([sin * sx, cos, ty], 1)], 1)
    grid = F.affine_grid(theta.to(x), list(x.shape), align_corners=False)
    # Background is -1 (black) in [-1, 1] space: pad with it, not with mid-grey zeros.
    return F.grid_sample(x + 1.0, grid, padding_mode="zeros", align_corners=False) - 1.0


def resize(images: np.ndarray, size: int | None, chunk: int = 256) -> np.ndarray:
    """uint8 (N, H, W, C) images at size x size (area averaging when shrinking); unchanged when size is None."""
    if size is None or images.shape[1:3] == (size, size) or not len(images):
        return images
    out = []
    for i in range(0, len(images), chunk):
        x = torch.from_numpy(np.ascontiguousarray(images[i:i + chunk])).permute(0, 3, 1, 2).float()
        shrink = size < images.shape[1]
        x = F.interpolate(x, size=(size, size), mode="area" if shrink else "bilinear",
                          **({} if shrink else {"align_corners": False}))
        out.append(x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy())
    return np.concatenate(out)


def precision(cfg: ClassifierConfig, image_size: int, device: torch.device = torch.device("cpu")) -> str:
    """The precision a CNN trains and predicts in: `cfg.mixed_precision`, with `auto` resolved by image size on the
    CPU, and bf16 on a GPU that computes it."""
    if cfg.mixed_precision != "auto":
        return cfg.mixed_precision
    if device.type != "cpu":
        return resolve_precision(device, "auto")
    return "bf16" if image_size >= 16 and bf16_native() else "no"


def device_of(cfg: ClassifierConfig) -> torch.device:
    """The run's device, handed down to the classifier section (RunConfig.device)."""
    from augment.backends import resolve_device

    return resolve_device(cfg.device)


def _inputs(images: np.ndarray, device: torch.device) -> torch.Tensor:
    """[-1, 1] float NCHW in channels_last memory order on `device`: oneDNN's fast path for convolutions on the CPU
    (measured: a 16 px training step 36 -> 28 ms in fp32, same numbers up to summation order), and cuDNN's."""
    return to_tensor(images).to(device).contiguous(memory_format=torch.channels_last)


@dataclass
class TrainedClassifier:
    kind: str
    model: object
    num_classes: int
    image_size: int | None = None  # inputs are resized to this (ClassifierConfig.image_size)
    mixed_precision: str = "no"
    device: str = "cpu"  # where the model is and its inputs go

    def predict_proba(self, images: np.ndarray, batch_size: int = 1024) -> np.ndarray:
        images = resize(images, self.image_size)
        if self.kind != "cnn":
            return self.model.predict_proba(_flat(images))
        self.model.eval()
        device = torch.device(self.device)
        with torch.no_grad(), autocast(device, self.mixed_precision):
            out = [F.softmax(self.model(_inputs(images[i:i + batch_size], device)).float(), dim=1).cpu()
                   for i in range(0, len(images), batch_size)]
        return torch.cat(out).numpy() if out else np.zeros((0, self.num_classes), np.float32)

    def features(self, images: np.ndarray, batch_size: int = 1024) -> np.ndarray:
        """Penultimate-layer features (CNN) or pixels (scikit-learn models)."""
        images = resize(images, self.image_size)
        if self.kind != "cnn":
            return _flat(images)
        self.model.eval()
        device = torch.device(self.device)
        with torch.no_grad(), autocast(device, self.mixed_precision):
            out = [self.model.features(_inputs(images[i:i + batch_size], device)).float().cpu()
                   for i in range(0, len(images), batch_size)]
        return torch.cat(out).numpy() if out else np.zeros((0, self.model.feature_dim), np.float32)


def _flat(images: np.ndarray) -> np.ndarray:
    return images.reshape(len(images), -1).astype(np.float32) / 255.0


def train_classifier(
    cfg: ClassifierConfig,
    images: np.ndarray,
    labels: np.ndarray,
    num_classes: int,
    seed: int,
    *,
    augment: bool | None = None,
    flip: bool = False,
    synthetic: tuple[np.ndarray, np.ndarray] | None = None,
    synthetic_prob: float = 0.5,
) -> TrainedClassifier:
    """Train from scratch. `synthetic_prob` = 1 with no real images trains on synthetic data only (CAS)."""
    augment = cfg.augment if augment is None else augment
    images = resize(images, cfg.image_size)
    if synthetic is not None:
        synthetic = (resize(synthetic[0], cfg.image_size), synthetic[1])
    from augment.registry import CLASSIFIERS

    return CLASSIFIERS.load(cfg.kind)(cfg, images, labels, num_classes, seed, augment, flip, synthetic,
                                      synthetic_prob)


def training_pools(images: np.ndarray, labels: np.ndarray, synthetic: tuple[np.ndarray, np.ndarray] | None,
                   synthetic_prob: float) -> tuple[list[tuple[np.ndarray, np.ndarray]], float]:
    """What a training draws from: the real (images, labels) and the synthetic ones, each when there are any, and
    the probability that an example is synthetic (1 with no real images, 0 with no synthetic ones)."""
    pools = [(images, np.asarray(labels))] if len(images) else []
    if synthetic is not None and len(synthetic[0]):
        pools.append((synthetic[0], np.asarray(synthetic[1])))
    if not pools:
        raise ValueError("train_classifier: no training images")
    return pools, synthetic_prob if len(pools) == 2 else (1.0 if not len(images) else 0.0)


def batches(cfg: ClassifierConfig, pools: list, p_syn: float, seed: int):
    """cfg.steps batches of cfg.batch_size rows, each synthetic (the last pool) with probability p_syn: per step
    (rng, [(pool, row indices)]), the real rows first; `rng` is the draws' generator, for a caller's own draws."""
    rng = np.random.default_rng(seed)
    for _ in range(cfg.steps):
        from_syn = rng.random(cfg.batch_size) < p_syn
        picks = []
        for which, count in ((0, int((~from_syn).sum())), (len(pools) - 1, int(from_syn.sum()))):
            if count:
                picks.append((which, rng.integers(0, len(pools[which][1]), count)))
        yield rng, picks


def train_cnn(cfg: ClassifierConfig, images: np.ndarray, labels: np.ndarray, num_classes: int, seed: int,
              augment: bool, flip: bool, synthetic: tuple[np.ndarray, np.ndarray] | None,
              synthetic_prob: float) -> TrainedClassifier:
    """The small CNN (classifier kind `cnn`): AdamW with a one-cycle schedule, label smoothing 0.05, each batch
    example synthetic with probability `synthetic_prob`."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)  # on the CPU whatever the device: the same draws everywhere
    device = device_of(cfg)
    pools, p_syn = training_pools(images, labels, synthetic, synthetic_prob)
    tensors = [(to_tensor(x).to(device), torch.tensor(y, dtype=torch.long).to(device)) for x, y in pools]
    size = tensors[0][0].shape[2]
    mixed = precision(cfg, size, device)
    model = SmallCNN(tensors[0][0].shape[1], num_classes, size, cfg.width, cfg.dropout)
    model = model.to(device, memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.learning_rate, total_steps=cfg.steps, pct_start=0.15)
    model.train()
    for _, picks in batches(cfg, pools, p_syn, seed):
        rows = [(w, torch.from_numpy(i).to(device)) for w, i in picks]
        x, y = torch.cat([tensors[w][0][i] for w, i in rows]), torch.cat([tensors[w][1][i] for w, i in rows])
        if augment:
            x = classic_augment(x, gen, flip)
        with autocast(x.device, mixed):
            logits = model(x.contiguous(memory_format=torch.channels_last))
        loss = F.cross_entropy(logits.float(), y, label_smoothing=0.05)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step(); sched.step()
    model.eval()
    return TrainedClassifier("cnn", model, num_classes, cfg.image_size, mixed, str(device))


def train_sklearn(cfg: ClassifierConfig, images: np.ndarray, labels: np.ndarray, num_classes: int, seed: int,
                  augment: bool, flip: bool, synthetic: tuple[np.ndarray, np.ndarray] | None,
                  synthetic_prob: float) -> TrainedClassifier:
    """A scikit-learn estimator on standardized pixels (classifier kinds `logistic` and `svm`): classic
    augmentation as 8 jittered copies, synthetic rows weighted to carry `synthetic_prob` of the total weight."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import SVC

    xs, ys, ws = [images], [labels], [np.ones(len(labels))]
    if augment and len(images):  # classic augmentation as 8 jittered copies of every real image
        gen = torch.Generator().manual_seed(seed)
        for _ in range(8):
            xs.append(to_uint8(classic_augment(to_tensor(images), gen, flip)))
            ys.append(labels); ws.append(np.ones(len(labels)))
    n_real = sum(len(y) for y in ys)
    if synthetic is not None and len(synthetic[0]):
        n_syn = len(synthetic[1])
        # Weight synthetic rows so that they carry synthetic_prob of the total weight.
        w = synthetic_prob / (1 - synthetic_prob) * n_real / n_syn if synthetic_prob < 1 and n_real else 1.0
        xs.append(synthetic[0]); ys.append(synthetic[1]); ws.append(np.full(n_syn, w))
    X, y, w = _flat(np.concatenate(xs)), np.concatenate(ys), np.concatenate(ws)
    if cfg.kind == "logistic":
        est = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, C=0.1, random_state=seed))
    else:
        est = make_pipeline(StandardScaler(), SVC(probability=True, random_state=seed))
    est.fit(X, y, **{f"{est.steps[-1][0]}__sample_weight": w})
    if len(np.unique(y)) < num_classes:
        return _SklearnFull(est, num_classes, cfg.image_size)
    return TrainedClassifier(cfg.kind, est, num_classes, cfg.image_size)


class _SklearnFull(TrainedClassifier):
    """Pads predict_proba to all K classes when a class was missing from the training data."""

    def __init__(self, est, num_classes, image_size=None):
        super().__init__("sklearn", est, num_classes, image_size)

    def predict_proba(self, images, batch_size=1024):
        p = self.model.predict_proba(_flat(resize(images, self.image_size)))
        out = np.zeros((len(images), self.num_classes))
        out[:, self.model.classes_] = p
        return out
