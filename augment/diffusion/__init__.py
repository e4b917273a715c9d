"""Diffusion shared by every backend: the one training loop (training.py), sampling (sampling.py: denoiser +
sampler + guidance), and image/tensor conversions (tensors.py)."""

from augment.diffusion.guidance import classifier_free, feedback_guided
from augment.diffusion.sampling import make_sampler, sample, sample_noise
from augment.diffusion.tensors import autocast, to_tensor, to_uint8
from augment.diffusion.training import EMA, LoopSpec, diffusion_loss, lr_lambda, train_loop

__all__ = ["EMA", "LoopSpec", "autocast", "classifier_free", "diffusion_loss",
           "feedback_guided", "lr_lambda", "make_sampler", "sample", "sample_noise", "to_tensor", "to_uint8",
           "train_loop"]
