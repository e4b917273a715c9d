"""The config sections that judge the samples: classifiers, pseudo-labels, the cross-validated choices, the filter
and the downstream evaluation."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, PrivateAttr, ValidationError, field_validator, model_validator

from augment.arms import ARM_PARTS, Arm
from augment.config.common import AutoPrecision, Section, seed_field
from augment.registry import CLASSIFIERS, FILTERS


class ClassifierConfig(Section):
    """A small CNN (the quality judge and the default downstream model), a scikit-learn estimator on pixels, or a
    pretrained image encoder with a head (augment.encoders)."""

    kind: Literal[CLASSIFIERS.names] = Field(
        "cnn", description="Model family: `cnn` (trained from scratch), `logistic` or `svm` (on pixels), `encoder` "
        "(a pretrained transformers vision model, `backbone`, read by `head`).",
    )
    backbone: str | None = Field(
        None, min_length=1, description="kind encoder: a transformers vision model, a Hub id or a local folder with "
        "config.json, the weights and its image processor (CLIP or SigLIP, the vision tower of a full checkpoint; "
        "DINOv2, ViT, ConvNeXt, ResNet), e.g. facebook/dinov2-small or openai/clip-vit-base-patch16; or `base`: "
        "the run's own builtin base (base.pretrained: builtin, a UNet pretrained on the job's images), its "
        "denoising features at the noise level and block chosen out of fold per training set "
        "(augment/base_encoder.py); a local folder named base: ./base.",
    )
    head: Literal["linear", "lora"] = Field(
        "linear", description="kind encoder: `linear`, a linear probe on the frozen backbone's features, computed "
        "once per image and cached on disk under base.cache_dir/features by content and backbone (the many small "
        "trainings then cost a probe each); `lora`, the backbone tuned with peft LoRA (`lora_rank`) beside the "
        "head, end to end (nothing cached).",
    )
    lora_rank: int = Field(8, ge=1, le=256, description="kind encoder, head lora: rank of the backbone's LoRA.")
    augment_views: int = Field(
        4, ge=1, le=64, description="kind encoder, head linear: classic augmentation on frozen features draws from "
        "this many jittered copies of each image (each copy drawn from the image's own content hash, so that every "
        "training reads the same cached features).",
    )
    width: int = Field(32, ge=4, le=512, description="CNN base width.")
    steps: int = Field(600, ge=1, le=1_000_000, description="CNN optimizer steps.")
    batch_size: int = Field(64, ge=1, le=4096, description="CNN batch size.")
    learning_rate: float = Field(2e-3, gt=0, le=1.0, description="CNN AdamW learning rate.")
    weight_decay: float = Field(1e-4, ge=0, le=1.0, description="CNN AdamW weight decay.")
    dropout: float = Field(0.2, ge=0, lt=1, description="Dropout before the CNN head.")
    augment: bool = Field(True, description="Ordinary augmentation (small affine jitter) while training the CNN.")
    image_size: int | None = Field(
        None, ge=4, le=1024, description="Train and predict on images resized to this size (e.g. 64 for 512 px "
        "photos, so that CPU training stays practical); None = the data's size.",
    )
    mixed_precision: AutoPrecision = Field(
        "auto", description="CNN precision. `auto`: bf16 autocast for images of 16 px and more where the CPU "
        "computes bf16 natively, fp32 below. Measured on 2 cores (10 seeds, real+classic on digits): 16 px 1.31x "
        "faster, accuracy -0.11 pts (95% CI +-0.24); 8 px only 1.09x, so it stays fp32. Weights and the optimizer "
        "stay fp32.",
    )
    # The run's device and cache folder, handed down by RunConfig (not fields: they change no result's meaning and
    # stay out of the section's hashes, its YAML and its form).
    _device: str = PrivateAttr("auto")
    _cache_dir: str = PrivateAttr("outputs/.cache")
    _base: dict | None = PrivateAttr(None)  # backbone base: the run's base (BaseModelInfo), handed down by the stage

    @property
    def device(self) -> str:
        """The device this classifier trains and predicts on: the run's `device`."""
        return self._device

    @property
    def cache_dir(self) -> str:
        """Where an encoder's features are cached: the run's base.cache_dir."""
        return self._cache_dir

    @property
    def base_model(self) -> dict | None:
        """backbone base: the run's base model (augment.results.BaseModelInfo as JSON), once the base stage ran."""
        return self._base

    @model_validator(mode="after")
    def _backbone(self) -> "ClassifierConfig":
        if self.kind == "encoder" and self.backbone is None:
            raise ValueError("kind encoder needs `backbone`: a transformers vision model's Hub id or local folder, "
                             "or `base`")
        if self.backbone == "base" and self.head != "linear":
            raise ValueError(f"backbone base takes head linear (its features are cached), not {self.head}")
        if self.backbone == "base" and self.mixed_precision != "auto":
            raise ValueError(f"backbone base computes its features in fp32; mixed_precision {self.mixed_precision} "
                             "would not be used: leave it auto")
        # Encoder keys away from their defaults (by value, not by being written: a config dumped and read back, as a
        # flow parameter is, writes them all)
        for key, head in (("backbone", None), ("head", None), ("lora_rank", "lora"), ("augment_views", "linear")):
            if getattr(self, key) == type(self).model_fields[key].default:
                continue
            if self.kind != "encoder":
                raise ValueError(f"`{key}` is for kind encoder, not {self.kind}")
            if head is not None and self.head != head:
                raise ValueError(f"`{key}` is for head {head}, not {self.head}")
        return self


class PseudoConfig(Section):
    """Pseudo-labels for the unlabeled pool, from a classifier trained on the labeled train split only; how many is
    chosen out of fold (`per_class`) or by a precision target on validation (`thresholds`), per selection.rule."""

    enabled: bool = Field(True, description="Pseudo-label the unlabeled pool (when the job has one).")
    classifier: ClassifierConfig = Field(default_factory=ClassifierConfig, description="The pseudo-labeler.")
    thresholds: list[float] = Field(
        [0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99], min_length=1,
        description="selection.rule=validation: candidate confidence thresholds; the lowest one that meets "
        "`min_precision` on validation wins.",
    )
    min_precision: float = Field(
        0.98, gt=0, le=1, description="selection.rule=validation: required accuracy of the confident predictions on "
        "the validation split.",
    )
    min_support: int = Field(
        10, ge=1, le=1_000_000, description="selection.rule=validation: a threshold counts only if at least this "
        "many validation images pass it.",
    )
    per_class: list[Annotated[int, Field(ge=1, le=1_000_000)]] = Field(
        [25, 100, 400], min_length=1, description="selection.rule=cross_validation: candidate numbers of pool "
        "images per class (each class's most confident predictions, class-balanced); the best out of fold wins.",
    )
    seed: int = seed_field("Seed of the pseudo-labeler.")

    @model_validator(mode="after")
    def _grid(self) -> "PseudoConfig":
        bad = [t for t in self.thresholds if not 0.0 <= t < 1.0]
        if bad:
            raise ValueError(f"pseudo.thresholds must lie in [0, 1); got {bad}")
        return self


class SelectionConfig(Section):
    """How the run's choices (classic augmentation or not, the pseudo-labeled pool) are made, on labeled data only."""

    rule: Literal["cross_validation", "validation"] = Field(
        "cross_validation", description="`cross_validation`: on out-of-fold scores of every labeled train image "
        "(a choice the data cannot decide falls to the simpler option); `validation`: on the validation split "
        "(`data.val_fraction` > 0 or a validation/ folder; the pseudo rule is then `pseudo.thresholds`).",
    )
    folds: int = Field(5, ge=2, le=20, description="Stratified folds (fewer when a class has fewer images).")
    repeats: int = Field(1, ge=1, le=10, description="Repeats of the k-fold split with other seeds.")
    bootstrap: int = Field(2000, ge=100, le=100_000, description="Bootstrap resamples (over images) of a choice's "
                           "paired out-of-fold difference.")
    confidence: float = Field(
        0.8, ge=0.5, lt=1.0, description="Level of the interval a choice reads: the richer option wins when the "
        "interval lies above 0 (0.8: 90% one-sided). Lower than the report's 95% for claims: a choice needs a "
        "lean, a claim needs proof.",
    )
    model: ClassifierConfig = Field(
        default_factory=lambda: ClassifierConfig(augment=False, steps=400),
        description="The classifier trained on each fold (keep it equal to evaluation.model).",
    )
    synthetic_holdout: float = Field(
        0.2, ge=0.0, le=0.5, description="Share of each class's labeled images kept from everything the generator "
        "learns from (base pretraining, fine-tuning, img2img sources, the feedback classifier), on which the choose "
        "stage judges whether the synthetic data goes into the product (at least one image per class stays with "
        "the generator). 0 = no such choice: the product always takes the synthetic data. Folds over images the "
        "generator saw would judge its copies of them (augment.selection).",
    )
    synthetic_seeds: int = Field(3, ge=1, le=20, description="Paired training seeds of each option of the "
                                 "synthetic choice.")
    seed: int = seed_field("Seed of the folds, the fold classifiers, the holdout and the bootstrap.")


class FilterConfig(Section):
    order: list[Literal[FILTERS.names]] = Field(
        ["class_consistency", "alia", "memorization", "near_duplicates"],
        description="Filters to apply, in order; drop one to switch it off, add `quota` to cap or balance classes.",
    )
    quality_classifier: ClassifierConfig = Field(default_factory=ClassifierConfig)
    min_confidence: Annotated[float, Field(ge=0, le=1)] | Literal["1/K"] = Field(
        0.5, description="Class consistency: keep if p(intended class) > this (a probability in [0, 1]); `1/K` = "
        "chance level."
    )
    alia_folds: int = Field(5, ge=2, le=20, description="Folds for the out-of-fold ALIA thresholds.")
    alia_reject: list[Literal["too_easy", "mislabeled"]] = Field(
        ["mislabeled"], description="Which ALIA outcomes reject a sample."
    )
    memorization_space: Literal["features", "pixels"] = Field("pixels", description="Space for near-copy checks.")
    max_similarity: float = Field(0.99, gt=0, le=1.0, description="Reject candidates this similar to a train image.")
    duplicate_similarity: float = Field(0.995, gt=0, le=1.0, description="Candidates this similar are duplicates.")
    max_per_class: int | None = Field(None, ge=1, le=100_000_000,
                                      description="Quota: keep at most this many per class.")
    balance_classes: bool = Field(True, description="Quota: keep the same count for every class (the minimum).")
    seed: int = seed_field("Seed of the quality classifier.")

    @field_validator("min_confidence", mode="wrap")
    @classmethod
    def _probability_or_chance(cls, v, handler):
        """One message for both forms (a union reports one per form, which read as two problems)."""
        try:
            return handler(v)
        except ValidationError:
            raise ValueError("must be a probability in [0, 1] or 1/K (chance level)") from None




class EvaluationConfig(Section):
    arms: Literal["auto"] | list[str] = Field(
        "auto", min_length=1,
        description="Downstream training sets. `auto` = the protocol: real, real+classic, the recipe + pseudo "
        "(with a pool), the recipe + synthetic for both recipes, the recipe + pseudo + synthetic, unfiltered "
        "synthetic and synthetic only. Or a list of names joined with `+` from: " + ", ".join(ARM_PARTS) + ".",
    )
    recipe: Literal["auto", "classic", "none"] = Field(
        "auto", description="The team's own training recipe that synthetic data is added to: `classic` "
        "augmentation or `none`; `auto` chooses between real and real+classic by `selection.rule`.",
    )
    seeds: int = Field(10, ge=1, le=100, description="Training seeds per arm (paired across arms).")
    diagnostic_seeds: int | None = Field(
        5, ge=1, le=100, description="Seeds of the diagnostic arms (unfiltered synthetic, synthetic only, each "
        "filter alone): the first N of `seeds`; the verdict's arms always get all of them. None = all.",
    )
    model: ClassifierConfig = Field(
        default_factory=lambda: ClassifierConfig(augment=False, steps=400),
        description="Downstream classifier; `augment` is ignored (arms with `classic` switch augmentation on). "
        "It trains 400 steps by default (the filter's and the pseudo-labeler's CNNs 600; docs/speed.md).",
    )
    synthetic_prob: list[float] = Field(
        [0.25, 0.5], min_length=1, max_length=8,
        description="Mixing: each training example is synthetic with this probability (DA-Fusion-style), whatever "
        "the sizes of the real and synthetic sets. The candidates: under selection.rule=cross_validation (with "
        "`arms: auto` and selection.synthetic_holdout > 0) the choose stage picks one of them on labeled images "
        "the generator never saw, or leaves synthetic data out of the product when none beats the recipe alone; "
        "otherwise the first. One number is a list of one. Each in (0, 1].",
    )
    split: Literal["test", "validation"] = Field(
        "test", description="Split the arms are scored on. `validation` is for choosing settings (benchmarks); "
        "the report of a product run uses `test`, which nothing else touches. Choices made inside the run "
        "(recipe, pseudo-labels) follow `selection.rule` and never read test.",
    )
    filter_ablation: bool = Field(
        True, description="Also train on the synthetic sets that each filter alone would keep (with the recipe).",
    )
    diagnostic_arms: bool = Field(
        True, description="Also train on unfiltered synthetic data (what the filter is worth), on synthetic "
        "data only (the Classification Accuracy Score) and the plain pair that is not the recipe's (real+synthetic "
        "when the recipe is real+classic, and the reverse), on `diagnostic_seeds` seeds.",
    )
    seed: int = seed_field("First training seed; seeds are seed, seed+1, ...")

    @field_validator("synthetic_prob", mode="before")
    @classmethod
    def _one_prob(cls, v):
        return [v] if isinstance(v, (int, float, str)) and not isinstance(v, bool) else v

    @field_validator("synthetic_prob")
    @classmethod
    def _probs(cls, v):
        bad = [p for p in v if not 0 < p <= 1]
        if bad:
            raise ValueError(f"every mixing probability must lie in (0, 1]; got {bad}")
        return v

    @field_validator("arms")
    @classmethod
    def _arms(cls, arms):
        """Each arm valid, and named in the canonical order of its parts (`classic+real` is `real+classic`)."""
        if arms == "auto":
            return arms
        names = [Arm.of(a).name for a in arms]
        twice = next((n for i, n in enumerate(names) if n in names[:i]), None)
        if twice:  # it would train and report the same arm twice
            raise ValueError(f"lists the arm {twice} twice (`classic+real` and `real+classic` are the same arm)")
        return names
