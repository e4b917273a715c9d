"""The FLUX.1 backend: any diffusers FLUX.1 checkpoint ([dev], [schnell], or a fine-tune), a folder or a hub id.

FLUX differs from the UNet families in three ways, and each follows diffusers' FluxPipeline and its official LoRA
script (examples/dreambooth/train_dreambooth_lora_flux.py):
- **Conditioning**: the prompt's T5 hidden states (`encoder_hidden_states`, up to 512 tokens) and CLIP's pooled
  embedding (`pooled_projections`), computed by FluxPipeline.encode_prompt itself; the latents enter the
  transformer as 2x2 patches (`_pack_latents`) with their positions (`img_ids`), and a guidance-distilled model
  ([dev]) takes the guidance scale as an input (`guidance`) instead of a second, unconditional pass.
- **Objective**: rectified flow. x_t = (1 - s) x_0 + s eps at a sigma s drawn uniformly from the scheduler's
  training sigmas, the target is the velocity eps - x_0, the loss plain MSE (the script's `weighting_scheme`
  none); a guidance-distilled transformer trains under guidance 3.5, the script's default.
- **Sampling**: FlowMatch Euler on FluxPipeline's sigmas (linspace(1, 1/n, n), shifted by `mu` for the image's
  token count); image-to-image starts from `scale_noise` of the source's latents at the strength's first sigma,
  as FluxImg2ImgPipeline does. `generation.guidance_scale` is the distilled guidance (FluxPipeline's
  `guidance_scale`); [schnell] has no guidance input and ignores it.
The VAE's latents are shifted and scaled (`shift_factor`, `scaling_factor`). LoRA goes on the transformer's
attention projections and is saved in diffusers' format:

    pipe = FluxPipeline.from_pretrained(BASE)
    pipe.load_lora_weights(RUN_DIR / "finetune" / "adapter")
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from augment.backends.stable_diffusion import StableDiffusionBackend
from augment.backends.tiny import tiny_clip_config, tiny_clip_tokenizer, tiny_flow_vae, tiny_t5_tokenizer
from augment.config import BaseModelConfig, GenerationConfig
from augment.diffusion import autocast
from augment.diffusion.sampling import generators
from augment.errors import ModelError

TRAIN_GUIDANCE = 3.5  # the distilled guidance a guidance-distilled transformer trains under (the script's default)
MAX_SEQUENCE_LENGTH = 512  # FluxPipeline's default and maximum T5 length


class FluxBackend(StableDiffusionBackend):
    kind = "flux"
    family = "FLUX.1"
    pipeline_name = "FluxPipeline"
    denoiser_name = "transformer"
    denoiser_class = "FluxTransformer2DModel"
    latent_multiple = 2  # latents are packed in 2x2 patches
    fp16_ok = False  # T5 overflows in fp16

    def __init__(self, cfg: BaseModelConfig, class_names: list[str], image_size: int, channels: int,
                 device: torch.device):
        super().__init__(cfg, class_names, image_size, channels, device)
        if cfg.negative_prompt:
            raise ModelError(f"base.negative_prompt={cfg.negative_prompt!r}: FLUX.1 samples with distilled guidance "
                             "and no negative prompt; leave base.negative_prompt empty")

    def _load_text(self, ref: str, kw: dict) -> None:
        from transformers import AutoTokenizer, CLIPTextModel, CLIPTokenizer, T5EncoderModel

        dtype = self.load_dtype()
        self.text_encoder = CLIPTextModel.from_pretrained(ref, subfolder="text_encoder", **kw, **dtype)
        self.text_encoder = self.text_encoder.to(self.device).eval()
        self.text_encoder_2 = T5EncoderModel.from_pretrained(ref, subfolder="text_encoder_2", **kw, **dtype)
        self.text_encoder_2 = self.text_encoder_2.to(self.device).eval()
        self.tokenizer = CLIPTokenizer.from_pretrained(ref, subfolder="tokenizer", **kw)
        self.tokenizer_2 = AutoTokenizer.from_pretrained(ref, subfolder="tokenizer_2", **kw)

    def text_encoders(self) -> list[torch.nn.Module]:
        return [self.text_encoder, self.text_encoder_2]

    def _load_scheduler(self, ref: str, kw: dict):
        from diffusers import FlowMatchEulerDiscreteScheduler

        return FlowMatchEulerDiscreteScheduler.from_pretrained(ref, subfolder="scheduler", **kw)

    @property
    def max_sequence_length(self) -> int:
        """T5 tokens per prompt: FluxPipeline's 512, or the tokenizer's own maximum when that is shorter."""
        return min(MAX_SEQUENCE_LENGTH, int(self.tokenizer_2.model_max_length))

    extra_rows = 1  # the null class (no negative prompt)

    @torch.no_grad()
    def _condition(self, class_prompts: list[str] | None = None) -> None:
        """Class prompts (`class_prompts`, default the classes' own) and the empty prompt (the null class) through
        FluxPipeline.encode_prompt itself."""
        pipe = self.pipeline(None)
        prompts = (class_prompts or self.class_prompts()) + [""]
        self.embeddings, self.pooled, self.text_ids = pipe.encode_prompt(
            prompts, prompt_2=None, device=self.device, max_sequence_length=self.max_sequence_length)

    def _check_denoiser(self, transformer: torch.nn.Module) -> None:
        c = self.latent_shape[0]
        if transformer.config.in_channels != 4 * c:
            raise ModelError(f"the transformer of {self.info.path!r} takes {transformer.config.in_channels} "
                             f"channels, but the VAE's latents packed 2x2 have {4 * c}")
        for name, want, got in (("joint_attention_dim", transformer.config.joint_attention_dim,
                                 self.embeddings.shape[-1]),
                                ("pooled_projection_dim", transformer.config.pooled_projection_dim,
                                 self.pooled.shape[-1])):
            if want != got:
                raise ModelError(f"the text encoders of {self.info.path!r} do not fit its transformer ({name} is "
                                 f"{want}, the encoders give {got})")

    @property
    def uncond_label(self) -> int:
        return self.null_label

    def velocity(self, model, x_t: torch.Tensor, t: torch.Tensor, labels: torch.Tensor,
                 guidance: float | None) -> torch.Tensor:
        """The transformer's velocity for latents `x_t` (N, C, H, W) at timesteps `t` (sigma * 1000), unpacked."""
        from diffusers import FluxPipeline

        n, c, h, w = x_t.shape
        i, d = labels.to(self.embeddings.device), self.dtype
        packed = FluxPipeline._pack_latents(x_t.to(d), n, c, h, w)
        img_ids = FluxPipeline._prepare_latent_image_ids(n, h // 2, w // 2, x_t.device, d)
        g = None
        if model.config.guidance_embeds:
            g = torch.full((n,), float(guidance if guidance is not None else TRAIN_GUIDANCE), device=x_t.device)
        out = model(hidden_states=packed, timestep=t.expand(n).to(d) / 1000, guidance=g,
                    pooled_projections=self.pooled[i].to(d), encoder_hidden_states=self.embeddings[i].to(d),
                    txt_ids=self.text_ids.to(d), img_ids=img_ids).sample
        # unpack: (N, h/2 * w/2, 4C) -> (N, C, h, w), as FluxPipeline._unpack_latents
        return out.view(n, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(n, c, h, w)

    def denoise(self, model, x_t, t, labels):
        return self.velocity(model, x_t, t, labels, TRAIN_GUIDANCE)

    def loss(self, model, x0, labels, generator, snr_gamma=None):
        """Rectified flow, as train_dreambooth_lora_flux.py: sigma uniform over the training sigmas, target
        eps - x_0. (`snr_gamma` is a noise-prediction weighting; the config refuses it for this backend.)"""
        n = x0.shape[0]
        eps = torch.randn(x0.shape, generator=generator, device=generator.device).to(x0.device)
        u = torch.rand((n,), generator=generator, device=generator.device)
        idx = (u * self.scheduler.config.num_train_timesteps).long().clamp(max=len(self.scheduler.sigmas) - 1).cpu()
        t = self.scheduler.timesteps[idx].to(x0.device)
        sigma = self.scheduler.sigmas[idx].to(device=x0.device, dtype=x0.dtype).view(-1, 1, 1, 1)
        x_t = (1.0 - sigma) * x0 + sigma * eps
        pred = self.velocity(model, x_t, t, labels, TRAIN_GUIDANCE).float()
        return F.mse_loss(pred, (eps - x0).float())

    def sampler_name(self, cfg: GenerationConfig) -> str:
        return "flow_match_euler"

    def _schedule(self, sched, steps: int):
        """The sampling timesteps, as FluxPipeline sets them: sigmas linspace(1, 1/n, n), shifted by `mu` for the
        image's token count."""
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift, retrieve_timesteps

        c, h, w = self.latent_shape
        conf = sched.config
        mu = calculate_shift((h // 2) * (w // 2), conf.get("base_image_seq_len", 256),
                             conf.get("max_image_seq_len", 4096), conf.get("base_shift", 0.5),
                             conf.get("max_shift", 1.15))
        return retrieve_timesteps(sched, steps, self.device, sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)

    def _predict(self, model, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, cfg: GenerationConfig):
        """One sampling step's velocity: FLUX.1's distilled guidance, one pass."""
        return self.velocity(model, x, t, y, cfg.guidance_scale)

    @torch.no_grad()
    def sample(self, model, labels, seeds, cfg: GenerationConfig, strength: float = 1.0, init_images=None,
               feedback=None) -> np.ndarray:
        """FlowMatch Euler exactly as the family's pipeline (strength 1) and its image-to-image pipeline (strength
        < 1) sample, every sample from its own seed's generator."""
        from diffusers import FlowMatchEulerDiscreteScheduler

        if feedback is not None:
            raise ModelError("feedback-guided sampling needs the pixel backend")
        sched = FlowMatchEulerDiscreteScheduler.from_config(self.scheduler.config)
        timesteps, steps = self._schedule(sched, cfg.num_inference_steps)
        noise = torch.stack([torch.randn(self.latent_shape, generator=g) for g in generators(seeds)]).to(self.device)
        if strength < 1.0:
            if init_images is None:
                raise ValueError("image-to-image (strength < 1) needs init images")
            t_start = int(max(steps - min(steps * strength, steps), 0))
            timesteps = timesteps[t_start * sched.order:]
            sched.set_begin_index(t_start * sched.order)
            x = sched.scale_noise(self.encode(init_images), timesteps[:1].repeat(len(seeds)), noise)
        else:
            x = noise
        y = torch.tensor(np.asarray(labels, dtype=np.int64), device=self.device)
        for t in timesteps:
            with autocast(self.device, self.precision(cfg.mixed_precision)):
                v = self._predict(model, x, t, y, cfg)
            x = sched.step(v.float(), t, x).prev_sample
        return self.decode(x)

    def pipeline(self, denoiser: torch.nn.Module | None):
        from diffusers import FluxPipeline

        return FluxPipeline(scheduler=self.scheduler, vae=self.vae, text_encoder=self.text_encoder,
                            tokenizer=self.tokenizer, text_encoder_2=self.text_encoder_2, tokenizer_2=self.tokenizer_2,
                            transformer=denoiser)


def write_tiny_checkpoint(path: str | Path, image_size: int = 32, seed: int = 0) -> Path:
    """A tiny, randomly initialised FLUX.1 pipeline after diffusers' own test configuration (a one-double-block,
    one-single-block transformer with guidance embedding, a 32-wide CLIP and T5), saved with save_pretrained: for
    tests and offline smoke runs."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel, T5Config, T5EncoderModel

    torch.manual_seed(seed)
    tokenizer = tiny_clip_tokenizer()
    tokenizer_2 = tiny_t5_tokenizer()
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                         attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                         pooled_projection_dim=32, axes_dims_rope=[4, 4, 8], guidance_embeds=True)
    text_encoder_2 = T5EncoderModel(T5Config(vocab_size=len(tokenizer_2), d_model=32, d_kv=8, d_ff=37, num_layers=2,
                                             num_heads=4, pad_token_id=0, eos_token_id=1))
    vae = tiny_flow_vae(image_size)
    # FLUX.1 [dev]'s scheduler config: shift 3, resolution-dependent shifting
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                                                max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096)
    pipe = FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=CLIPTextModel(tiny_clip_config(
        len(tokenizer), projection_dim=32)), tokenizer=tokenizer, text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2, transformer=transformer)
    pipe.save_pretrained(str(path))
    return Path(path)


if __name__ == "__main__":  # python -m augment.backends.flux DIR: write a tiny FLUX.1 checkpoint for smoke runs
    import sys

    print(write_tiny_checkpoint(sys.argv[1] if len(sys.argv) > 1 else "outputs/flux-tiny-checkpoint"))
