"""The SD 3.x backend: any diffusers Stable Diffusion 3 / 3.5 checkpoint (3.5 Large, Large Turbo, Medium, or a
fine-tune), a folder or a hub id.

SD 3.x shares FLUX.1's rectified flow and FlowMatch Euler sampling (flux.py) and differs where StableDiffusion3Pipeline
and diffusers' official LoRA script (examples/dreambooth/train_dreambooth_lora_sd3.py) differ:
- **Conditioning**: three text encoders through StableDiffusion3Pipeline.encode_prompt itself: both CLIPs' penultimate
  hidden states, concatenated and padded to T5's width, ahead of T5's hidden states (up to 256 tokens), and both
  CLIPs' pooled embeddings concatenated (`pooled_projections`). The MMDiT transformer patches the latents itself, and
  its timestep is the scheduler's (0-1000).
- **Guidance**: classifier-free, two passes per step (the null class is the empty prompt's embeddings, as the
  pipeline encodes an empty negative prompt; `base.negative_prompt` replaces it).
- **Objective**: the script's defaults: sigmas drawn logit-normal (mean 0, std 1) over the scheduler's (shifted)
  training sigmas, and the preconditioned output x_t - s v scored against x_0.
- **Sampling**: the scheduler's own timesteps for n steps (`shift` 3.0 in SD 3.5's config), and `mu` when the
  checkpoint asks for resolution-dependent shifting.

    pipe = StableDiffusion3Pipeline.from_pretrained(BASE)
    pipe.load_lora_weights(RUN_DIR / "finetune" / "adapter")
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from augment.backends.flux import FluxBackend
from augment.backends.stable_diffusion import StableDiffusionBackend
from augment.backends.tiny import tiny_clip_config, tiny_clip_tokenizer, tiny_flow_vae, tiny_t5_tokenizer
from augment.config import BaseModelConfig, GenerationConfig
from augment.diffusion import classifier_free
from augment.errors import ModelError

MAX_SEQUENCE_LENGTH = 256  # StableDiffusion3Pipeline's default T5 length


class StableDiffusion3Backend(FluxBackend):
    kind = "sd3"
    family = "SD 3.x"
    pipeline_name = "StableDiffusion3Pipeline"
    denoiser_name = "transformer"
    denoiser_class = "SD3Transformer2DModel"
    latent_multiple = 2  # SD 3.x's transformers patch the latents 2x2

    def __init__(self, cfg: BaseModelConfig, class_names: list[str], image_size: int, channels: int,
                 device: torch.device):
        # FluxBackend's __init__ refuses a negative prompt; SD 3.x guides against one
        StableDiffusionBackend.__init__(self, cfg, class_names, image_size, channels, device)

    def _load_text(self, ref: str, kw: dict) -> None:
        from transformers import AutoTokenizer, CLIPTextModelWithProjection, CLIPTokenizer, T5EncoderModel

        dtype = self.load_dtype()
        self.text_encoder, self.text_encoder_2 = (
            CLIPTextModelWithProjection.from_pretrained(ref, subfolder=sub, **kw, **dtype).to(self.device).eval()
            for sub in ("text_encoder", "text_encoder_2"))
        self.text_encoder_3 = T5EncoderModel.from_pretrained(ref, subfolder="text_encoder_3", **kw, **dtype)
        self.text_encoder_3 = self.text_encoder_3.to(self.device).eval()
        self.tokenizer = CLIPTokenizer.from_pretrained(ref, subfolder="tokenizer", **kw)
        self.tokenizer_2 = CLIPTokenizer.from_pretrained(ref, subfolder="tokenizer_2", **kw)
        self.tokenizer_3 = AutoTokenizer.from_pretrained(ref, subfolder="tokenizer_3", **kw)

    def text_encoders(self) -> list[torch.nn.Module]:
        return [self.text_encoder, self.text_encoder_2, self.text_encoder_3]

    @property
    def max_sequence_length(self) -> int:
        return min(MAX_SEQUENCE_LENGTH, int(self.tokenizer_3.model_max_length))

    extra_rows = 2  # the null class and the negative prompt

    @torch.no_grad()
    def _condition(self, class_prompts: list[str] | None = None) -> None:
        """Class prompts (`class_prompts`, default the classes' own), the empty prompt (the null class) and the
        negative prompt through StableDiffusion3Pipeline.encode_prompt itself."""
        pipe = self.pipeline(None)
        prompts = (class_prompts or self.class_prompts()) + ["", self.cfg.negative_prompt]
        self.embeddings, _, self.pooled, _ = pipe.encode_prompt(
            prompts, None, None, device=self.device, do_classifier_free_guidance=False,
            max_sequence_length=self.max_sequence_length)

    @property
    def uncond_label(self) -> int:
        return self.null_label + 1 if self.cfg.negative_prompt else self.null_label

    def _check_denoiser(self, transformer: torch.nn.Module) -> None:
        c, conf = self.latent_shape[0], transformer.config
        self._patch = conf.patch_size
        if conf.in_channels != c:
            raise ModelError(f"the transformer of {self.info.path!r} takes {conf.in_channels} channels, but the "
                             f"VAE's latents have {c}")
        if self.latent_shape[1] % conf.patch_size:
            raise ModelError(f"data.image_size={self.image_size} gives {self.latent_shape[1]}px latents, which the "
                             f"transformer cannot cut in {conf.patch_size}x{conf.patch_size} patches")
        for name, want, got in (("joint_attention_dim", conf.joint_attention_dim, self.embeddings.shape[-1]),
                                ("pooled_projection_dim", conf.pooled_projection_dim, self.pooled.shape[-1])):
            if want != got:
                raise ModelError(f"the text encoders of {self.info.path!r} do not fit its transformer ({name} is "
                                 f"{want}, the encoders give {got})")

    def velocity(self, model, x_t: torch.Tensor, t: torch.Tensor, labels: torch.Tensor,
                 guidance: float | None = None) -> torch.Tensor:
        """The transformer's velocity for latents `x_t` (N, C, H, W) at timesteps `t` (sigma * 1000)."""
        i, d, n = labels.to(self.embeddings.device), self.dtype, x_t.shape[0]
        return model(hidden_states=x_t.to(d), timestep=t.expand(n).to(d),
                     encoder_hidden_states=self.embeddings[i].to(d), pooled_projections=self.pooled[i].to(d)).sample

    def denoise(self, model, x_t, t, labels):
        return self.velocity(model, x_t, t, labels)

    def loss(self, model, x0, labels, generator, snr_gamma=None):
        """train_dreambooth_lora_sd3.py's defaults: sigma at u ~ logit-normal(0, 1) over the training sigmas, the
        output preconditioned to x_t - s v and scored against x_0 (`snr_gamma` is refused for this backend)."""
        n = x0.shape[0]
        eps = torch.randn(x0.shape, generator=generator, device=generator.device).to(x0.device)
        u = torch.sigmoid(torch.randn((n,), generator=generator, device=generator.device))
        idx = (u * self.scheduler.config.num_train_timesteps).long().clamp(max=len(self.scheduler.sigmas) - 1).cpu()
        t = self.scheduler.timesteps[idx].to(x0.device)
        sigma = self.scheduler.sigmas[idx].to(device=x0.device, dtype=x0.dtype).view(-1, 1, 1, 1)
        x_t = (1.0 - sigma) * x0 + sigma * eps
        pred = self.velocity(model, x_t, t, labels).float()
        return F.mse_loss(x_t.float() - sigma.float() * pred, x0.float())

    def _schedule(self, sched, steps: int):
        """The scheduler's own timesteps for `steps` steps, as StableDiffusion3Pipeline sets them."""
        from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import (calculate_shift,
                                                                                        retrieve_timesteps)

        kw = {}
        if sched.config.get("use_dynamic_shifting", None):
            c, h, w = self.latent_shape
            conf, p = sched.config, self._patch
            kw["mu"] = calculate_shift((h // p) * (w // p), conf.get("base_image_seq_len", 256),
                                       conf.get("max_image_seq_len", 4096), conf.get("base_shift", 0.5),
                                       conf.get("max_shift", 1.16))
        return retrieve_timesteps(sched, steps, self.device, **kw)

    _patch = 2  # the transformer's patch size (set when it loads)

    def _predict(self, model, x, t, y, cfg: GenerationConfig):
        """Classifier-free guidance, both halves in one batch (one pass at guidance 1), as the pipeline does."""
        guide = classifier_free(cfg.guidance_scale)
        return guide(lambda x_in, t_in, labels: self.velocity(model, x_in, t_in, labels), x, t, y, self.uncond_label)

    def pipeline(self, denoiser: torch.nn.Module | None):
        from diffusers import StableDiffusion3Pipeline

        return StableDiffusion3Pipeline(
            transformer=denoiser, scheduler=self.scheduler, vae=self.vae, text_encoder=self.text_encoder,
            tokenizer=self.tokenizer, text_encoder_2=self.text_encoder_2, tokenizer_2=self.tokenizer_2,
            text_encoder_3=self.text_encoder_3, tokenizer_3=self.tokenizer_3)


def write_tiny_checkpoint(path: str | Path, image_size: int = 32, seed: int = 0) -> Path:
    """A tiny, randomly initialised SD 3.x pipeline after diffusers' own test configuration (a one-layer MMDiT, two
    32-wide CLIPs with projection and a T5), saved with save_pretrained: for tests and offline smoke runs."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection, T5Config, T5EncoderModel

    torch.manual_seed(seed)
    tokenizer, tokenizer_3 = tiny_clip_tokenizer(), tiny_t5_tokenizer()
    config = tiny_clip_config(len(tokenizer), projection_dim=32)
    transformer = SD3Transformer2DModel(sample_size=image_size // 2, patch_size=2, in_channels=4, num_layers=1,
                                        attention_head_dim=8, num_attention_heads=4, caption_projection_dim=32,
                                        joint_attention_dim=64, pooled_projection_dim=64, out_channels=4)
    text_encoder_3 = T5EncoderModel(T5Config(vocab_size=len(tokenizer_3), d_model=64, d_kv=8, d_ff=37, num_layers=2,
                                             num_heads=4, pad_token_id=0, eos_token_id=1))
    vae = tiny_flow_vae(image_size)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)  # SD 3.5's scheduler config
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=scheduler, vae=vae, text_encoder=CLIPTextModelWithProjection(config),
        tokenizer=tokenizer, text_encoder_2=CLIPTextModelWithProjection(config), tokenizer_2=tiny_clip_tokenizer(),
        text_encoder_3=text_encoder_3, tokenizer_3=tokenizer_3)
    pipe.save_pretrained(str(path))
    return Path(path)


if __name__ == "__main__":  # python -m augment.backends.sd3 DIR: write a tiny SD 3.x checkpoint for smoke runs
    import sys

    print(write_tiny_checkpoint(sys.argv[1] if len(sys.argv) > 1 else "outputs/sd3-tiny-checkpoint"))
