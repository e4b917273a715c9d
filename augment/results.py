"""What the stages record, typed: each stage's result as a pydantic model that its run-folder file holds, saved and
loaded here (`save`, `load`), and the statistics they carry. The report's metrics.json (augment.report.schema) is
built from these.

Every model forbids fields it does not declare, so a stage that records a new number declares it here first. A
record keeps exactly the fields its stage set: `save` writes those (`exclude_unset`), so a record read and saved
again is the same JSON. Torch-free: the CLI, the report and the flow read these without loading a model.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from augment.arms import Verdict
from augment.errors import UserError


class Record(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    def to_json(self) -> dict:
        """The fields the stage set, as JSON values (enums as their text, aliases as the file spells them)."""
        return self.model_dump(mode="json", exclude_unset=True, by_alias=True)


class RecordError(UserError, ValueError):
    """A stage's record that does not follow its model (written by another version, or edited)."""


R = TypeVar("R", bound=Record)


def save(path: str | Path, record: Record) -> None:
    """Write a stage's record atomically (augment.runfolder.write_json)."""
    from augment.runfolder import write_json

    write_json(path, record.to_json())


def parse(model: type[R], raw, origin: str, error: type[ValueError] = RecordError) -> R:
    """`raw` (a dict a stage wrote) as `model`; `error` naming the first field that does not fit."""
    try:
        return model.model_validate(raw)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "(the whole record)"
        raise error(f"{origin}: {where}: {first['msg']} ({err.error_count()} problem(s); the schema is "
                    f"{model.__module__}.{model.__qualname__})") from None


def load(path: str | Path, model: type[R], default: R | None = None) -> R | None:
    """A stage's record from the run folder; `default` when the file is missing or not JSON (an interrupted write of
    an older version). Raises RecordError when it is JSON that does not follow `model`."""
    try:
        raw = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return default
    return parse(model, raw, str(path))


class Info(Record):
    """A result handed to later stages and recorded whole in run.json (defaults included)."""

    def to_json(self) -> dict:
        return self.model_dump(mode="json")


# -- the data stage (RunFolder.data.summary) ------------------------------------------------------------------------
class Duplicate(Record):
    split: str
    id: str
    copy_of: str


class Duplicates(Record):
    count: int
    action: str
    examples: list[Duplicate]


class Skipped(Record):
    count: int
    reasons: dict[str, int]
    examples: list[str]


class DataSummary(Record):
    """The splits: sizes and class counts, what was skipped or duplicated, and the data's fingerprint (the data
    stage's identity)."""

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


# -- the base and fine-tuning stages: what they hand to the stages after them ----------------------------------------
class BaseModelInfo(Info):
    """What the base stage hands to fine-tuning: where the base is and what it is."""

    path: str  # a folder (the builtin cache entry, a local checkpoint) or a hub id
    subfolder: str | None = None
    description: str
    fingerprint: str
    pretrain_seconds: float = 0.0
    final_loss: float | None = None
    kind: str = "pixel"
    revision: str | None = None
    reference: str = ""  # what a published row names as its base: a builtin base's description, or ref[@revision]

    @property
    def name(self) -> str:
        """How provenance, cards and generated rows name this base."""
        return self.reference or self.description


class AdapterInfo(Info):
    """What fine-tuning hands to generation: the adapter's folder and content hash (its identity). `path` is where
    it was written, as typed; readers take the adapter from the run folder they are given (the folder may have been
    copied or moved since)."""

    path: str
    adapter_hash: str
    train_seconds: float
    final_loss: float | None
    steps: int
    labeled_images: int = 0
    pseudo_labeled_images: int = 0


# -- the generate stage (RunFolder.candidates.done) ----------------------------------------------------------------
class GenerationRecord(Record):
    """The candidates are complete: how many, in how long, and the precision sampling resolved to on this machine
    ("no": fp32, or "bf16"; reproducing a sample exactly needs it). Runs from before the record have none."""

    samples: int
    seconds: float
    precision: str | None = None


# -- statistics (augment.stats) ------------------------------------------------------------------------------------
class Summary(Record):
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


class Gain(Record):
    accuracy: Difference
    macro_f1: Difference


class Interval(Record):
    """An out-of-fold paired difference: mean over images and a bootstrap interval at `confidence`."""

    mean: float
    ci_low: float
    ci_high: float
    confidence: float = 0.95


# -- the pseudo stage (RunFolder.pseudo: summary, selection), the choose stage (RunFolder.choice.decision) --------
class ThresholdRow(Record):
    threshold: float
    validation_support: int
    validation_precision: float | None
    validation_coverage: float
    meets_rule: bool


class PseudoFacts(Record):
    """What the report shows of the pseudo-labels (metrics.json's `pseudo`): rule `validation` (a confidence
    threshold chosen on the validation split) or `cross_validation` (an amount per class chosen out of fold)."""

    rule: str | None = None
    threshold: float | None = None
    count: int | None = None
    pool_size: int | None = None
    per_class: list[int] | None = None
    thresholds: list[ThresholdRow] | None = None
    validation_accuracy: float | None = None
    min_precision: float | None = None
    reason: str | None = None
    per_class_amount: int | None = None
    labeled_images: int | None = None
    folds: int | None = None
    repeats: int | None = None
    labeler_oof_accuracy: float | None = None
    labeler_oof_per_class: list[float] | None = None


class PseudoSummary(PseudoFacts):
    """The pseudo-labels' record (augment.pseudo.PseudoLabels.summary; RunFolder.pseudo.summary)."""

    classifier: str | None = None
    min_confidence: float | None = None


class Choice(Record):
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
    adaptation: str | None = None  # the best adaptation (lora.adaptations), when several were compared
    in_product: bool | None = None
    samples: int | None = None
    samples_by_adaptation: dict[str, int] | None = None
    generator_images: int | None = None
    holdout: int | None = None

    @property
    def cross_validated(self) -> bool:
        return self.oof_accuracy is not None


class Selection(Record):
    """The run's choices: the pseudo stage's (RunFolder.pseudo.selection) are the recipe's and the pool's (none
    under selection.rule=validation); the evaluation adds the choose stage's, on the synthetic data."""

    recipe: Choice | None = None
    pseudo: Choice | None = None
    synthetic: Choice | None = None

    def with_(self, **choices: Choice) -> "Selection":
        """This selection with `choices` added or replaced (the fields set stay set)."""
        return Selection.model_validate({**self.to_json(), **{k: v.to_json() for k, v in choices.items()}})


# -- the filter stage (RunFolder.filter: summary, decisions) --------------------------------------------------------
class QualityClassifier(Record):
    kind: str
    validation_accuracy: float | None
    validation_size: int


class FilterScores(Record):
    """What the filters decided from, beside the per-candidate table: the quality judge, ALIA's per-class thresholds
    and out-of-fold accuracy, and the train-to-train nearest-neighbour similarities (both spaces) that the
    memorization gate's threshold is read against."""

    quality_classifier: QualityClassifier
    alia_thresholds: list[float | None]
    alia_oof_accuracy: float | None
    train_nn_similarity_pixels: list[float]
    train_nn_similarity_features: list[float]
    memorization_space: Literal["pixels", "features"]

    def train_similarity(self, space: str) -> list[float]:
        """Each real train image's similarity to its nearest other train image, in `space` (pixels or features)."""
        return self.train_nn_similarity_pixels if space == "pixels" else self.train_nn_similarity_features


class ClassFilter(Record):
    class_: str = Field(alias="class")
    generated: int
    kept: int
    rejected: dict[str, int]


class FilterSummary(Record):
    """What the filter kept: counts, the filters' order, and per class the rejections by reason."""

    generated: int
    kept: int
    order: list[str]
    per_class: list[ClassFilter]


# -- the evaluate stage (RunFolder.evaluation.summary) -------------------------------------------------------------
class TrainSizes(Record):
    real: int
    synthetic: int


class ArmResult(Record):
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


class EvaluationSummary(Record):
    """The downstream trainings summarized (augment.evaluate.summarize_results): every arm (filter-ablation arms
    included), the choices, the best baseline and the paired gains."""

    arms: dict[str, ArmResult]
    seeds: list[int]
    product_arm: str | None = None
    recipe: str | None = None
    product_recipe: str | None = None
    selection: Selection = Selection()
    best_baseline: str | None = None
    baselines: list[str] = []
    gain_over_best_baseline: Difference | None = None
    gains: dict[str, Gain] | None = None
    per_class_delta: dict[str, list[float]] | None = None
    synthetic_adds: dict[str, Gain] = {}
    filter_gain: FilterGain | None = None


# -- the publish stage (RunFolder.dataset.record) ------------------------------------------------------------------
class SplitRows(Record):
    rows: int
    synthetic: int
    pseudo_labeled: int = 0


class PublishRecord(Record):
    """The published dataset's record: rows per split, the provenance every row carries, its version and the key
    of the inputs it was published from (an unchanged re-run keeps it)."""

    splits: dict[str, SplitRows]
    provenance: dict[str, str | None]
    version: str
    key: str = ""
