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

from pydantic import BaseModel, ConfigDict

from augment.arms import Verdict
from augment.results import (AdapterInfo, ArmResult, BaseModelInfo, Choice, ClassFilter, DataSummary, Difference,
                             FilterGain, Gain, Interval, PseudoFacts, QualityClassifier, RecordError, Selection,
                             SplitRows, Summary, ThresholdRow, TrainSizes, parse)

# the stages' models the file is built from (augment.results), by the names the report's modules import
__all__ = ["ArmResult", "Choice", "ClassFilter", "DataFacts", "Difference", "FilterGain", "Gain", "Interval",
           "Pseudo", "Selection", "SplitRows", "Summary", "ThresholdRow", "TrainSizes", "Metrics", "MetricsError",
           "read_metrics", "validate_metrics"]
Pseudo, DataFacts = PseudoFacts, DataSummary

SCHEMA_VERSION = 1


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# -- run, data, generation, filter ---------------------------------------------------------------------------------
class BaseModelFacts(BaseModelInfo):
    """The base as run.json recorded it; stages run one by one (no pipeline.walk) record none, so none is needed."""

    path: str | None = None
    description: str = ""
    fingerprint: str = ""


class AdapterFacts(AdapterInfo):
    """The adapter as run.json recorded it (none when the stages ran one by one)."""

    path: str | None = None
    adapter_hash: str = ""
    train_seconds: float | None = None
    final_loss: float | None = None
    steps: int | None = None


class ClassifierFacts(_Model):
    kind: str
    backbone: str | None
    head: str | None


class RunFacts(_Model):
    name: str
    output_dir: str
    config_hash: str
    stage_seconds: dict[str, float | None]
    total_seconds: float | None
    versions: dict[str, str]
    cpu: str | None
    device: str | None = None  # the torch device the stages ran on (recorded since issue 36)
    base_model: BaseModelFacts
    adapter: AdapterFacts
    evaluation_seeds: list[int]
    # seconds of fine-tuning of the adaptations trained beside the LoRA (lora.adaptations), when any was listed
    adaptation_seconds: dict[str, float] = {}
    # each classifier section's model, when some section is a pretrained encoder (kind, backbone, head)
    classifiers: dict[str, ClassifierFacts] = {}


class Generation(_Model):
    generated: int
    kept: int
    per_class: list[ClassFilter]
    scheduler: str
    num_inference_steps: int
    precision: str
    guidance_scale: float
    strengths: list[float]


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
class DatasetFacts(_Model):
    path: str
    splits: dict[str, SplitRows]


class Metrics(_Model):
    """metrics.json."""

    schema_version: Literal[1]
    run: RunFacts
    data: DataSummary
    generation: Generation
    filter: FilterFacts
    evaluation: Evaluation
    pseudo: PseudoFacts | None
    product_arm: str | None
    gain_over_best_baseline: HeadlineGain | None
    dataset: DatasetFacts

    def to_json(self) -> dict:
        """metrics.json's JSON, as the file holds it (the fields the file set, by the names it spells)."""
        return self.model_dump(mode="json", by_alias=True, exclude_unset=True)


class MetricsError(RecordError):
    """A metrics.json that does not follow the schema (written by another version, or edited)."""


def validate_metrics(raw: dict, origin: str = "metrics") -> Metrics:
    return parse(Metrics, raw, origin, MetricsError)


def read_metrics(path: str | Path) -> Metrics | None:
    """A run folder's metrics.json, validated; None when it is missing or not JSON. Raises MetricsError when it is
    JSON that does not follow the schema."""
    try:
        raw = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return validate_metrics(raw, str(path))
