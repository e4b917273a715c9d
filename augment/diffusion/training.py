"""The one training loop (pretraining and LoRA fine-tuning, of every backend) and the denoising loss.

Notation follows DDPM: x_0 the clean sample in model space (pixels in [-1, 1], or VAE latents), eps noise,
t timestep, alpha_bar_t the cumulative product of (1 - beta), x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t)
eps, v = sqrt(alpha_bar_t) eps - sqrt(1 - alpha_bar_t) x_0.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from augment.diffusion.tensors import autocast
from augment.runfolder import CheckpointFolder, load_state

# denoise(x_t, t) -> the model's prediction (eps or v), conditioning already bound
Denoise = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def diffusion_loss(denoise: Denoise, scheduler, x0: torch.Tensor, generator: torch.Generator,
                   snr_gamma: float | None = None) -> torch.Tensor:
    """Denoising loss at uniformly drawn t, with optional Min-SNR-gamma weighting (Hang et al. 2023)."""
    n = x0.shape[0]
    eps = torch.randn(x0.shape, generator=generator, device=generator.device).to(x0.device)
    t = torch.randint(0, scheduler.config.num_train_timesteps, (n,), generator=generator,
                      device=generator.device).to(x0.device)
    x_t = scheduler.add_noise(x0, eps, t)
    pred = denoise(x_t, t).float()
    if scheduler.config.prediction_type == "v_prediction":
        target = scheduler.get_velocity(x0, eps, t)
    else:
        target = eps
    per_sample = F.mse_loss(pred, target.float(), reduction="none").mean(dim=tuple(range(1, pred.ndim)))
    if snr_gamma is None:
        return per_sample.mean()
    alpha_bar = scheduler.alphas_cumprod.to(x0.device)[t]
    snr = alpha_bar / (1.0 - alpha_bar)
    clipped = torch.clamp(snr, max=snr_gamma)
    weight = clipped / (snr + 1.0) if scheduler.config.prediction_type == "v_prediction" else clipped / snr
    return (weight * per_sample).mean()


class EMA:
    """Exponential moving average of a set of parameters (kept in fp32), with diffusers' decay warmup: step t
    averages with decay min(decay, (1 + t) / (10 + t)), so the random initialization does not linger in the
    average (with a constant 0.999 it still weighed 0.999^3000 = 5% after 3,000 steps, 22% after 1,500)."""

    def __init__(self, params, decay: float):
        self.params = [p for p in params]
        self.shadow = [p.detach().clone().float() for p in self.params]
        self.decay = decay

    @torch.no_grad()
    def update(self, step: int) -> None:
        """Average in the parameters after optimizer step `step` (1-based)."""
        decay = min(self.decay, (1 + step) / (10 + step))
        torch._foreach_lerp_(self.shadow, [p.detach().float() for p in self.params], 1.0 - decay)

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


@dataclass
class LoopSpec:
    """How long and how to train; what to train and on what is the caller's `step_loss`."""

    name: str  # for log lines: "base", "finetune"
    steps: int
    warmup: int
    seed: int
    checkpoint_every: int
    ema_decay: float | None = None
    mixed_precision: str = "no"
    loss_scaling: bool = False  # fp16 weights: scale the loss so small gradients do not underflow (GradScaler)
    clip_norm: float = 1.0
    loss_window: int = 50  # the reported loss is the mean of the last `loss_window` steps


def train_loop(
    params: list[torch.nn.Parameter],
    opt: torch.optim.Optimizer,
    step_loss: Callable[[np.random.Generator, torch.Generator], torch.Tensor],
    spec: LoopSpec,
    ckpt_dir: Path,
    device: torch.device,
    log=print,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[int, float | None]:
    """Train `params` with `opt` for `spec.steps` steps of `step_loss(rng, generator)`.

    Warmup + cosine LR, gradient clipping, optional EMA (copied into the parameters at the end), and a resumable
    checkpoint every `spec.checkpoint_every` steps under `ckpt_dir`: batches come from `rng` and noise from
    `generator`, both restored on resume, so an interrupted run ends with the same weights as an uninterrupted
    one. Returns (steps done, mean loss of the last `spec.loss_window` steps)."""
    # 1. Schedule, EMA, random streams.
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(spec.steps, spec.warmup))
    ema = EMA(params, spec.ema_decay) if spec.ema_decay else None
    gen = torch.Generator().manual_seed(spec.seed)
    rng = np.random.default_rng(spec.seed)
    scaler = torch.amp.GradScaler(device.type, enabled=spec.loss_scaling)  # disabled: every call passes through
    step, losses = 0, []

    # 2. Resume from the last checkpoint of an interrupted run.
    ckpt = CheckpointFolder(ckpt_dir).state
    state = load_state(ckpt, map_location=device, log=log)
    if state is not None and len(state.get("params", ())) == len(params):
        with torch.no_grad():
            for p, v in zip(params, state["params"]):
                p.copy_(v)
        opt.load_state_dict(state["opt"]); sched.load_state_dict(state["sched"])
        if ema: ema.load_state_dict(state["ema"])
        gen.set_state(state["gen"]); rng.bit_generator.state = state["rng"]; step = state["step"]
        losses = list(state["losses"])
        if state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        log(f"{spec.name}: resumed at step {step}")

    # 3. Train.
    while step < spec.steps:
        with autocast(device, spec.mixed_precision):
            loss = step_loss(rng, gen)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.unscale_(opt)  # clip the true gradients
        torch.nn.utils.clip_grad_norm_(params, spec.clip_norm)
        scaler.step(opt); scaler.update(); sched.step(); step += 1
        if ema: ema.update(step)
        losses.append(loss.item())
        if progress:
            progress(step, spec.steps)
        if step % spec.checkpoint_every == 0 and step < spec.steps:
            ckpt.parent.mkdir(parents=True, exist_ok=True)
            torch.save({"params": [p.detach().cpu() for p in params], "opt": opt.state_dict(),
                        "sched": sched.state_dict(), "ema": ema.state_dict() if ema else None,
                        "gen": gen.get_state(), "rng": rng.bit_generator.state, "step": step,
                        "losses": losses, "scaler": scaler.state_dict() if spec.loss_scaling else None},
                       ckpt.with_suffix(".tmp"))
            ckpt.with_suffix(".tmp").replace(ckpt)
            log(f"{spec.name}: step {step}/{spec.steps} loss {np.mean(losses[-spec.loss_window:]):.4f}")
    if ema:
        ema.copy_to()
    return step, (float(np.mean(losses[-spec.loss_window:])) if losses else None)
