"""Guidance: how the conditional and unconditional predictions combine. One signature:
`guide(denoise, x, t, labels, null_label) -> prediction`, where `denoise(x, t, labels)` is the backend's model."""

from __future__ import annotations

from collections.abc import Callable

import torch

# denoise(x_t, t, labels) -> prediction; labels are class indices, `null_label` the unconditional one
LabelDenoise = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def classifier_free(scale: float) -> Callable:
    """eps_hat = eps(x_t, null) + w * (eps(x_t, c) - eps(x_t, null)), both halves in one batched call
    (Ho & Salimans 2022). w = 1 is the plain conditional model and costs one call."""

    def guide(denoise: LabelDenoise, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor,
              null_label: int) -> torch.Tensor:
        if scale == 1.0:
            return denoise(x, t, labels).float()
        both = torch.cat([labels, torch.full_like(labels, null_label)])
        cond, uncond = denoise(torch.cat([x, x]), t, both).float().chunk(2)
        return uncond + scale * (cond - uncond)

    return guide


def entropy(logp: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Feedback criterion `entropy`: the entropy of the prediction (samples the classifier finds ambiguous)."""
    return -(logp.exp() * logp).sum(1)


def intended_loss(logp: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Feedback criterion `loss`: the cross-entropy of the intended class (samples of the class it finds hard)."""
    return -logp.gather(1, labels.view(-1, 1)).squeeze(1)


def feedback_guided(guide: Callable, classifier: torch.nn.Module, scale: float, criterion: str,
                    alphas_cumprod: torch.Tensor) -> Callable:
    """Feedback-guided sampling (Askari-Hemmat et al., "Feedback-guided Data Synthesis for Imbalanced
    Classification", TMLR 2024): besides `guide`'s noise prediction eps, every step climbs a classifier's criterion
    on the predicted clean image x0 = (x_t - sqrt(1 - a_t) eps) / sqrt(a_t), which steers samples toward what the
    classifier has not learned yet while the model keeps them near the data. `criterion` is a name in
    augment.registry.FEEDBACK_CRITERIA (`entropy`, `loss`). The gradient goes through x0 with eps held fixed (one
    classifier forward and backward per step, not one through the denoiser), and enters as a score:
    eps' = eps - scale * sqrt(1 - a_t) * grad. `classifier` maps model-space images ([-1, 1] pixels, NCHW) to
    logits; `scale` 0 is `guide` itself."""
    from augment.registry import FEEDBACK_CRITERIA

    value_of = FEEDBACK_CRITERIA.load(criterion)
    if scale == 0:
        return guide

    def guided(denoise: LabelDenoise, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor,
               null_label: int) -> torch.Tensor:
        eps = guide(denoise, x, t, labels, null_label)
        a = alphas_cumprod[int(t)].to(device=x.device, dtype=torch.float32)
        with torch.enable_grad(), torch.autocast(x.device.type, enabled=False):
            xg = x.detach().float().requires_grad_(True)
            x0 = (xg - (1 - a).sqrt() * eps.detach()) / a.sqrt()
            # Pixels the prediction pushes past [-1, 1] (guided backgrounds do) are what decoding clips: no
            # gradient there.
            logp = torch.log_softmax(classifier(x0.clamp(-1, 1)).float(), dim=1)
            (grad,) = torch.autograd.grad(value_of(logp, labels).sum(), xg)
        return eps - scale * (1 - a).sqrt() * grad

    return guided
