"""The checkpoints and data of benchmarks/gpu.py: each family's published architecture with random weights (no
download), or for --tiny the same code with diffusers' test-sized configurations; and photo-like random images.

The "real" configurations below are the published ones (the `config.json` of each component on the Hub):
stable-diffusion-v1-5/stable-diffusion-v1-5, stabilityai/stable-diffusion-xl-base-1.0,
stabilityai/stable-diffusion-3.5-medium and black-forest-labs/FLUX.1-dev. The tokenizers are built here (one
token per character, padded to the real lengths: 77 CLIP tokens, the family's T5 length), so every tensor the
denoiser sees has its real shape.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
import torch

# The published configurations ("real") and diffusers' test-sized ones ("tiny", as augment's tiny writers, but
# with CLIP's 77 positions: the official SD 3.x and FLUX.1 scripts tokenize CLIP prompts to 77).
CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              hidden_act="quick_gelu", projection_dim=768, vocab_size=49408)
CLIP_G = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
              hidden_act="gelu", projection_dim=1280, vocab_size=49408)  # OpenCLIP ViT-bigG/14's text tower
CLIP_TINY = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, projection_dim=32,
                 vocab_size=1000)
T5_XXL = dict(vocab_size=32128, d_model=4096, d_ff=10240, d_kv=64, num_heads=64, num_layers=24,
              feed_forward_proj="gated-gelu", relative_attention_num_buckets=32, layer_norm_epsilon=1e-6)
T5_TINY = dict(vocab_size=1000, d_ff=37, d_kv=8, num_heads=4, num_layers=2)
SD_VAE = dict(block_out_channels=[128, 256, 512, 512], down_block_types=["DownEncoderBlock2D"] * 4,
              up_block_types=["UpDecoderBlock2D"] * 4, layers_per_block=2, norm_num_groups=32, in_channels=3,
              out_channels=3)
VAE_TINY = dict(block_out_channels=[8, 16], down_block_types=["DownEncoderBlock2D"] * 2, norm_num_groups=4,
                up_block_types=["UpDecoderBlock2D"] * 2, in_channels=3, out_channels=3, latent_channels=4)
UNET = {
    "real": {"sd": dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, cross_attention_dim=768,
                        block_out_channels=[320, 640, 1280, 1280], attention_head_dim=8,
                        down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
                        up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3),
             "sdxl": dict(sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
                          cross_attention_dim=2048, block_out_channels=[320, 640, 1280], attention_head_dim=[5, 10, 20],
                          transformer_layers_per_block=[1, 2, 10], use_linear_projection=True,
                          down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
                          up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
                          addition_embed_type="text_time", addition_time_embed_dim=256,
                          projection_class_embeddings_input_dim=2816)},
    "tiny": {"sd": dict(block_out_channels=(8, 16), layers_per_block=1, sample_size=16, in_channels=4, out_channels=4,
                        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), cross_attention_dim=32,
                        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), norm_num_groups=4, attention_head_dim=4),
             "sdxl": dict(block_out_channels=(8, 16), layers_per_block=1, sample_size=16, in_channels=4,
                          out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                          up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4),
                          use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
                          transformer_layers_per_block=(1, 1), projection_class_embeddings_input_dim=80,
                          cross_attention_dim=64, norm_num_groups=4)},
}
TRANSFORMER = {
    "real": {"sd3": dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24,
                         attention_head_dim=64, num_attention_heads=24, joint_attention_dim=4096,
                         caption_projection_dim=1536, pooled_projection_dim=2048, pos_embed_max_size=384,
                         dual_attention_layers=tuple(range(13)), qk_norm="rms_norm"),  # SD 3.5 medium
             "flux": dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                          num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
                          guidance_embeds=True, axes_dims_rope=[16, 56, 56])},  # FLUX.1 [dev]
    "tiny": {"sd3": dict(sample_size=16, patch_size=2, in_channels=4, num_layers=1, attention_head_dim=8,
                         num_attention_heads=4, caption_projection_dim=32, joint_attention_dim=64,
                         pooled_projection_dim=64, out_channels=4),
             "flux": dict(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
                          num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
                          axes_dims_rope=[4, 4, 8], guidance_embeds=True)},
}
# VAE latent scale and shift of each family's published VAE
VAE_SCALE = {"sd": (0.18215, None), "sdxl": (0.13025, None), "sd3": (1.5305, 0.0609), "flux": (0.3611, 0.1159)}
T5_LENGTH = {"sd3": 256, "flux": 512}  # the pipelines' default T5 lengths (tiny: 32)


@contextlib.contextmanager
def built_on(device: torch.device, dtype: torch.dtype):
    """Modules constructed inside are created on `device` in `dtype` (a 12B transformer never exists in fp32)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with device:
            yield
    finally:
        torch.set_default_dtype(old)


def write_checkpoint(family: str, folder: Path, tiny: bool, device: torch.device, t5_layers: int | None = None,
                     seed: int = 0) -> str:
    """Write `family`'s pipeline folder with random weights; returns a line saying what was built (and reduced)."""
    import diffusers
    from transformers import (CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, T5Config,
                              T5EncoderModel)

    from augment.backends.tiny import tiny_clip_tokenizer, tiny_t5_tokenizer

    # 1. Sizes: the published ones, or diffusers' test ones; the frozen parts in bf16 on a GPU, the VAE in fp32.
    size, half = "tiny" if tiny else "real", torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(seed)
    t5_conf = T5_XXL if not tiny else dict(T5_TINY, d_model=64 if family == "sd3" else 32)
    t5_conf = dict(t5_conf, num_layers=t5_layers or t5_conf["num_layers"]) if not tiny else t5_conf
    t5_length = 32 if tiny else T5_LENGTH.get(family)
    clip = lambda conf, cls=CLIPTextModel: cls(CLIPTextConfig(  # noqa: E731
        max_position_embeddings=77, bos_token_id=0, eos_token_id=1, pad_token_id=1, **(CLIP_TINY if tiny else conf)))
    t5 = lambda: T5EncoderModel(T5Config(pad_token_id=0, eos_token_id=1, **t5_conf))  # noqa: E731
    tok = lambda: tiny_clip_tokenizer(77)  # noqa: E731
    with built_on(device, torch.float32):
        vae_conf = VAE_TINY if tiny else dict(SD_VAE, latent_channels=16 if family in ("sd3", "flux") else 4)
        flow = dict(use_quant_conv=False, use_post_quant_conv=False) if family in ("sd3", "flux") else {}
        vae = diffusers.AutoencoderKL(sample_size=32 if tiny else 512 if family == "sd" else 1024,
                                      scaling_factor=VAE_SCALE[family][0], shift_factor=VAE_SCALE[family][1],
                                      force_upcast=family == "sdxl", **vae_conf, **flow)
    # 2. The family's pipeline, its published scheduler configuration.
    with built_on(device, half):
        if family == "sd":
            pipe = diffusers.StableDiffusionPipeline(
                vae=vae, unet=diffusers.UNet2DConditionModel(**UNET[size]["sd"]), text_encoder=clip(CLIP_L),
                tokenizer=tok(), safety_checker=None, feature_extractor=None, requires_safety_checker=False,
                scheduler=diffusers.PNDMScheduler(beta_start=0.00085, beta_end=0.012, skip_prk_steps=True,
                                                  beta_schedule="scaled_linear", steps_offset=1,
                                                  set_alpha_to_one=False))
        elif family == "sdxl":
            pipe = diffusers.StableDiffusionXLPipeline(
                vae=vae, unet=diffusers.UNet2DConditionModel(**UNET[size]["sdxl"]), text_encoder=clip(CLIP_L),
                text_encoder_2=clip(CLIP_G, CLIPTextModelWithProjection), tokenizer=tok(), tokenizer_2=tok(),
                add_watermarker=False, scheduler=diffusers.EulerDiscreteScheduler(
                    beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
                    timestep_spacing="leading"))
        elif family == "sd3":
            pipe = diffusers.StableDiffusion3Pipeline(
                vae=vae, transformer=diffusers.SD3Transformer2DModel(**TRANSFORMER[size]["sd3"]),
                text_encoder=clip(CLIP_L, CLIPTextModelWithProjection), tokenizer=tok(),
                text_encoder_2=clip(CLIP_G, CLIPTextModelWithProjection), tokenizer_2=tok(),
                text_encoder_3=t5(), tokenizer_3=tiny_t5_tokenizer(t5_length),
                scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0))
        else:
            pipe = diffusers.FluxPipeline(
                vae=vae, transformer=diffusers.FluxTransformer2DModel(**TRANSFORMER[size]["flux"]),
                text_encoder=clip(CLIP_L), tokenizer=tok(), text_encoder_2=t5(),
                tokenizer_2=tiny_t5_tokenizer(t5_length), scheduler=diffusers.FlowMatchEulerDiscreteScheduler(
                    shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                    max_image_seq_len=4096))
    # 3. Saved as a diffusers folder, as the Hub holds it.
    pipe.save_pretrained(str(folder))
    denoiser = pipe.unet if family in ("sd", "sdxl") else pipe.transformer
    billions = sum(p.numel() for p in denoiser.parameters()) / 1e9
    del pipe, denoiser, vae
    if device.type == "cuda":
        torch.cuda.empty_cache()
    reduced = ""
    if not tiny and family in ("sd3", "flux") and t5_conf["num_layers"] != T5_XXL["num_layers"]:
        reduced = (f"; T5-XXL reduced to {t5_conf['num_layers']} of {T5_XXL['num_layers']} layers (full width: "
                   "the denoiser's inputs keep their shapes, and both sides encode a prompt once)")
    what = "diffusers' test-sized configuration" if tiny else "the published architecture"
    return f"{family}: {what}, random weights, denoiser {billions:.3g}B parameters{reduced}"


def photo_like(n: int, size: int, seed: int = 0) -> np.ndarray:
    """uint8 (n, size, size, 3) images with a natural photo's 1/f amplitude spectrum and correlated colours."""
    rng = np.random.default_rng(seed)
    f = np.fft.fftfreq(size)
    radius = np.sqrt(f[:, None] ** 2 + f[None, :] ** 2)
    radius[0, 0] = 1.0 / size
    out = np.empty((n, size, size, 3), np.uint8)
    for i in range(n):
        spectrum = (rng.normal(size=(3, size, size)) + 1j * rng.normal(size=(3, size, size))) / radius
        field = np.fft.ifft2(spectrum).real  # (3, H, W): three independent 1/f fields
        mixed = np.einsum("chw,cd->hwd", field, rng.normal(size=(3, 3)) + 2 * np.eye(3))  # correlated channels
        lo, hi = np.percentile(mixed, [1, 99])
        out[i] = np.clip((mixed - lo) / (hi - lo + 1e-8) * 255, 0, 255).astype(np.uint8)
    return out


def write_images(folder: Path, images: np.ndarray) -> list[Path]:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"photo-{i:03d}.png" for i in range(len(images))]
    for path, image in zip(paths, images):
        Image.fromarray(image).save(path)
    return paths
