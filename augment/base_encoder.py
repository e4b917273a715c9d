"""The run's own base model as an image encoder (classifier `kind: encoder`, `backbone: base`).

The builtin base is a denoising UNet pretrained on the team's own images (the pool and the labeled images, without
their labels); a denoiser's inner activations are a self-supervised representation (a linear probe on them rivals a
supervised CNN: "Denoising Diffusion Autoencoders are Unified Self-supervised Learners", ICCV 2023). Here an image is
noised at a few small noise levels (`FRACTIONS` of the base's training timesteps, the noise drawn from the image's
own hash), run once through the UNet with the null label, and the output of its middle block and of each decoder
block is average-pooled to a GRID x GRID map: one row of (noise level x block) candidate features per image and view,
cached by content like any encoder's (augment/encoders.py).

Which candidate a head reads is chosen per training set, out of fold, on its real rows (its synthetic ones when
it has none: the synthetic-only diagnostic): the closed-form leave-one-out accuracy of ridge regression on each
candidate's standardized features (`choose`); the same set gives the same choice, whatever the seed. Everything the head sees of the test images is their features.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from augment.config import ClassifierConfig
from augment.diffusion import to_tensor
from augment.errors import ModelError
from augment.parallel import worker_state

BASE = "base"  # the value of `backbone` that names the run's own base
RECIPE = "1"  # part of the cache key: bump it when the features below change
FRACTIONS = (0.01, 0.05, 0.15)  # noise levels, as fractions of the base's training timesteps
GRID = 2  # each block's output averaged to GRID x GRID cells (a digit's layout matters; one cell would lose it)
CHOICE_ROWS = 600  # at most this many real rows (evenly spaced) decide a training set's candidate
_LOADED = worker_state()  # (base path, shape, device) -> (unet, scheduler): per process, per batch of units
_CHOSEN = worker_state()  # digest of a training set's real rows -> chosen candidate


def uses_base(cfg: ClassifierConfig) -> bool:
    return cfg.kind == "encoder" and cfg.backbone == BASE


def base_info(cfg: ClassifierConfig) -> dict:
    """The base this classifier reads (augment.results.BaseModelInfo as JSON), handed down by the stage."""
    if not cfg.base_model:
        raise ModelError("classifier backbone base: the run's base model is not known here (it is handed down by "
                         "the stages after the base stage; run the job, or call the stage functions in order)")
    return cfg.base_model


def cache_key(cfg: ClassifierConfig) -> str:
    """The features' cache folder name: the base's fingerprint (a builtin base's hashes the images and settings it
    was pretrained with) and this recipe."""
    info = base_info(cfg)
    return "base-" + hashlib.sha256(f"{info['fingerprint']}:{info.get('path')}:{RECIPE}".encode()).hexdigest()[:20]


def _unet(info: dict, channels: int, size: int, device: torch.device):
    from augment.backends.pixel_unet import load_base
    from augment.results import BaseModelInfo

    key = (info["path"], info.get("subfolder"), info["fingerprint"], channels, size, str(device))
    if key not in _LOADED:
        _LOADED.clear()
        unet, scheduler = load_base(BaseModelInfo(**info), 1, size, channels)  # rows: [class 0, null]
        unet.requires_grad_(False).eval()
        _LOADED[key] = (unet.to(device), scheduler)
    return _LOADED[key]


def blocks(unet) -> list[torch.nn.Module]:
    """The blocks whose outputs are candidates: the middle block and each decoder block."""
    return [unet.mid_block, *unet.up_blocks]


def layout(cfg: ClassifierConfig) -> list[tuple[int, int]]:
    """The candidates' column ranges in a feature row, (start, stop), noise level by noise level, block by block."""
    from diffusers import UNet2DModel

    info = base_info(cfg)
    # where load_base finds the UNet: the subfolder named, else unet/ when there is one (the builtin base's layout)
    sub = info.get("subfolder") or ("unet" if (Path(info["path"]) / "unet").is_dir() else None)
    return _layout(UNet2DModel.load_config(info["path"], subfolder=sub, revision=info.get("revision")))


def _layout(config) -> list[tuple[int, int]]:
    widths = list(config["block_out_channels"])
    dims = [widths[-1] * GRID * GRID] + [w * GRID * GRID for w in reversed(widths)]
    spans, start = [], 0
    for _ in FRACTIONS:
        for d in dims:
            spans.append((start, start + d))
            start += d
    return spans


def compute(cfg: ClassifierConfig, images: np.ndarray, hashes: list[str], device: torch.device,
            batch_size: int = 64) -> np.ndarray:
    """(N, D) candidate features of uint8 images (every noise level and block, `_layout`'s order)."""
    n, size, _, channels = images.shape
    unet, scheduler = _unet(base_info(cfg), channels, size, device)
    total = scheduler.config.num_train_timesteps
    steps = [max(1, round(f * total)) for f in FRACTIONS]
    outputs: list[torch.Tensor] = []
    hooks = [b.register_forward_hook(lambda m, i, o: outputs.append(
        F.adaptive_avg_pool2d((o[0] if isinstance(o, tuple) else o).float(), GRID).flatten(1))) for b in blocks(unet)]
    rows = []
    try:
        with torch.no_grad():
            for i in range(0, n, batch_size):
                x0 = to_tensor(images[i:i + batch_size], device)
                null = torch.ones(len(x0), dtype=torch.long, device=device)
                feats = []
                for j, t in enumerate(steps):
                    noise = torch.stack([torch.randn(x0.shape[1:], generator=torch.Generator().manual_seed(
                        int(h[:12], 16) * 8 + j)) for h in hashes[i:i + batch_size]]).to(device)
                    tt = torch.full((len(x0),), t, dtype=torch.long, device=device)
                    outputs.clear()
                    unet(scheduler.add_noise(x0, noise, tt), tt, class_labels=null)
                    feats += outputs
                rows.append(torch.cat(feats, dim=1).cpu())
    finally:
        for h in hooks:
            h.remove()
    return torch.cat(rows).numpy() if rows else np.zeros((0, _layout(unet.config)[-1][1]), np.float32)


def choose(feats: np.ndarray, labels: np.ndarray, spans: list[tuple[int, int]], num_classes: int) -> int:
    """The candidate (an index into `spans`) whose standardized features give ridge regression on one-hot labels (an
    unpenalized intercept) the best leave-one-out accuracy (ties: the lowest leave-one-out squared error), the ridge
    strength chosen with it. Closed form: with the centered K = Z Z^T = U S U^T the fit is S_ Y, S_ = U S/(S + lam)
    U^T + 1/n, and a row's leave-one-out prediction is (fit - s Y) / (1 - s), s the diagonal of S_."""
    key = hashlib.sha1(np.ascontiguousarray(feats).tobytes() + np.asarray(labels).tobytes()
                       + repr((spans, num_classes)).encode()).hexdigest()
    if key in _CHOSEN:
        return _CHOSEN[key]
    if len(feats) > CHOICE_ROWS:
        pick = np.linspace(0, len(feats) - 1, CHOICE_ROWS).round().astype(int)
        feats, labels = feats[pick], labels[pick]
    n = len(feats)
    y = np.eye(num_classes)[labels]
    mean = y.mean(0)
    best, best_score = 0, (-1.0, 0.0)
    for c, (a, b) in enumerate(spans):
        z = feats[:, a:b].astype(np.float64)
        sd = z.std(0)
        z = (z - z.mean(0)) / np.where(sd < 1e-6, 1.0, sd)
        s, u = np.linalg.eigh(z @ z.T)
        s = np.clip(s, 0, None)
        uy = u.T @ (y - mean)
        for lam in np.array([1e-2, 1e-1, 1.0, 10.0]) * max(s.mean(), 1e-12):
            shrink = s / (s + lam)
            fit = mean + u @ (shrink[:, None] * uy)
            h = np.minimum((u * u) @ shrink + 1.0 / n, 1 - 1e-9)
            loo = (fit - h[:, None] * y) / (1 - h)[:, None]
            score = (float(np.mean(loo.argmax(1) == labels)), -float(np.mean((loo - y) ** 2)))
            if score > best_score:
                best, best_score = c, score
    _CHOSEN[key] = best
    return best
