"""The base model: a pixel-space, class-conditional `diffusers.UNet2DModel`.

`builtin` pretrains a small UNet on the unlabeled pool plus the labeled images without their labels (a
one-row class embedding that only ever sees the null label), once, cached on disk under a key of the data and
the base config. A diffusers checkpoint (local path or hub id) is used as it is. Either way `load_base` gives the
UNet a class embedding with K + 1 rows (the last is the null label for guidance), initialized so that the
conditional model starts out equal to the unconditional one.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers import DDPMScheduler, UNet2DModel

from augment.config import BaseModelConfig
from augment.data import ImageSet
from augment.errors import ModelError  # noqa: F401 (re-exported: augment.models.ModelError)
from augment.run import load_state
from augment.diffusion import EMA, autocast, diffusion_loss, lr_lambda, to_tensor




def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ModelError("device 'cuda' requested but no CUDA GPU is available; use device: auto or cpu")
    return torch.device(name)


@dataclass
class BaseModelInfo:
    path: str  # a folder with unet/ and scheduler/, or the user's checkpoint reference
    subfolder: str | None
    description: str
    fingerprint: str
    pretrain_seconds: float = 0.0
    final_loss: float | None = None


def build_unet(cfg: BaseModelConfig, image_size: int, channels: int, num_class_embeds: int) -> UNet2DModel:
    down = tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in cfg.attention_levels)
    up = tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(cfg.attention_levels))
    if image_size % (2 ** (len(down) - 1)):
        raise ModelError(f"data.image_size={image_size} must be divisible by 2^(levels-1) = {2 ** (len(down) - 1)}")
    return UNet2DModel(
        sample_size=image_size, in_channels=channels, out_channels=channels,
        layers_per_block=cfg.layers_per_block, block_out_channels=tuple(cfg.block_out_channels),
        down_block_types=down, up_block_types=up, norm_num_groups=cfg.norm_num_groups,
        attention_head_dim=8, num_class_embeds=num_class_embeds,
    )


def build_scheduler(cfg: BaseModelConfig) -> DDPMScheduler:
    return DDPMScheduler(num_train_timesteps=cfg.num_train_timesteps, beta_schedule=cfg.beta_schedule,
                         prediction_type=cfg.prediction_type, clip_sample=True)


def _time_embed_dim(unet: UNet2DModel) -> int:
    return unet.time_embedding.linear_2.out_features


def with_class_embedding(unet: UNet2DModel, num_classes: int) -> UNet2DModel:
    """Give the UNet K + 1 class rows (row K = null). A one-row embedding (the builtin base's null row) is copied
    into every row; a checkpoint without one gets zeros, which leave its output unchanged at first."""
    old = getattr(unet, "class_embedding", None)
    if isinstance(old, torch.nn.Embedding) and old.num_embeddings == num_classes + 1:
        return unet
    new = torch.nn.Embedding(num_classes + 1, _time_embed_dim(unet))
    with torch.no_grad():
        if isinstance(old, torch.nn.Embedding) and old.num_embeddings == 1:
            new.weight.copy_(old.weight.expand(num_classes + 1, -1))
        elif old is None:
            new.weight.zero_()
        else:
            raise ModelError(
                f"checkpoint already has a class embedding with {old.num_embeddings} rows; expected 1 or "
                f"{num_classes + 1} (K classes + null)"
            )
    unet.class_embedding = new
    unet.register_to_config(num_class_embeds=num_classes + 1, class_embed_type=None)
    return unet


def load_base(info: BaseModelInfo, num_classes: int, image_size: int, channels: int):
    """Load the base UNet (with K + 1 class rows) and its training scheduler."""
    ref, sub = info.path, info.subfolder
    try:
        unet = UNet2DModel.from_pretrained(ref, subfolder=sub or ("unet" if (Path(ref) / "unet").is_dir() else None))
    except Exception as err:
        raise ModelError(f"cannot load a UNet2DModel from {ref!r} (subfolder={sub!r}): {err}") from None
    c = unet.config
    if c.in_channels != channels or c.sample_size != image_size:
        raise ModelError(
            f"base model {ref!r} works on {c.in_channels}-channel {c.sample_size}px images but data is configured "
            f"as {channels}-channel {image_size}px; set data.channels / data.image_size to match"
        )
    try:
        scheduler = DDPMScheduler.from_pretrained(ref, subfolder="scheduler")
    except Exception:  # many UNet-only checkpoints ship no scheduler: use DDPM defaults
        scheduler = DDPMScheduler(num_train_timesteps=1000)
    return with_class_embedding(unet, num_classes), scheduler


def _pretrain_key(cfg: BaseModelConfig, images: np.ndarray) -> str:
    h = hashlib.sha256(images.tobytes())
    h.update(json.dumps(cfg.model_dump(mode="json", exclude={"cache_dir"}), sort_keys=True).encode())
    return h.hexdigest()[:16]


def prepare_base(cfg: BaseModelConfig, train: ImageSet, pool: ImageSet, device: torch.device,
                 log=print) -> BaseModelInfo:
    """Return the base model to fine-tune: the user's checkpoint, or the builtin base (pretrained once, cached)."""
    if cfg.pretrained != "builtin":
        fp = hashlib.sha256(f"{cfg.pretrained}:{cfg.subfolder}".encode()).hexdigest()[:16]
        return BaseModelInfo(cfg.pretrained, cfg.subfolder, f"checkpoint {cfg.pretrained}", fp)
    images = np.concatenate([pool.images, train.images])  # labels deliberately not used
    # A canonical order: the base depends on the set of images only, so jobs that split the same images into
    # labeled and pool differently (K = 5, 10, 20 shots of one draw) share one cached base.
    images = images[np.lexsort(images.reshape(len(images), -1).T[::-1])]
    key = _pretrain_key(cfg, images)
    out = Path(cfg.cache_dir) / f"base-{key}"
    desc = (f"builtin UNet {cfg.block_out_channels}, pretrained {cfg.pretrain_steps} steps on "
            f"{len(images)} unlabeled images")
    if (out / "base.json").exists():
        meta = json.loads((out / "base.json").read_text())
        log(f"base: reusing cached builtin base {out}")
        return BaseModelInfo(str(out), None, desc, key, meta["pretrain_seconds"], meta["final_loss"])
    log(f"base: pretraining builtin base for {cfg.pretrain_steps} steps on {len(images)} images -> {out}")
    t0 = time.time()
    unet, final_loss = pretrain(cfg, images, device, Path(cfg.cache_dir) / f"base-{key}.partial", log=log)
    seconds = time.time() - t0
    # Publish the cache entry atomically: a killed run never leaves a half-written base that looks finished.
    tmp = Path(cfg.cache_dir) / f"base-{key}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    unet.save_pretrained(tmp / "unet")
    build_scheduler(cfg).save_pretrained(tmp / "scheduler")
    (tmp / "base.json").write_text(json.dumps({
        "description": desc, "config": cfg.model_dump(mode="json"), "num_images": len(images),
        "pretrain_seconds": seconds, "final_loss": final_loss}, indent=2))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    shutil.rmtree(Path(cfg.cache_dir) / f"base-{key}.partial", ignore_errors=True)
    return BaseModelInfo(str(out), None, desc, key, seconds, final_loss)


def pretrain(cfg: BaseModelConfig, images: np.ndarray, device: torch.device, ckpt_dir: Path,
             log=print, checkpoint_every: int = 500) -> tuple[UNet2DModel, float | None]:
    """Unconditional denoising pretraining (every label is the null row 0), with EMA and resumable checkpoints."""
    # 1. Model, optimizer, EMA, schedule.
    torch.manual_seed(cfg.seed)
    unet = build_unet(cfg, images.shape[1], images.shape[3], num_class_embeds=1).to(device)
    scheduler = build_scheduler(cfg)
    opt = torch.optim.AdamW(unet.parameters(), lr=cfg.learning_rate, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg.pretrain_steps, min(200, cfg.pretrain_steps // 10 + 1)))
    ema = EMA(unet.parameters(), cfg.ema_decay) if cfg.ema_decay else None
    gen = torch.Generator().manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    x_all = to_tensor(images, device)
    step, losses = 0, []

    # 2. Resume from the last checkpoint of an interrupted pretraining.
    ckpt = ckpt_dir / "state.pt"
    state = load_state(ckpt, map_location=device, log=log)
    if state is not None:
        unet.load_state_dict(state["unet"]); opt.load_state_dict(state["opt"]); sched.load_state_dict(state["sched"])
        if ema: ema.load_state_dict(state["ema"])
        gen.set_state(state["gen"]); rng.bit_generator.state = state["rng"]; step = state["step"]
        log(f"base: resumed pretraining at step {step}")

    # 3. Train.
    unet.train()
    while step < cfg.pretrain_steps:
        idx = torch.from_numpy(rng.integers(0, len(x_all), cfg.pretrain_batch_size))
        x0 = x_all[idx]
        with autocast(device, cfg.mixed_precision):
            loss = diffusion_loss(unet, scheduler, x0, torch.zeros(len(idx), dtype=torch.long, device=device),
                                  gen, cfg.snr_gamma)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step(); sched.step(); step += 1
        if ema: ema.update()
        losses.append(loss.item())
        if step % checkpoint_every == 0 and step < cfg.pretrain_steps:
            ckpt_dir.mkdir(parents=True, exist_ok=True)
            torch.save({"unet": unet.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
                        "ema": ema.state_dict() if ema else None, "gen": gen.get_state(),
                        "rng": rng.bit_generator.state, "step": step}, ckpt_dir / "state.tmp")
            (ckpt_dir / "state.tmp").replace(ckpt)
            log(f"base: step {step}/{cfg.pretrain_steps} loss {np.mean(losses[-100:]):.4f}")
    if ema:
        ema.copy_to()
    unet.eval()
    return unet.cpu(), (float(np.mean(losses[-100:])) if losses else None)
