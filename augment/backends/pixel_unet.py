"""The pixel backend: a pixel-space, class-conditional `diffusers.UNet2DModel`.

`builtin` pretrains a small UNet on the unlabeled pool plus the labeled images without their labels (a
one-row class embedding that only ever sees the null label), once, cached on disk under a key of the data and
the base config. A diffusers UNet2DModel checkpoint (local path or hub id) is used as it is. Either way `load`
gives the UNet a class embedding with K + 1 rows (the last is the null label for guidance), initialized so that
the conditional model starts out equal to the unconditional one. LoRA (peft) on attention projections and resnet
convolutions, the class embedding trained in full; the adapter is saved in peft's format.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from diffusers import DDPMScheduler, UNet2DModel
from peft import LoraConfig, PeftModel, get_peft_model

from augment.backends import BaseModelInfo
from augment.backends.common import DiffusionBackend, no_lora_target
from augment.config import BaseModelConfig, LoRAConfig
from augment.data import ImageSet
from augment.diffusion import LoopSpec, diffusion_loss, to_tensor, to_uint8, train_loop
from augment.errors import ModelError
from augment.runfolder import AdapterFolder

LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2"]


class PixelBackend(DiffusionBackend):
    kind = "pixel"

    def prepare(self, train: ImageSet, pool: ImageSet, log=print, progress=None) -> BaseModelInfo:
        return prepare_base(self.cfg, train, pool, self.device, log=log, progress=progress)

    def load(self, info: BaseModelInfo, adapter: str | Path | None = None) -> torch.nn.Module:
        """The base UNet, or with `adapter` the fine-tuned one (LoRA merged). An adapter folder carries its own
        copy of the base (`base/`), so a run folder copied to another machine samples without the base cache."""
        if adapter is not None and AdapterFolder(adapter).base_config.is_file():
            info = info.model_copy(update={"path": str(AdapterFolder(adapter).base), "subfolder": None,
                                           "revision": None})
        self.info = info
        unet, self.scheduler = load_base(info, len(self.class_names), self.image_size, self.channels)
        if adapter is None:
            return unet
        return PeftModel.from_pretrained(unet, str(adapter)).merge_and_unload().to(self.device).eval()

    def encode(self, images: np.ndarray) -> torch.Tensor:
        return to_tensor(images, self.device)

    def decode(self, x: torch.Tensor) -> np.ndarray:
        return to_uint8(x)

    def denoise(self, model, x_t, t, labels):
        return model(x_t, t, class_labels=labels).sample

    def add_lora(self, model: torch.nn.Module, cfg: LoRAConfig) -> tuple[torch.nn.Module, list[dict]]:
        try:
            model = get_peft_model(model, LoraConfig(
                r=cfg.rank, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, use_dora=cfg.use_dora,
                target_modules=list(cfg.target_modules or LORA_TARGETS),
                modules_to_save=["class_embedding"] if cfg.train_class_embedding else None, init_lora_weights=True,
            )).to(self.device)
        except ValueError as err:  # peft's NoMatchingPeftModuleError
            raise no_lora_target(cfg, err) from None
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        # The class embedding starts equal to the null row and must move far to condition the model: its own,
        # larger learning rate (the LoRA factors keep theirs).
        emb = [p for n, p in named if "class_embedding" in n]
        rest = [p for n, p in named if "class_embedding" not in n]
        return model, [{"params": rest, "lr": cfg.learning_rate},
                       {"params": emb, "lr": cfg.class_embedding_learning_rate, "weight_decay": 0.0}]

    def save_adapter(self, model: torch.nn.Module, folder: Path, final: Path | None = None) -> Path:
        """The adapter in peft's format, plus what plain diffusers + peft need to use it: `base/`, the base UNet
        with its K + 1 class rows (what the adapter was trained on) and its scheduler, named in
        adapter_config.json, and a model card saying how to load it."""
        folder = Path(folder)
        model.cpu().save_pretrained(folder)
        base, scheduler = load_base(self.info, len(self.class_names), self.image_size, self.channels)
        base.save_pretrained(AdapterFolder(folder).base)
        scheduler.save_pretrained(AdapterFolder(folder).base_scheduler)
        config = json.loads((folder / "adapter_config.json").read_text())
        # absolute: peft and users resolve this name against their working directory, not the adapter's folder
        # (a copied adapter carries its base in base/, as its card says)
        config["base_model_name_or_path"] = str(AdapterFolder(final or folder).base.resolve())
        (folder / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
        (folder / "README.md").write_text(self._adapter_card(model))
        return folder / "adapter_model.safetensors"

    def _adapter_card(self, model: torch.nn.Module) -> str:
        K = len(self.class_names)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        classes = ", ".join(f"{k} = {n}" for k, n in enumerate(self.class_names))
        return f"""---
library_name: peft
tags: [lora, diffusers, augment, synthetic-data]
---
# LoRA adapter for a class-conditional pixel diffusion UNet

Fine-tuned by augment on a small labeled image set ({self.channels}-channel, {self.image_size}x{self.image_size}
pixels) to generate synthetic training images per class. Base: {self.info.name};
a copy of it (with the class embedding the adapter was trained on: rows 0..{K - 1} are the classes, row {K} is
"no class" for classifier-free guidance) is in `base/`. {trainable:,} trainable parameters (LoRA on attention
projections and resnet convolutions, the class embedding in full).

Class labels: {classes}.

```python
from diffusers import UNet2DModel
from peft import PeftModel
base = UNet2DModel.from_pretrained("THIS_FOLDER/base")
unet = PeftModel.from_pretrained(base, "THIS_FOLDER").merge_and_unload()   # a plain UNet2DModel
```
Sample with the scheduler in `base/scheduler` and classifier-free guidance (label {K} = unconditional); images
are in [-1, 1], channels first. `training_config.json` lists the configuration and the ids of every image the
adapter learned from. Intended use: augmenting the training set of a classifier for these classes; it has seen
very few images, so check its samples (augment's report does) before trusting them.
"""

    def export(self, model: torch.nn.Module, folder: Path) -> None:
        model.save_pretrained(Path(folder) / "unet")
        self.scheduler.save_pretrained(Path(folder) / "scheduler")

    def usage(self) -> str:
        K = len(self.class_names)
        return f"""```python
import torch
from diffusers import DDPMScheduler, DPMSolverMultistepScheduler, UNet2DModel
unet = UNet2DModel.from_pretrained("THIS_FOLDER", subfolder="unet")      # class_labels 0..{K - 1}; {K} = no class
sampler = DPMSolverMultistepScheduler.from_config(DDPMScheduler.from_pretrained("THIS_FOLDER", subfolder="scheduler").config,
                                                  algorithm_type="dpmsolver++", solver_order=2)
```
Per step: `eps = unet(x, t, class_labels=null) + w * (unet(x, t, class_labels=c) - unet(x, t, class_labels=null))`;
images are in [-1, 1], channels first."""


def unet_layout(cfg: BaseModelConfig, image_size: int) -> tuple[list[int], list[bool]]:
    """The builtin UNet's widths and attention levels at this image size, resolving `auto` (see the config)."""
    widths, attention = cfg.block_out_channels, cfg.attention_levels
    if widths == "auto":
        levels, side = 1, image_size
        if attention != "auto":
            levels = len(attention)
        else:
            while levels < 4 and side % 2 == 0 and side // 2 >= 4:
                levels, side = levels + 1, side // 2
        floor = max(16, cfg.norm_num_groups)
        widths = [max(floor, 64 >> (levels - 1 - i)) for i in range(levels)]
        widths = [-(-w // cfg.norm_num_groups) * cfg.norm_num_groups for w in widths]  # divisible by the groups
    if attention == "auto":
        attention = [False] * (len(widths) - 1) + [True]
    return list(widths), list(attention)


def build_unet(cfg: BaseModelConfig, image_size: int, channels: int, num_class_embeds: int) -> UNet2DModel:
    widths, attention = unet_layout(cfg, image_size)
    down = tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in attention)
    up = tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention))
    if image_size % (2 ** (len(down) - 1)):
        raise ModelError(f"data.image_size={image_size} must be divisible by 2^(levels-1) = {2 ** (len(down) - 1)}")
    return UNet2DModel(
        sample_size=image_size, in_channels=channels, out_channels=channels,
        layers_per_block=cfg.layers_per_block, block_out_channels=tuple(widths),
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
        unet = UNet2DModel.from_pretrained(ref, subfolder=sub or ("unet" if (Path(ref) / "unet").is_dir() else None),
                                           revision=info.revision)
    except Exception as err:
        raise ModelError(f"cannot load a UNet2DModel from {ref!r} (subfolder={sub!r}): {err}") from None
    c = unet.config
    if c.in_channels != channels or c.sample_size != image_size:
        raise ModelError(
            f"base model {ref!r} works on {c.in_channels}-channel {c.sample_size}px images but data is configured "
            f"as {channels}-channel {image_size}px; set data.channels / data.image_size to match"
        )
    try:
        scheduler = DDPMScheduler.from_pretrained(ref, subfolder="scheduler", revision=info.revision)
    except Exception:  # many UNet-only checkpoints ship no scheduler: use DDPM defaults
        scheduler = DDPMScheduler(num_train_timesteps=1000)
    return with_class_embedding(unet, num_classes), scheduler


# Bumped when the pretraining itself changes (2: the EMA's decay warmup), so cached bases are not reused.
PRETRAIN_RECIPE = 2


def _pretrain_key(cfg: BaseModelConfig, images: np.ndarray) -> str:
    h = hashlib.sha256(images.tobytes())
    h.update(f"recipe {PRETRAIN_RECIPE}".encode())
    h.update(json.dumps(cfg.model_dump(mode="json", include=PRETRAIN_FIELDS), sort_keys=True).encode())
    return h.hexdigest()[:16]


# The base config fields a builtin base depends on (prompts, revision and the like do not change it).
PRETRAIN_FIELDS = {"pretrained", "subfolder", "block_out_channels", "attention_levels", "layers_per_block",
                   "norm_num_groups", "prediction_type", "beta_schedule", "num_train_timesteps", "pretrain_steps",
                   "pretrain_batch_size", "learning_rate", "ema_decay", "snr_gamma", "mixed_precision", "seed"}


def prepare_base(cfg: BaseModelConfig, train: ImageSet, pool: ImageSet, device: torch.device,
                 log=print, progress=None) -> BaseModelInfo:
    """Return the base model to fine-tune: the user's checkpoint, or the builtin base (pretrained once, cached)."""
    if cfg.pretrained != "builtin":
        fp = hashlib.sha256(f"{cfg.pretrained}:{cfg.subfolder}".encode()
                            + (f":{cfg.revision}".encode() if cfg.revision else b"")).hexdigest()[:16]
        ref = cfg.pretrained + (f"@{cfg.revision}" if cfg.revision else "")
        return BaseModelInfo(path=cfg.pretrained, subfolder=cfg.subfolder, description=f"checkpoint {ref}",
                             fingerprint=fp, revision=cfg.revision, reference=ref)
    images = np.concatenate([pool.images, train.images])  # labels deliberately not used
    # A canonical order: the base depends on the set of images only, so jobs that split the same images into
    # labeled and pool differently (K = 5, 10, 20 shots of one draw) share one cached base.
    images = images[np.lexsort(images.reshape(len(images), -1).T[::-1])]
    key = _pretrain_key(cfg, images)
    out = Path(cfg.cache_dir) / f"base-{key}"
    desc = (f"builtin UNet {unet_layout(cfg, images.shape[1])[0]}, pretrained {cfg.pretrain_steps} steps on "
            f"{len(images)} unlabeled images")
    if (out / "base.json").exists():
        meta = json.loads((out / "base.json").read_text())
        log(f"base: reusing cached builtin base {out}")
        return BaseModelInfo(path=str(out), description=desc, fingerprint=key,
                             pretrain_seconds=meta["pretrain_seconds"], final_loss=meta["final_loss"], reference=desc)
    log(f"base: pretraining builtin base for {cfg.pretrain_steps} steps on {len(images)} images -> {out}")
    t0 = time.time()
    unet, final_loss = pretrain(cfg, images, device, Path(cfg.cache_dir) / f"base-{key}.partial", log=log,
                                progress=progress)
    seconds = time.time() - t0
    # Publish the cache entry atomically: a killed run never leaves a half-written base that looks finished.
    tmp = Path(cfg.cache_dir) / f"base-{key}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        unet.save_pretrained(tmp / "unet")
        build_scheduler(cfg).save_pretrained(tmp / "scheduler")
        (tmp / "base.json").write_text(json.dumps({
            "description": desc, "config": cfg.model_dump(mode="json"), "num_images": len(images),
            "pretrain_seconds": seconds, "final_loss": final_loss}, indent=2))
    except BaseException:  # a full disk or an interrupt: no half-written copy stays behind (the checkpoint does)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    shutil.rmtree(Path(cfg.cache_dir) / f"base-{key}.partial", ignore_errors=True)
    return BaseModelInfo(path=str(out), description=desc, fingerprint=key, pretrain_seconds=seconds,
                         final_loss=final_loss, reference=desc)


def pretrain(cfg: BaseModelConfig, images: np.ndarray, device: torch.device, ckpt_dir: Path,
             log=print, checkpoint_every: int = 500, progress=None) -> tuple[UNet2DModel, float | None]:
    """Unconditional denoising pretraining (every label is the null row 0), through the one training loop."""
    torch.manual_seed(cfg.seed)
    unet = build_unet(cfg, images.shape[1], images.shape[3], num_class_embeds=1).to(device)
    scheduler = build_scheduler(cfg)
    params = list(unet.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=1e-4)
    x_all = to_tensor(images, device)
    null = torch.zeros(cfg.pretrain_batch_size, dtype=torch.long, device=device)

    def step_loss(rng: np.random.Generator, gen: torch.Generator) -> torch.Tensor:
        x0 = x_all[torch.from_numpy(rng.integers(0, len(x_all), cfg.pretrain_batch_size))]
        return diffusion_loss(lambda x_t, t: unet(x_t, t, class_labels=null).sample, scheduler, x0, gen,
                              cfg.snr_gamma)

    unet.train()
    spec = LoopSpec("base", cfg.pretrain_steps, min(200, cfg.pretrain_steps // 10 + 1), cfg.seed, checkpoint_every,
                    ema_decay=cfg.ema_decay, mixed_precision=cfg.mixed_precision, loss_window=100)
    _, final_loss = train_loop(params, opt, step_loss, spec, ckpt_dir, device, log=log, progress=progress)
    unet.eval()
    return unet.cpu(), final_loss
