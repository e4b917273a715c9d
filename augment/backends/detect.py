"""What `base.kind: auto` asks each backend: "is this checkpoint yours?". Torch-free, so the preflight can decide
before any model code loads.

A backend that can recognise its checkpoints registers a detector in augment.registry.BACKEND_DETECTORS:
`detects(index, pretrained) -> bool`, where `index` is the checkpoint's parsed model_index.json (None when it has
none: a UNet-only folder or repository, or a hub id that cannot be reached) and `pretrained` is `base.pretrained`
as the user wrote it. `auto` asks the detectors in registry order; the first that answers True names the backend,
and when none does, the fallback (augment.registry.FALLBACK_BACKEND: the pixel backend, which loads UNet
checkpoints and owns the builtin base) is used. A detector may raise ModelError for a checkpoint it recognises
but cannot handle.
"""

from __future__ import annotations

from augment.errors import ModelError


def stable_diffusion(index: dict | None, pretrained: str) -> bool:
    """A diffusers pipeline whose model_index.json names a Stable Diffusion 1.x/2.x pipeline class."""
    name = str((index or {}).get("_class_name", ""))
    if "StableDiffusion" not in name:
        return False
    if "XL" in name:
        raise ModelError(f"{pretrained}: {name} (SDXL) is not supported yet; use an SD 1.x/2.x checkpoint")
    return True
