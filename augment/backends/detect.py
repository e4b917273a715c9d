"""What `base.kind: auto` asks each backend: "is this checkpoint yours?", and which diffusers pipelines each backend
loads at all. Torch-free, so the preflight can decide before any model code loads.

A backend that can recognise its checkpoints registers a detector in augment.registry.BACKEND_DETECTORS:
`detects(index, pretrained) -> bool`, where `index` is the checkpoint's parsed model_index.json (None when it has
none: a UNet-only folder or repository, or a hub id that cannot be reached) and `pretrained` is `base.pretrained`
as the user wrote it. `auto` asks the detectors in registry order; the first that answers True names the backend,
and when none does, the fallback (augment.registry.FALLBACK_BACKEND: the pixel backend, which loads UNet
checkpoints and owns the builtin base) is used.

Whatever `base.kind` says, a checkpoint whose model_index.json names a pipeline class is then checked against
PIPELINES (`check_pipeline`): a class no backend loads (Kandinsky, PixArt, Sana, ...) is one error before any
stage runs, not a traceback three stages in.
"""

from __future__ import annotations

from augment.errors import ModelError

# The diffusers pipeline classes (model_index.json's `_class_name`) each backend loads.
PIPELINES: dict[str, tuple[str, ...]] = {
    "stable_diffusion": ("StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline"),  # SD 1.x / 2.x
    "sdxl": ("StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline"),
    "flux": ("FluxPipeline", "FluxImg2ImgPipeline"),  # FLUX.1 [dev] and [schnell]
    "sd3": ("StableDiffusion3Pipeline", "StableDiffusion3Img2ImgPipeline"),  # SD 3 and 3.5
    "pixel": ("DDPMPipeline", "DDIMPipeline"),  # an unconditional UNet2DModel in unet/, given class rows
}

# Families teams fine-tune that no backend loads yet, by a part of their pipeline class names: the error names them.
FAMILIES = (("Flux2", "FLUX.2"), ("Kandinsky", "Kandinsky"), ("PixArt", "PixArt"), ("Sana", "Sana"),
            ("Lumina", "Lumina"), ("HunyuanDiT", "Hunyuan-DiT"), ("AuraFlow", "AuraFlow"), ("Qwen", "Qwen-Image"))

# The backends that load a diffusers pipeline folder (model_index.json and one subfolder per component).
PIPELINE_BACKENDS = ("stable_diffusion", "sdxl", "flux", "sd3")


def _names(index: dict | None) -> str:
    return str((index or {}).get("_class_name", ""))


def stable_diffusion(index: dict | None, pretrained: str) -> bool:
    """A diffusers pipeline whose model_index.json names a Stable Diffusion 1.x/2.x pipeline class."""
    return _names(index) in PIPELINES["stable_diffusion"]


def sdxl(index: dict | None, pretrained: str) -> bool:
    """A diffusers pipeline whose model_index.json names an SDXL pipeline class."""
    return _names(index) in PIPELINES["sdxl"]


def flux(index: dict | None, pretrained: str) -> bool:
    """A diffusers pipeline whose model_index.json names a FLUX.1 pipeline class."""
    return _names(index) in PIPELINES["flux"]


def sd3(index: dict | None, pretrained: str) -> bool:
    """A diffusers pipeline whose model_index.json names an SD 3.x pipeline class."""
    return _names(index) in PIPELINES["sd3"]


def check_pipeline(index: dict | None, pretrained: str, kind: str) -> None:
    """Refuse a checkpoint whose pipeline class the backend `kind` does not load (ModelError, one line)."""
    name = str((index or {}).get("_class_name", ""))
    if not name or name in PIPELINES.get(kind, ()):
        return
    owner = next((k for k, names in PIPELINES.items() if name in names), None)
    if owner is not None:
        raise ModelError(f"base.pretrained={pretrained} is a {name} checkpoint, which the {owner} backend loads, "
                         f"not {kind}: set base.kind to {owner} (or auto)")
    family = next((f for part, f in FAMILIES if part in name), None)
    loads = "; ".join(f"{k}: {', '.join(names)}" for k, names in PIPELINES.items())
    raise ModelError(f"base.pretrained={pretrained} is a {name} checkpoint"
                     + (f" ({family}, not supported yet)" if family else "")
                     + f": augment loads these pipeline classes ({loads}) or a UNet2DModel folder")
