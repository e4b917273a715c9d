"""The SDXL backend: any diffusers Stable Diffusion XL checkpoint (base 1.0, or a fine-tune of it), a folder or a
hub id.

What differs from SD 1.x/2.x is the conditioning, and it is exactly StableDiffusionXLPipeline's: the prompt goes
through both text encoders (CLIP ViT-L and OpenCLIP bigG), whose penultimate hidden states are concatenated; the
second encoder's pooled, projected embedding and the micro-conditioning `time_ids` (original size, crop corner,
target size: (S, S, 0, 0, S, S) for augment's square, uncropped images) enter through the UNet's
`added_cond_kwargs`. The null class is what the pipeline uses for an empty negative prompt: zeros when the
checkpoint says `force_zeros_for_empty_prompt` (SDXL base does), else the empty prompt's embeddings. LoRA goes on
the UNet's attention projections and is saved in diffusers' format, so that

    pipe = StableDiffusionXLPipeline.from_pretrained(BASE)
    pipe.load_lora_weights(RUN_DIR / "finetune" / "adapter")

reproduces a published sample from its provenance columns. SDXL's VAE overflows in fp16 (its config says
`force_upcast`); augment keeps the VAE in fp32.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from augment.backends.stable_diffusion import StableDiffusionBackend
from augment.backends.textual_inversion import ti_file
from augment.backends.tiny import tiny_clip_config, tiny_clip_tokenizer
from augment.errors import ModelError


class StableDiffusionXLBackend(StableDiffusionBackend):
    kind = "sdxl"
    family = "SDXL"
    pipeline_name = "StableDiffusionXLPipeline"

    def _load_text(self, ref: str, kw: dict) -> None:
        from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

        dtype = self.load_dtype()
        self.text_encoder = CLIPTextModel.from_pretrained(ref, subfolder="text_encoder", **kw, **dtype)
        self.text_encoder = self.text_encoder.to(self.device).eval()
        self.text_encoder_2 = CLIPTextModelWithProjection.from_pretrained(ref, subfolder="text_encoder_2", **kw,
                                                                          **dtype)
        self.text_encoder_2 = self.text_encoder_2.to(self.device).eval()
        self.tokenizer = CLIPTokenizer.from_pretrained(ref, subfolder="tokenizer", **kw)
        self.tokenizer_2 = CLIPTokenizer.from_pretrained(ref, subfolder="tokenizer_2", **kw)

    def text_encoders(self) -> list[torch.nn.Module]:
        return [self.text_encoder, self.text_encoder_2]

    def _zeros_for_empty(self) -> bool:
        """The checkpoint's `force_zeros_for_empty_prompt` (model_index.json; the pipeline's default is True)."""
        index = Path(self.info_path) / "model_index.json"
        if index.exists():
            return bool(json.loads(index.read_text()).get("force_zeros_for_empty_prompt", True))
        from augment.backends import model_index

        return bool((model_index(self.cfg) or {}).get("force_zeros_for_empty_prompt", True))

    def _condition(self, class_prompts: list[str] | None = None) -> None:
        """Class prompts, the null class and the negative prompt through StableDiffusionXLPipeline.encode_prompt
        itself: (K + 2, L, 2 * D) hidden states and (K + 2, P) pooled embeddings."""
        prompts = (class_prompts or self.class_prompts()) + ["", self.cfg.negative_prompt]
        labels = torch.arange(len(prompts))
        c = self._encode_live(prompts, labels)
        self.embeddings, self.pooled = c["embeddings"], c["pooled"]
        s = self.image_size
        self.time_ids = torch.tensor([[s, s, 0, 0, s, s]], dtype=self.embeddings.dtype, device=self.device)

    def _encode_live(self, prompts: list[str], labels: torch.Tensor) -> dict:
        """`prompts` through StableDiffusionXLPipeline.encode_prompt; the null class's rows are zeros when the
        checkpoint says force_zeros_for_empty_prompt."""
        embeds, _, pooled, _ = self.pipeline(None).encode_prompt(prompts, device=self.device,
                                                                 do_classifier_free_guidance=False)
        if self._zeros_for_empty():
            keep = (labels != self.null_label).to(embeds.device)
            embeds = embeds * keep[:, None, None].to(embeds.dtype)
            pooled = pooled * keep[:, None].to(pooled.dtype)
        return {"embeddings": embeds, "pooled": pooled}

    def _tokenizers(self) -> list[tuple]:
        return [(self.tokenizer, self.text_encoder), (self.tokenizer_2, self.text_encoder_2)]

    def _save_ti(self, tokens: list[str], learned: list[torch.Tensor], folder: Path) -> list[Path]:
        """One file per class token in the SDXL format (`clip_l`, `clip_g`: the token's row for each encoder), as
        load_textual_inversion reads it per encoder."""
        from safetensors.torch import save_file

        folder.mkdir(parents=True, exist_ok=True)
        paths = []
        for k in range(len(tokens)):
            path = folder / ti_file(k)
            save_file({"clip_l": learned[0][k:k + 1].contiguous(), "clip_g": learned[1][k:k + 1].contiguous()},
                      str(path))
            paths.append(path)
        return paths

    def ti_usage(self) -> str:
        return ("from safetensors.torch import load_file\n"
                "for k, token in enumerate(tokens):\n"
                "    rows = load_file(f\"path/to/this/folder/learned_embeds-{k:04d}.safetensors\")\n"
                "    pipe.load_textual_inversion(rows[\"clip_l\"], token=token, text_encoder=pipe.text_encoder,\n"
                "                                tokenizer=pipe.tokenizer)\n"
                "    pipe.load_textual_inversion(rows[\"clip_g\"], token=token, text_encoder=pipe.text_encoder_2,\n"
                "                                tokenizer=pipe.tokenizer_2)")

    def _rows_of(self, tokens, files) -> list[torch.Tensor]:
        return [torch.cat([f["clip_l"] for f in files]), torch.cat([f["clip_g"] for f in files])]

    def _components(self, info) -> None:
        self.info_path = info.path
        super()._components(info)

    def _check_denoiser(self, unet: torch.nn.Module) -> None:
        super()._check_denoiser(unet)
        if unet.config.addition_embed_type != "text_time":
            raise ModelError(f"the UNet of {self.info.path!r} takes no SDXL micro-conditioning "
                             f"(addition_embed_type={unet.config.addition_embed_type!r}): not an SDXL checkpoint")
        want = unet.add_embedding.linear_1.in_features
        got = 6 * unet.config.addition_time_embed_dim + self.pooled.shape[-1]
        if got != want or unet.config.cross_attention_dim != self.embeddings.shape[-1]:
            raise ModelError(f"the text encoders of {self.info.path!r} do not fit its UNet (pooled + time ids: "
                             f"{got} wide, the UNet takes {want}; hidden states {self.embeddings.shape[-1]}, the UNet "
                             f"attends over {unet.config.cross_attention_dim})")

    def denoise(self, model, x_t, t, labels):
        c, d = self._batch_conditioning(labels), self.dtype
        cond = {"text_embeds": c["pooled"].to(d), "time_ids": self.time_ids.expand(len(labels), -1).to(d)}
        return model(x_t.to(d), t, encoder_hidden_states=c["embeddings"].to(d), added_cond_kwargs=cond).sample

    def pipeline(self, denoiser: torch.nn.Module | None):
        from diffusers import StableDiffusionXLPipeline

        return StableDiffusionXLPipeline(
            vae=self.vae, text_encoder=self.text_encoder, text_encoder_2=self.text_encoder_2, tokenizer=self.tokenizer,
            tokenizer_2=self.tokenizer_2, unet=denoiser, scheduler=self.scheduler,
            force_zeros_for_empty_prompt=self._zeros_for_empty(), add_watermarker=False)


def write_tiny_checkpoint(path: str | Path, image_size: int = 32, seed: int = 0) -> Path:
    """A tiny, randomly initialised SDXL pipeline in diffusers' own test configuration (two 32-wide CLIP encoders,
    a UNet with text_time micro-conditioning), saved with save_pretrained: for tests and offline smoke runs."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    tokenizer = tiny_clip_tokenizer()
    config = tiny_clip_config(len(tokenizer), projection_dim=32)
    unet = UNet2DConditionModel(
        block_out_channels=(8, 16), layers_per_block=1, sample_size=image_size // 2, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=8, transformer_layers_per_block=(1, 1), projection_class_embeddings_input_dim=80,
        cross_attention_dim=64, norm_num_groups=4)
    vae = AutoencoderKL(block_out_channels=[8, 16], in_channels=3, out_channels=3, latent_channels=4,
                        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                        norm_num_groups=4, sample_size=image_size)
    # SDXL base 1.0's scheduler config (sampling swaps in DPM-Solver++ or DDIM)
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       steps_offset=1, timestep_spacing="leading")
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=CLIPTextModel(config),
                                     text_encoder_2=CLIPTextModelWithProjection(config), tokenizer=tokenizer,
                                     tokenizer_2=tiny_clip_tokenizer(), unet=unet, scheduler=scheduler,
                                     add_watermarker=False)
    pipe.save_pretrained(str(path))
    return Path(path)


if __name__ == "__main__":  # python -m augment.backends.sdxl DIR: write a tiny SDXL checkpoint for smoke runs
    import sys

    print(write_tiny_checkpoint(sys.argv[1] if len(sys.argv) > 1 else "outputs/sdxl-tiny-checkpoint"))
