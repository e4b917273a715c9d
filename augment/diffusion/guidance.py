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
