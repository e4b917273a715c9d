"""The names of augment's interchangeable parts, and where each lives: a leaf module (it imports nothing of
augment), so the config can offer the names as choices without importing the parts, and a part's module can
import the config without a cycle.

Every registry maps a name to "module:attribute", imported on first use (`load`), so `augment --help` and config
validation stay torch-free. A new part is one entry here plus its function or class; the config's choices follow,
and tests/test_registry.py runs the conformance suite of its registry on it. Each registry's entries share one
signature:

- BACKENDS: a class with the Backend protocol (augment.backends.Backend), built as
  `cls(cfg: BaseModelConfig, class_names, image_size, channels, device)`.
- BACKEND_DETECTORS (`base.kind: auto`), by backend name: `detects(index: dict | None, pretrained: str) -> bool`,
  torch-free, given the checkpoint's parsed model_index.json (augment.backends.detect). `auto` asks them in order
  and takes FALLBACK_BACKEND when none answers True.
- DATA_SOURCES (`data.kind`): `load(cfg: DataConfig) -> ImageSet`, reading `cfg.source`.
- CLASSIFIERS (`*.classifier.kind`, `evaluation.model.kind`): `train(cfg: ClassifierConfig, images, labels,
  num_classes, seed, augment, flip, synthetic, synthetic_prob) -> TrainedClassifier`, images at their final size.
- SAMPLERS (`generation.scheduler`): `make(train_scheduler) -> diffusers scheduler` on the model's noise schedule.
- FEEDBACK_CRITERIA (`generation.feedback_criterion`): `value(log_probs (N, K), labels (N,)) -> (N,)`, the
  per-sample quantity feedback-guided sampling climbs.
- FILTERS (`filter.order`): `fn(scored: Scored, alive: bool mask, cfg: FilterConfig) -> (reject mask, reasons)`,
  rejecting only alive rows, with a non-empty reason exactly where it rejects.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Iterator

_NAME = re.compile(r"[a-z0-9][a-z0-9_+\-]*")


class Registry:
    """Names of one kind of part -> "module:attribute". Names are checked when they are added: unique, and
    lower-case words (letters, digits, `_`, `-`, `+`), since they are written in YAML configs."""

    def __init__(self, kind: str, entries: dict[str, str]):
        self.kind = kind
        self._targets: dict[str, str] = {}
        for name, target in entries.items():
            self.add(name, target)

    def add(self, name: str, target: str) -> None:
        if name in self._targets:
            raise ValueError(f"{self.kind} {name!r} is registered already (as {self._targets[name]})")
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise ValueError(f"{self.kind} name {name!r}: use lower-case letters, digits, '_', '-' or '+'")
        module, _, attribute = target.partition(":")
        if not module or not attribute:
            raise ValueError(f"{self.kind} {name!r}: target {target!r} is not 'module:attribute'")
        self._targets[name] = target

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self._targets)

    def target(self, name: str) -> str:
        if name not in self._targets:
            raise ValueError(f"unknown {self.kind} {name!r}; known: {', '.join(self._targets)}")
        return self._targets[name]

    def load(self, name: str):
        """The registered function or class (its module is imported now)."""
        module, _, attribute = self.target(name).partition(":")
        return getattr(importlib.import_module(module), attribute)

    def __contains__(self, name: object) -> bool:
        return name in self._targets

    def __iter__(self) -> Iterator[str]:
        return iter(self._targets)

    def __len__(self) -> int:
        return len(self._targets)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {self._targets!r})"


BACKENDS = Registry("backend", {
    "pixel": "augment.backends.pixel_unet:PixelBackend",
    "stable_diffusion": "augment.backends.stable_diffusion:StableDiffusionBackend",
    "sdxl": "augment.backends.sdxl:StableDiffusionXLBackend",
    "flux": "augment.backends.flux:FluxBackend",
    "sd3": "augment.backends.sd3:StableDiffusion3Backend",
})

BACKEND_DETECTORS = Registry("backend detector", {
    "stable_diffusion": "augment.backends.detect:stable_diffusion",
    "sdxl": "augment.backends.detect:sdxl",
    "flux": "augment.backends.detect:flux",
    "sd3": "augment.backends.detect:sd3",
})
FALLBACK_BACKEND = "pixel"  # UNet checkpoints and the builtin base: what `auto` takes when no detector claims one

DATA_SOURCES = Registry("data source", {
    "sklearn-digits": "augment.data.sources:load_sklearn_digits",
    "imagefolder": "augment.data.sources:load_imagefolder",
    "manifest": "augment.data.sources:load_manifest",
    "hf": "augment.data.sources:load_hf",
})

CLASSIFIERS = Registry("classifier", {
    "cnn": "augment.classifier:train_cnn",
    "logistic": "augment.classifier:train_sklearn",
    "svm": "augment.classifier:train_sklearn",
    "encoder": "augment.probes:train_encoder",
})

SAMPLERS = Registry("sampler", {
    "ddim": "augment.diffusion.sampling:ddim",
    "dpmsolver++": "augment.diffusion.sampling:dpm_solver",
})

FEEDBACK_CRITERIA = Registry("feedback criterion", {
    "entropy": "augment.diffusion.guidance:entropy",
    "loss": "augment.diffusion.guidance:intended_loss",
})

FILTERS = Registry("filter", {
    "class_consistency": "augment.filters:class_consistency",
    "alia": "augment.filters:alia",
    "memorization": "augment.filters:memorization",
    "near_duplicates": "augment.filters:near_duplicates",
    "quota": "augment.filters:quota",
})
