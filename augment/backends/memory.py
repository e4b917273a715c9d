"""What fits on the device: the dtype the frozen weights load in (base.weights_dtype) and how many images one VAE
call takes."""

from __future__ import annotations

import torch

from augment.errors import ModelError

ENCODE_BATCH = 32  # images per VAE call on the CPU, and the most on a GPU
# GPU memory a full-size VAE (SD's, SDXL's, SD 3.x's and FLUX.1's are all this wide) takes per image at 512 px in
# fp32; it scales with the pixel count.
VAE_BYTES_512 = {"encode": 0.65e9, "decode": 1.1e9}


def vae_batch(free_bytes: int | None, image_size: int, what: str) -> int:
    """Images per VAE call: ENCODE_BATCH where memory is not counted (the CPU), else as many as fit in 80% of the
    GPU's free memory (at least one)."""
    if free_bytes is None:
        return ENCODE_BATCH
    per_image = VAE_BYTES_512[what] * (image_size / 512) ** 2
    return int(max(1, min(ENCODE_BATCH, 0.8 * free_bytes // per_image)))


def weights_dtype(name: str, device: torch.device, fp16_ok: bool = True) -> torch.dtype:
    """base.weights_dtype as a torch dtype: `auto` is bf16 on a CUDA device that computes it, fp16 on one that does
    not (when the family works in fp16, `fp16_ok`), else fp32."""
    if name == "fp16" and not fp16_ok:
        raise ModelError("base.weights_dtype=fp16: this family's T5 text encoder overflows in fp16; use bf16 or auto")
    if name == "auto":
        if device.type != "cuda":
            name = "fp32"
        else:
            name = "bf16" if torch.cuda.is_bf16_supported() else "fp16" if fp16_ok else "fp32"
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]
