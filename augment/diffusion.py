"""Diffusion math shared by pretraining, fine-tuning and sampling.

Notation follows DDPM/DDIM: x_0 clean image in [-1, 1], eps noise, t timestep, alpha_bar_t the cumulative
product of (1 - beta), x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps, v = sqrt(alpha_bar_t) eps -
sqrt(1 - alpha_bar_t) x_0. The class index K (one past the last class) is the null label for classifier-free
guidance.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler


def to_tensor(images: np.ndarray, device: torch.device | str = "cpu") -> torch.Tensor:
    """uint8 (N, H, W, C) -> float (N, C, H, W) in [-1, 1]."""
    x = torch.from_numpy(np.array(images, dtype=np.uint8)).to(device).permute(0, 3, 1, 2).float()
    return x / 127.5 - 1.0


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """float (N, C, H, W) in [-1, 1] -> uint8 (N, H, W, C)."""
    x = ((x.float().clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def autocast(device: torch.device, mixed_precision: str):
    if mixed_precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def diffusion_loss(
    unet: torch.nn.Module,
    scheduler: DDPMScheduler,
    x0: torch.Tensor,
    class_labels: torch.Tensor,
    generator: torch.Generator,
    snr_gamma: float | None = None,
) -> torch.Tensor:
    """Denoising loss at uniformly drawn t, with optional Min-SNR-gamma weighting (Hang et al. 2023)."""
    n = x0.shape[0]
    eps = torch.randn(x0.shape, generator=generator, device=generator.device).to(x0.device)
    t = torch.randint(0, scheduler.config.num_train_timesteps, (n,), generator=generator,
                      device=generator.device).to(x0.device)
    x_t = scheduler.add_noise(x0, eps, t)
    pred = unet(x_t, t, class_labels=class_labels).sample.float()
    if scheduler.config.prediction_type == "v_prediction":
        target = scheduler.get_velocity(x0, eps, t)
    else:
        target = eps
    per_sample = F.mse_loss(pred, target, reduction="none").mean(dim=(1, 2, 3))
    if snr_gamma is None:
        return per_sample.mean()
    alpha_bar = scheduler.alphas_cumprod.to(x0.device)[t]
    snr = alpha_bar / (1.0 - alpha_bar)
    clipped = torch.clamp(snr, max=snr_gamma)
    weight = clipped / (snr + 1.0) if scheduler.config.prediction_type == "v_prediction" else clipped / snr
    return (weight * per_sample).mean()


SAMPLERS = {"ddim": DDIMScheduler, "dpmsolver++": DPMSolverMultistepScheduler}


def make_sampler(train_scheduler: DDPMScheduler, name: str):
    kwargs = {"algorithm_type": "dpmsolver++", "solver_order": 2} if name == "dpmsolver++" else {}
    return SAMPLERS[name].from_config(train_scheduler.config, **kwargs)


def sample_noise(seeds: Sequence[int], shape: tuple[int, ...]) -> torch.Tensor:
    """One independent generator per sample, so any sample can be regenerated alone."""
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds])


@torch.no_grad()
def sample(
    unet: torch.nn.Module,
    train_scheduler: DDPMScheduler,
    class_labels: np.ndarray,
    seeds: Sequence[int],
    null_label: int,
    image_shape: tuple[int, int, int],
    *,
    scheduler: str = "dpmsolver++",
    num_inference_steps: int = 20,
    guidance_scale: float = 1.0,
    strength: float = 1.0,
    init_images: np.ndarray | None = None,
    device: torch.device = torch.device("cpu"),
    mixed_precision: str = "no",
) -> np.ndarray:
    """Class-conditional sampling with classifier-free guidance; image-to-image when strength < 1.

    eps_hat = eps(x_t, null) + w * (eps(x_t, c) - eps(x_t, null)), both halves in one batched call.
    """
    # 1. Timesteps: image-to-image skips the first (1 - strength) share of the trajectory.
    sampler = make_sampler(train_scheduler, scheduler)
    sampler.set_timesteps(num_inference_steps, device=device)
    timesteps = sampler.timesteps
    noise = sample_noise(seeds, image_shape).to(device)
    if strength < 1.0:
        if init_images is None:
            raise ValueError("image-to-image (strength < 1) needs init_images")
        init_steps = min(max(int(round(num_inference_steps * strength)), 1), num_inference_steps)
        t_start = num_inference_steps - init_steps
        timesteps = timesteps[t_start * sampler.order:]
        if hasattr(sampler, "set_begin_index"):
            sampler.set_begin_index(t_start * sampler.order)
        x0 = to_tensor(init_images, device)
        x = sampler.add_noise(x0, noise, timesteps[:1].repeat(len(seeds)))
    else:
        x = noise * sampler.init_noise_sigma

    # 2. Denoise, batching the conditional and unconditional halves.
    labels = torch.tensor(np.asarray(class_labels), dtype=torch.long, device=device)
    guided = guidance_scale != 1.0
    both = torch.cat([labels, torch.full_like(labels, null_label)]) if guided else labels
    for t in timesteps:
        model_in = torch.cat([x, x]) if guided else x
        model_in = sampler.scale_model_input(model_in, t)
        with autocast(device, mixed_precision):
            out = unet(model_in, t, class_labels=both).sample.float()
        if guided:
            cond, uncond = out.chunk(2)
            out = uncond + guidance_scale * (cond - uncond)
        x = sampler.step(out, t, x).prev_sample
    return to_uint8(x)


class EMA:
    """Exponential moving average of a set of parameters (kept in fp32)."""

    def __init__(self, params, decay: float):
        self.params = [p for p in params]
        self.shadow = [p.detach().clone().float() for p in self.params]
        self.decay = decay

    @torch.no_grad()
    def update(self) -> None:
        for s, p in zip(self.shadow, self.params):
            s.lerp_(p.detach().float(), 1.0 - self.decay)

    @torch.no_grad()
    def copy_to(self) -> None:
        for s, p in zip(self.shadow, self.params):
            p.copy_(s.to(p.dtype))

    def state_dict(self) -> dict:
        return {"decay": self.decay, "shadow": self.shadow}

    def load_state_dict(self, state: dict) -> None:
        self.shadow = [s.clone() for s in state["shadow"]]


def lr_lambda(total: int, warmup: int) -> Callable[[int], float]:
    """Linear warmup, then cosine decay to 10% of the peak."""

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        # a Python float: a numpy scalar would land in the scheduler's state and make the resume checkpoint
        # unloadable with weights_only=True (training would silently start over)
        return float(0.1 + 0.9 * 0.5 * (1.0 + np.cos(np.pi * min(1.0, progress))))

    return f
