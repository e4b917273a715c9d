"""What the backends share: class bookkeeping and sampling through augment.diffusion (denoiser + sampler +
guidance), so that a backend only brings its model, its encode/decode and its conditioning."""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import torch

from augment.config import BaseModelConfig, GenerationConfig, LoRAConfig
from augment.errors import ModelError
from augment.diffusion import classifier_free, diffusion_loss, feedback_guided, sample


def no_lora_target(cfg: LoRAConfig, err: Exception | None = None) -> ModelError:
    """The error for LoRA target names that match no module of the model."""
    return ModelError(f"lora.target_modules={cfg.target_modules} matched no module of the UNet"
                      + (f" ({err})" if err else ""))


class DiffusionBackend:
    kind: ClassVar[str] = ""

    def __init__(self, cfg: BaseModelConfig, class_names: list[str], image_size: int, channels: int,
                 device: torch.device):
        self.cfg, self.class_names = cfg, list(class_names)
        self.image_size, self.channels, self.device = image_size, channels, device
        self.null_label = len(class_names)  # row K: "no class"
        self.scheduler = None  # set by load()
        self.latent_shape: tuple[int, ...] = (channels, image_size, image_size)

    @property
    def uncond_label(self) -> int:
        """The label guidance pushes away from (the null class; a backend with negative prompts may differ)."""
        return self.null_label

    def prompt(self, label: int) -> tuple[str, str]:
        return "", ""

    def adaptation_prompts(self, adaptation: str) -> list[tuple[str, str]]:
        """(prompt, negative prompt) per class under a lora.adaptations entry (the same for every one here)."""
        return [self.prompt(k) for k in range(len(self.class_names))]

    def use_adaptation(self, adaptation: str) -> None:
        """Condition on `adaptation`'s prompts from now on (nothing to switch here)."""

    def row_prompt(self, adaptation: str, label: int, j: int) -> tuple[tuple[str, str], int]:
        """The j-th sample of class `label` under `adaptation`: its (prompt, negative prompt) and the conditioning
        row `sample` takes for it (the class index, unless prompt variants add rows)."""
        return self.adaptation_prompts(adaptation)[label], label

    def condition_variants(self, adaptation: str) -> None:
        """Embed `adaptation`'s prompt variants (none here)."""

    def for_sampling(self, model: torch.nn.Module) -> torch.nn.Module:
        """The denoiser as generation runs it: torch.compile'd under base.compile (a diffusers pipeline's)."""
        return torch.compile(model) if getattr(self.cfg, "compile", False) and self.kind != "pixel" else model

    def precision(self, requested: str) -> str:
        """The autocast a training or sampling call runs under: `requested` (lora/generation.mixed_precision) over
        fp32 weights, none over weights already in half precision (base.weights_dtype: their dtype is the
        compute dtype, and bf16 autocast over fp16 weights would mix the two)."""
        return requested if getattr(self, "dtype", torch.float32) == torch.float32 else "no"

    def sampler_name(self, cfg: GenerationConfig) -> str:
        """The sampler `sample` uses, as the provenance column `scheduler` records it."""
        return cfg.scheduler

    def loss(self, model: torch.nn.Module, x0: torch.Tensor, labels: torch.Tensor, generator: torch.Generator,
             snr_gamma: float | None = None) -> torch.Tensor:
        """The fine-tuning loss of a batch: denoising (eps or v) at uniform t, Min-SNR weighted when `snr_gamma`."""
        return diffusion_loss(lambda x_t, t: self.denoise(model, x_t, t, labels), self.scheduler, x0, generator,
                              snr_gamma)

    def encode_dataset(self, images: np.ndarray) -> torch.Tensor:
        """`encode` for the images a training loop reads all along (a backend may cache them)."""
        return self.encode(images)

    def sample(self, model: torch.nn.Module, labels: np.ndarray, seeds: list[int], cfg: GenerationConfig,
               strength: float = 1.0, init_images: np.ndarray | None = None,
               feedback: torch.nn.Module | None = None) -> np.ndarray:
        init = self.encode(init_images) if strength < 1.0 else None
        guide = classifier_free(cfg.guidance_scale)
        if feedback is not None:  # a classifier of model-space images (pixels: the pixel backend only)
            guide = feedback_guided(guide, feedback, cfg.feedback_scale, cfg.feedback_criterion,
                                    self.scheduler.alphas_cumprod)
        x = sample(
            lambda x_t, t, y: self.denoise(model, x_t, t, y), self.scheduler,
            torch.tensor(np.asarray(labels, dtype=np.int64)), seeds, self.uncond_label, self.latent_shape,
            scheduler=cfg.scheduler, num_inference_steps=cfg.num_inference_steps,
            guide=guide, eta=cfg.eta, strength=strength, init=init, device=self.device,
            mixed_precision=self.precision(cfg.mixed_precision),
        )
        return self.decode(x)
