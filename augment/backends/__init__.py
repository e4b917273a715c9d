"""Generator backends: one protocol, a registry, and the rule that picks one from the config.

A backend owns everything that depends on what kind of model makes the samples: loading its base, moving images
into and out of model space (identity for pixels, the VAE for latents), turning a class into conditioning (a label
row, or a prompt's text embedding), which modules get LoRA and how the adapter is saved, and the denoiser that
sampling calls. Fine-tuning (augment.finetune), generation, filtering, publishing and the report see only this
protocol, uint8 images and class indices; none of them asks which backend made a sample.

This module imports no torch. The registry's names live in augment.registry, which the config reads.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar, Protocol

from augment.backends.detect import PIPELINE_BACKENDS, check_pipeline
from augment.errors import ModelError
from augment.registry import BACKEND_DETECTORS, BACKENDS, FALLBACK_BACKEND
from augment.results import BaseModelInfo

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np
    import torch

    from augment.config import BaseModelConfig, GenerationConfig, LoRAConfig
    from augment.data import ImageSet

class Backend(Protocol):
    """The protocol every backend implements (see pixel_unet.py and stable_diffusion.py)."""

    kind: ClassVar[str]
    null_label: int  # the class index meaning "no class" (K): label dropout in training, guidance's other half
    scheduler: object  # the training noise schedule (a diffusers DDPMScheduler)
    latent_shape: tuple[int, ...]  # per-sample shape in model space, (C, H, W)

    def prepare(self, train: "ImageSet", pool: "ImageSet", log=print, progress=None) -> BaseModelInfo:
        """Make or locate the base model (the builtin pixel base is pretrained here, once, cached);
        `progress(done, total)` follows any training it does."""

    def load(self, info: BaseModelInfo, adapter: str | Path | None = None) -> "torch.nn.Module":
        """The base denoiser (train mode off), or with `adapter` the fine-tuned one, merged for fast sampling."""

    def encode(self, images: "np.ndarray") -> "torch.Tensor":
        """uint8 (N, H, W, C) images -> model space (N, *latent_shape)."""

    def encode_dataset(self, images: "np.ndarray") -> "torch.Tensor":
        """`encode` for the images the training loop reads throughout (Stable Diffusion caches these latents)."""

    def decode(self, x: "torch.Tensor") -> "np.ndarray":
        """Model space -> uint8 (N, H, W, C) images."""

    def denoise(self, model: "torch.nn.Module", x_t: "torch.Tensor", t: "torch.Tensor",
                labels: "torch.Tensor") -> "torch.Tensor":
        """The model's prediction for class indices `labels` (null_label = unconditional)."""

    def add_lora(self, model: "torch.nn.Module", cfg: "LoRAConfig") -> tuple["torch.nn.Module", list[dict]]:
        """Wrap `model` with LoRA on the backend's targets; returns it and the optimizer's parameter groups."""

    def save_adapter(self, model: "torch.nn.Module", folder: Path, final: Path | None = None) -> Path:
        """Save the trained adapter in the backend's portable format; returns the weights file. `final`: the
        folder's path once it is renamed (it is written under a temporary name), for paths saved inside it."""

    def export(self, model: "torch.nn.Module", folder: Path) -> None:
        """Write the fine-tuned (merged) model as a standalone diffusers checkpoint into `folder`."""

    def usage(self) -> str:
        """Markdown: how to load and sample an exported checkpoint without augment (for its model card)."""

    def prompt(self, label: int) -> tuple[str, str]:
        """(prompt, negative prompt) of a class, for provenance; ("", "") for a backend without text."""

    def loss(self, model: "torch.nn.Module", x0: "torch.Tensor", labels: "torch.Tensor",
             generator: "torch.Generator", snr_gamma: float | None = None) -> "torch.Tensor":
        """The fine-tuning loss of a batch of model-space images and their class indices (the family's objective:
        noise or v prediction, or flow matching)."""

    def sampler_name(self, cfg: "GenerationConfig") -> str:
        """The sampler `sample` uses under `cfg`, as the provenance column `scheduler` records it."""

    def adaptation_prompts(self, adaptation: str) -> list[tuple[str, str]]:
        """(prompt, negative prompt) per class under a lora.adaptations entry (a textual-inversion one names each
        class by its learned token)."""

    def use_adaptation(self, adaptation: str) -> None:
        """Condition on `adaptation`'s prompts from now on ("base": the classes' own)."""

    def for_sampling(self, model: "torch.nn.Module") -> "torch.nn.Module":
        """The denoiser as generation runs it (torch.compile'd under base.compile)."""

    def precision(self, requested: str) -> str:
        """The autocast ("no", "bf16", "auto") a training or sampling call runs under, given the one the config
        requests (none over weights already in half precision)."""

    def sample(self, model: "torch.nn.Module", labels: "np.ndarray", seeds: list[int], cfg: "GenerationConfig",
               strength: float = 1.0, init_images: "np.ndarray | None" = None,
               feedback: "torch.nn.Module | None" = None) -> "np.ndarray":
        """uint8 samples of `labels`, one per seed; image-to-image from `init_images` when strength < 1; with
        `feedback` (a classifier of model-space images), feedback-guided (generation.feedback_scale)."""


def model_index(cfg: "BaseModelConfig") -> dict | None:
    """The parsed model_index.json of `base.pretrained`: from its folder, or for a hub id from the hub when it can be
    reached; None for the builtin base, a UNet-only checkpoint, or a hub that cannot be reached (the fallback
    backend then explains what it cannot load)."""
    if cfg.pretrained == "builtin":
        return None
    index = Path(cfg.pretrained) / "model_index.json"
    if not index.exists() and not Path(cfg.pretrained).exists():  # a hub id: its model_index.json, if reachable
        try:
            from huggingface_hub import hf_hub_download

            index = Path(hf_hub_download(cfg.pretrained, "model_index.json", revision=cfg.revision))
        except Exception:  # offline, or a UNet-only repository
            return None
    if not index.exists():
        return None
    try:
        parsed = json.loads(index.read_text())
    except (OSError, ValueError) as err:
        raise ModelError(f"{index}: not a readable diffusers model_index.json ({err})") from None
    if not isinstance(parsed, dict):
        raise ModelError(f"{index}: not a diffusers model_index.json (a JSON object was expected)")
    return parsed


def detect_kind(cfg: "BaseModelConfig", index: dict | None = None) -> str:
    """`base.kind`, or for `auto` the first registered backend whose detector claims `base.pretrained` (its
    model_index.json, `index` when the caller read it already), else the fallback: the builtin base and UNet
    checkpoints are `pixel`."""
    if cfg.kind != "auto":
        return cfg.kind
    index = model_index(cfg) if index is None else index
    for name in BACKEND_DETECTORS:
        if BACKEND_DETECTORS.load(name)(index, cfg.pretrained):
            return name
    return FALLBACK_BACKEND


def check_base(cfg: "BaseModelConfig") -> str:
    """Refuse, before anything runs, a base that cannot work: a path that does not exist, a folder that is not the
    checkpoint its kind needs. Returns the backend kind. Hub ids are checked when they load."""
    if cfg.pretrained != "builtin":
        ref = Path(cfg.pretrained).expanduser()
        looks_local = ref.is_absolute() or cfg.pretrained.startswith((".", "~")) or cfg.pretrained.count("/") != 1
        if looks_local and not ref.exists():
            raise ModelError(f"base.pretrained={cfg.pretrained}: no such folder (give a diffusers checkpoint folder "
                             "or a hub id such as owner/name)")
    index = model_index(cfg)
    kind = detect_kind(cfg, index)
    check_pipeline(index, cfg.pretrained, kind)  # whatever base.kind says: a pipeline no backend loads is refused
    if kind in PIPELINE_BACKENDS and Path(cfg.pretrained).is_dir() \
            and not (Path(cfg.pretrained) / "model_index.json").exists():
        raise ModelError(f"base.pretrained={cfg.pretrained}: no model_index.json; expected a diffusers pipeline "
                         f"folder for base.kind={kind} (vae/, text_encoder/, tokenizer/, scheduler/ and the "
                         f"{'transformer' if kind in ('flux', 'sd3') else 'unet'}/)")
    return kind


def create(cfg: "BaseModelConfig", class_names: list[str], image_size: int, channels: int,
           device: "torch.device") -> Backend:
    """The backend that `cfg` asks for, set up for K = len(class_names) classes at image_size x channels."""
    kind = detect_kind(cfg)
    return BACKENDS.load(kind)(cfg, class_names, image_size, channels, device)


def resolve_device(name: str) -> "torch.device":
    """The torch device `name` (RunConfig.device) names here, checked: `auto` is this process's first CUDA GPU (a
    worker pinned with CUDA_VISIBLE_DEVICES sees its own, and must find it), else the CPU; `mps` only when named."""
    import torch

    mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    pinned = os.environ.get("AUGMENT_PINNED_GPU") == "1"  # a worker pinned to its GPU (augment.gpus.PINNED)
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() or pinned else "cpu"
    if name.startswith("cuda"):
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        index = int(name.partition(":")[2] or 0)
        if index >= count:
            seen = f"this process sees {count} CUDA GPU(s)" + (
                f" (CUDA_VISIBLE_DEVICES={os.environ['CUDA_VISIBLE_DEVICES']})"
                if "CUDA_VISIBLE_DEVICES" in os.environ else "")
            raise ModelError(f"device {name!r} requested but {seen}; use device: auto, cpu or an index below {count}"
                             if count else f"device {name!r} requested but {seen}; use device: auto or cpu")
    if name == "mps" and not mps:
        raise ModelError("device 'mps' requested but Apple's Metal backend is not available here; use device: auto "
                         "or cpu")
    device = torch.device(name)
    if device.type == "cuda":  # TF32 matmuls and convolutions, as diffusers' scripts' --allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return device


def device_name(name: str) -> str:
    """The device `name` resolves to, as the report names it: `cpu`, `mps`, or `cuda (NVIDIA H100 80GB HBM3)`."""
    import torch

    device = resolve_device(name)
    return f"{device} ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else str(device)
