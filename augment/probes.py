"""The heads of the encoder classifier (classifier kind `encoder`, augment/encoders.py holds the backbone and its
feature cache): `head: linear`, a linear probe on the cached frozen features; `head: lora`, the backbone tuned end to
end with peft's LoRA on its linear layers (`lora_rank`) beside a linear head (DataDream's recipe for CLIP), nothing
cached since the features change as it trains. Both train as the CNN does (AdamW, one-cycle schedule, label smoothing
0.05, each example synthetic with probability `synthetic_prob`); the probe on the CPU (a step is a (batch x D) by
(D x K) product: microseconds), the tuned backbone on the run's device."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from augment.base_encoder import choose, layout, uses_base
from augment.classifier import TrainedClassifier, batches, classic_augment, device_of, resize, training_pools
from augment.config import ClassifierConfig
from augment.diffusion import to_tensor, to_uint8
from augment.encoders import backbone_folder, features, forward, image_hashes, load_backbone, precision
from augment.errors import ModelError


@dataclass
class EncoderClassifier(TrainedClassifier):
    """A linear probe on cached frozen features (standardized by the training rows' mean and spread)."""

    cfg: ClassifierConfig | None = None
    mean: np.ndarray | None = None
    std: np.ndarray | None = None
    columns: tuple[int, int] | None = None  # backbone base: the chosen candidate's columns of a feature row

    def _features(self, images: np.ndarray) -> np.ndarray:
        feats = features(self.cfg, resize(images, self.image_size))
        return feats[:, slice(*self.columns)] if self.columns else feats

    def _standard(self, images: np.ndarray) -> torch.Tensor:
        return torch.from_numpy((self._features(images) - self.mean) / self.std)

    def predict_proba(self, images: np.ndarray, batch_size: int = 1024) -> np.ndarray:
        if not len(images):
            return np.zeros((0, self.num_classes), np.float32)
        with torch.no_grad():
            return F.softmax(self.model(self._standard(images)), dim=1).numpy()

    def features(self, images: np.ndarray, batch_size: int = 1024) -> np.ndarray:
        """The backbone's features (the space of filter.memorization_space: features)."""
        return self._features(images) if len(images) else np.zeros((0, self.model.in_features), np.float32)


def train_encoder(cfg: ClassifierConfig, images: np.ndarray, labels: np.ndarray, num_classes: int, seed: int,
                  augment: bool, flip: bool, synthetic: tuple[np.ndarray, np.ndarray] | None,
                  synthetic_prob: float) -> TrainedClassifier:
    """The encoder's head (classifier kind `encoder`), trained as the CNN is (AdamW, one-cycle schedule, label
    smoothing 0.05, each example synthetic with probability `synthetic_prob`)."""
    pools, p_syn = training_pools(images, labels, synthetic, synthetic_prob)
    if cfg.head == "lora":
        return train_lora_head(cfg, pools, p_syn, num_classes, seed, augment, flip)
    views = range(cfg.augment_views + 1) if augment else range(1)
    hashes = [image_hashes(x) for x, _ in pools]
    feats = [np.stack([features(cfg, x, v, flip, h) for v in views]) for (x, _), h in zip(pools, hashes)]  # (V,N,D)
    columns = None
    if uses_base(cfg):  # the candidate (noise level, block) chosen on the real rows, out of fold
        spans = layout(cfg)
        columns = spans[choose(feats[0][0], pools[0][1], spans, num_classes)]
        feats = [f[:, :, slice(*columns)] for f in feats]
    base = np.concatenate([f[0] for f in feats])
    # standardized as scikit-learn's StandardScaler does: a feature constant over the training rows (a dead channel)
    # keeps scale 1, not 1e-6, which would blow up at test time
    mean, std = base.mean(0), base.std(0)
    std[std < 1e-6] = 1.0
    feats = [torch.from_numpy((f - mean) / std) for f in feats]
    targets = [torch.tensor(y, dtype=torch.long) for _, y in pools]
    torch.manual_seed(seed)
    head = nn.Linear(base.shape[1], num_classes)
    drop = nn.Dropout(cfg.dropout)
    opt = torch.optim.AdamW(head.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.learning_rate, total_steps=cfg.steps, pct_start=0.15)
    for rng, picks in batches(cfg, pools, p_syn, seed):
        x = torch.cat([feats[w][torch.from_numpy(rng.integers(0, len(views), len(i))), torch.from_numpy(i)]
                       for w, i in picks])
        y = torch.cat([targets[w][torch.from_numpy(i)] for w, i in picks])
        loss = F.cross_entropy(head(drop(x)), y, label_smoothing=0.05)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step(); sched.step()
    head.eval()
    return EncoderClassifier("encoder", head, num_classes, cfg.image_size, cfg=cfg, mean=mean, std=std,
                             columns=columns)


@dataclass
class TunedEncoderClassifier(TrainedClassifier):
    """The tuned backbone and its head (`model` holds both), with the image processor that feeds it."""

    processor: object = None
    model_type: str = ""

    def _pooled(self, images: np.ndarray, batch_size: int) -> torch.Tensor:
        images = resize(images, self.image_size)
        device = torch.device(self.device)
        self.model.eval()
        with torch.no_grad():
            return torch.cat([forward(self.model["backbone"], self.processor, self.model_type,
                                      images[i:i + batch_size], device, self.mixed_precision)
                              for i in range(0, len(images), batch_size)])

    def predict_proba(self, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
        if not len(images):
            return np.zeros((0, self.num_classes), np.float32)
        with torch.no_grad():
            return F.softmax(self.model["head"](self._pooled(images, batch_size)), dim=1).cpu().numpy()

    def features(self, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
        return self._pooled(images, batch_size).cpu().numpy() if len(images) else \
            np.zeros((0, self.model["head"].in_features), np.float32)


def train_lora_head(cfg: ClassifierConfig, pools: list, p_syn: float, num_classes: int, seed: int, augment: bool,
                    flip: bool) -> TunedEncoderClassifier:
    from peft import LoraConfig, get_peft_model

    device = device_of(cfg)
    mixed = precision(cfg, device)
    torch.manual_seed(seed)
    backbone, processor, model_type = load_backbone(backbone_folder(cfg.backbone), device)
    try:
        backbone = get_peft_model(backbone, LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_rank,
                                                       target_modules="all-linear"))
    except ValueError as e:  # e.g. a ResNet: convolutions only
        raise ModelError(f"classifier backbone {cfg.backbone}: head lora found no layer to tune "
                         f"({str(e).splitlines()[0]}); use head: linear") from None
    with torch.no_grad():
        dim = forward(backbone, processor, model_type, pools[0][0][:1], device, mixed).shape[1]
    model = nn.ModuleDict({"backbone": backbone, "head": nn.Linear(dim, num_classes)}).to(device)
    trainable = [p for p in model.parameters() if p.requires_grad]
    drop = nn.Dropout(cfg.dropout)
    opt = torch.optim.AdamW(trainable, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.learning_rate, total_steps=cfg.steps, pct_start=0.15)
    gen = torch.Generator().manual_seed(seed)
    model.eval()  # LoRA trains; the backbone's own dropout and norm statistics stay as pretrained
    for _, picks in batches(cfg, pools, p_syn, seed):
        x = np.concatenate([pools[w][0][i] for w, i in picks])
        y = torch.from_numpy(np.concatenate([pools[w][1][i] for w, i in picks])).long().to(device)
        if augment:
            x = to_uint8(classic_augment(to_tensor(x), gen, flip))
        logits = model["head"](drop(forward(backbone, processor, model_type, x, device, mixed)))
        loss = F.cross_entropy(logits.float(), y, label_smoothing=0.05)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step(); sched.step()
    model.eval()
    return TunedEncoderClassifier("encoder", model, num_classes, cfg.image_size, mixed, str(device),
                                  processor=processor, model_type=model_type)
