"""The schema of metrics.json as pydantic models: what the report reads, validated when it is assembled and when a
finished run's metrics.json is read back (`read_metrics`). Every model forbids fields it does not declare, so a
stage that writes a new number has to declare it here first; the field names are those of the file (the report's
page in docs/ describes what each one means).

Choices and arms appear in several shapes (cross-validated or on the validation split; skipped or run): their
models declare every field of every shape, the ones a shape lacks as None.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from augment.arms import Verdict

SCHEMA_VERSION = 1


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# -- statistics (augment.stats) ------------------------------------------------------------------------------------
class Summary(_Model):
    """Mean, sample std and a Student-t interval of the mean over seeds (null bounds with one seed)."""

    mean: float
    std: float
    n: int
    ci_low: float | None
    ci_high: float | None
    confidence: float


class Difference(Summary):
    """A paired difference (same seeds), with its p-value, the differences themselves and a verdict."""

    p_value: float | None
    differences: list[float]
    verdict: Verdict


class FilterGain(Difference):
    arm: str
    against: str


class HeadlineGain(_Model):
    """The product against the best baseline: the report's verdict (a Difference without its confidence)."""

    mean: float
    std: float
    n: int
    ci_low: float | None
    ci_high: float | None
    p_value: float | None
    differences: list[float]
    verdict: Verdict
    baseline: str | None
    product_arm: str | None


class Gain(_Model):
    accuracy: Difference
    macro_f1: Difference


class Interval(_Model):
    """An out-of-fold paired difference: mean over images and a bootstrap interval at `confidence`."""

    mean: float
    ci_low: float
    ci_high: float
    confidence: float = 0.95


# -- run, data, generation, filter ---------------------------------------------------------------------------------
class BaseModelFacts(_Model):
    """The base stage's BaseModelInfo (augment.backends)."""

    path: str | None = None
    subfolder: str | None = None
    description: str = ""
    fingerprint: str = ""
    pretrain_seconds: float = 0.0
    final_loss: float | None = None
    kind: str = "pixel"
    revision: str | None = None
    reference: str = ""


class AdapterFacts(_Model):
    """Fine-tuning's AdapterInfo (augment.finetune)."""

    path: str | None = None
    adapter_hash: str = ""
    train_seconds: float | None = None
    final_loss: float | None = None
    steps: int | None = None
    labeled_images: int | None = None
    pseudo_labeled_images: int | None = None


class RunFacts(_Model):
    name: str
    output_dir: str
    config_hash: str
    stage_seconds: dict[str, float | None]
    total_seconds: float | None
    versions: dict[str, str]
    cpu: str | None
    base_model: BaseModelFacts
    adapter: AdapterFacts
    evaluation_seeds: list[int]


class Duplicate(_Model):
    split: str
    id: str
    copy_of: str


class Duplicates(_Model):
    count: int
    action: str
    examples: list[Duplicate]


class Skipped(_Model):
    count: int
    reasons: dict[str, int]
    examples: list[str]


class DataFacts(_Model):
    class_names: list[str]
    image_shape: list[int]
    train_size: int
    validation_size: int
    test_size: int
    pool_size: int
    train_class_counts: list[int]
    validation_class_counts: list[int]
    test_class_counts: list[int]
    duplicates_across_splits: Duplicates
    skipped: Skipped
    fingerprint: str
    source: str


class ClassGeneration(_Model):
    class_: str = Field(alias="class")
    generated: int
    kept: int
    rejected: dict[str, int]


class Generation(_Model):
    generated: int
    kept: int
    per_class: list[ClassGeneration]
    scheduler: str
    num_inference_steps: int
    precision: str
    guidance_scale: float
    strengths: list[float]


class QualityClassifier(_Model):
    kind: str
    validation_accuracy: float | None
    validation_size: int


class Memorization(_Model):
    threshold: float
    kept_fraction_above: float | None
    kept_median: float | None
    train_to_train_median: float | None
    train_to_train_fraction_above: float | None
    threshold_rule: str


class FilterFacts(_Model):
    order: list[str]
    quality_classifier: QualityClassifier
    alia_thresholds: list[float | None]
    alia_oof_accuracy: float | None
    memorization: dict[str, Memorization]  # by space: the gate's (pixels or features) first, then the other


# -- evaluation ----------------------------------------------------------------------------------------------------
class TrainSizes(_Model):
    real: int
    synthetic: int


class ArmResult(_Model):
    """One arm over its seeds, or why it was skipped (then only `skipped`)."""

    skipped: str | None = None
    accuracy: Summary | None = None
    macro_f1: Summary | None = None
    per_seed_accuracy: list[float] = []
    per_seed_macro_f1: list[float] = []
    per_seed_validation_accuracy: list[float | None] = []
    per_class_accuracy: list[float] = []
    confusion: list[list[int]] = []
    train_sizes: TrainSizes | None = None

    @property
    def ran(self) -> bool:
        return self.accuracy is not None


class Choice(_Model):
    """One choice (recipe, pseudo-labeled pool, synthetic data): cross-validated (augment.selection.Decision and
    what its stage adds), made on the validation split, or skipped."""

    skipped: str | None = None
    rule: str | None = None
    chosen: str | None = None
    # cross-validated
    name: str | None = None
    options: list[str] | None = None
    oof_accuracy: dict[str, float] | None = None
    oof_score: dict[str, float] | None = None
    best: str | None = None
    decided: bool | None = None
    difference: Interval | None = None
    images: int | None = None
    folds: int | None = None
    repeats: int | None = None
    reason: str | None = None
    # the pseudo-labeled pool
    in_recipe: bool | None = None
    per_class: int | None = None
    per_class_oof_accuracy: dict[str, float] | None = None
    per_class_oof_score: dict[str, float] | None = None
    validation_accuracy_without: float | None = None
    validation_accuracy_with: float | None = None
    # the recipe on the validation split
    validation_accuracy: dict[str, float | None] | None = None
    # the synthetic data, on labeled images the generator never saw
    synthetic_prob: float | None = None
    in_product: bool | None = None
    samples: int | None = None
    generator_images: int | None = None
    holdout: int | None = None

    @property
    def cross_validated(self) -> bool:
        return self.oof_accuracy is not None


class Selection(_Model):
    recipe: Choice | None = None
    pseudo: Choice | None = None
    synthetic: Choice | None = None


class Evaluation(_Model):
    model: str
    synthetic_prob: float
    split: str
    arms: dict[str, ArmResult]
    product_arm: str | None
    recipe: str | None
    product_recipe: str | None
    selection: Selection
    baselines: list[str]
    best_baseline: str | None
    gains: dict[str, Gain] | None
    synthetic_adds: dict[str, Gain]
    per_class_delta: dict[str, list[float]] | None
    filter_gain: FilterGain | None
    filter_ablation: dict[str, ArmResult]


# -- pseudo-labels, dataset, the whole file ------------------------------------------------------------------------
class ThresholdRow(_Model):
    threshold: float
    validation_support: int
    validation_precision: float | None
    validation_coverage: float
    meets_rule: bool


class Pseudo(_Model):
    rule: str | None
    threshold: float | None
    count: int | None
    pool_size: int | None
    per_class: list[int] | None
    thresholds: list[ThresholdRow] | None
    validation_accuracy: float | None
    min_precision: float | None
    reason: str | None
    per_class_amount: int | None
    labeled_images: int | None
    folds: int | None
    repeats: int | None
    labeler_oof_accuracy: float | None
    labeler_oof_per_class: list[float] | None


class SplitRows(_Model):
    rows: int
    synthetic: int
    pseudo_labeled: int = 0


class DatasetFacts(_Model):
    path: str
    splits: dict[str, SplitRows]


class Metrics(_Model):
    """metrics.json."""

    schema_version: Literal[1]
    run: RunFacts
    data: DataFacts
    generation: Generation
    filter: FilterFacts
    evaluation: Evaluation
    pseudo: Pseudo | None
    product_arm: str | None
    gain_over_best_baseline: HeadlineGain | None
    dataset: DatasetFacts


class MetricsError(ValueError):
    """A metrics.json that does not follow the schema (written by another version, or edited)."""


def validate_metrics(raw: dict, origin: str = "metrics") -> Metrics:
    try:
        return Metrics.model_validate(raw)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise MetricsError(f"{origin}: {where}: {first['msg']} ({err.error_count()} problem(s); the schema is "
                           "augment.report.schema.Metrics)") from None


def read_metrics(path: str | Path) -> Metrics | None:
    """A run folder's metrics.json, validated; None when it is missing or not JSON. Raises MetricsError when it is
    JSON that does not follow the schema."""
    try:
        raw = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return validate_metrics(raw, str(path))
