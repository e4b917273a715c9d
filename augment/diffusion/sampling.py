"""Sampling: a denoiser (the backend's model), a sampler (a diffusers scheduler) and a guidance rule, each with one
signature, so a backend brings only its denoiser and its encode/decode.

Every sample has its own seed and its own generator: its starting noise does not depend on which batch it lands
in, so any sample can be regenerated alone.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

from augment.diffusion.guidance import LabelDenoise, classifier_free
from augment.diffusion.tensors import autocast

def ddim(train_scheduler) -> DDIMScheduler:
    """DDIM on the model's noise schedule. It never clips its predicted x_0: with guidance the guided prediction
    leaves [-1, 1] on purpose, and clipping it (the builtin base's DDPM config says clip_sample) derailed sampling:
    3% class consistency at guidance 4 against 100% unclipped (benchmarks/speed.py found it). Latents must never be
    clipped either."""
    return DDIMScheduler.from_config(train_scheduler.config, clip_sample=False)


def dpm_solver(train_scheduler) -> DPMSolverMultistepScheduler:
    """DPM-Solver++ (2nd order, multistep) on the model's noise schedule."""
    return DPMSolverMultistepScheduler.from_config(train_scheduler.config, algorithm_type="dpmsolver++",
                                                   solver_order=2)


def make_sampler(train_scheduler, name: str):
    """The sampler registered as `name` (augment.registry.SAMPLERS), on the noise schedule the model was trained
    with."""
    from augment.registry import SAMPLERS

    return SAMPLERS.load(name)(train_scheduler)


def generators(seeds: Sequence[int]) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(int(s)) for s in seeds]


def sample_noise(seeds: Sequence[int], shape: tuple[int, ...]) -> torch.Tensor:
    """One independent generator per sample, so any sample can be regenerated alone."""
    return torch.stack([torch.randn(shape, generator=g) for g in generators(seeds)])


@torch.no_grad()
def sample(
    denoise: LabelDenoise,
    train_scheduler,
    labels: torch.Tensor,
    seeds: Sequence[int],
    null_label: int,
    shape: tuple[int, ...],
    *,
    scheduler: str = "dpmsolver++",
    num_inference_steps: int = 20,
    guide: Callable | None = None,
    eta: float = 0.0,
    strength: float = 1.0,
    init: torch.Tensor | None = None,
    device: torch.device = torch.device("cpu"),
    mixed_precision: str = "no",
) -> torch.Tensor:
    """Draw samples in model space (pixels or latents) of per-sample `shape`; image-to-image from `init` (model
    space, one per sample) when strength < 1. With `eta` > 0 (DDIM) every step adds fresh noise, drawn from each
    sample's own generator: a sample regenerated alone from its seed is the same as in any batch."""
    guide = guide or classifier_free(1.0)
    # 1. Timesteps: image-to-image skips the first (1 - strength) share of the trajectory.
    sampler = make_sampler(train_scheduler, scheduler)
    sampler.set_timesteps(num_inference_steps, device=device)
    timesteps = sampler.timesteps
    gens = generators(seeds)
    noise = torch.stack([torch.randn(shape, generator=g) for g in gens]).to(device)
    if strength < 1.0:
        if init is None:
            raise ValueError("image-to-image (strength < 1) needs init images")
        init_steps = min(max(int(round(num_inference_steps * strength)), 1), num_inference_steps)
        t_start = num_inference_steps - init_steps
        timesteps = timesteps[t_start * sampler.order:]
        if hasattr(sampler, "set_begin_index"):
            sampler.set_begin_index(t_start * sampler.order)
        x = sampler.add_noise(init.to(device), noise, timesteps[:1].repeat(len(seeds)))
    else:
        x = noise * sampler.init_noise_sigma

    # 2. Denoise.
    labels = labels.to(device)
    for t in timesteps:
        with autocast(device, mixed_precision):
            out = guide(lambda x_in, t_in, y: denoise(sampler.scale_model_input(x_in, t_in), t_in, y),
                        x, t, labels, null_label)
        step_kw = {}
        if eta > 0:
            step_kw = {"eta": eta, "variance_noise": torch.stack([torch.randn(shape, generator=g) for g in gens]).to(device)}
        x = sampler.step(out, t, x, **step_kw).prev_sample
    return x
