"""Reading what earlier stages wrote: the splits (and the generator's view of them), the run's choices, the
pseudo-labeled pool, the filtered candidates and the synthetic choice, as the stages after them read them.

Each loader a stage may declare in `@stage(reads=...)` is registered here once, by name, with the stage that writes
what it reads (augment.stages.core.output): that is where a stage's upstream comes from."""

from __future__ import annotations

import dataclasses

import numpy as np

from augment import results
from augment.config import RunConfig
from augment.data import ImageSet, Splits
from augment.results import Choice, EvaluationSummary, FilterSummary, PublishRecord, Selection
from augment.stages.core import folder, output


@output("splits", "data")
def load_splits(cfg: RunConfig) -> Splits:
    """The data stage's splits (test included: only the evaluation reads it)."""
    return Splits.load(folder(cfg).data.splits)


def synthetic_holdout(cfg: RunConfig, splits: Splits) -> np.ndarray:
    """Rows of the labeled train split kept from the generator for the synthetic choice (none when no choice is
    made: selection.rule=validation, listed arms, or selection.synthetic_holdout=0)."""
    from augment.selection import generator_holdout

    sel = cfg.selection
    if sel.rule != "cross_validation" or cfg.evaluation.arms != "auto" or sel.synthetic_holdout == 0:
        return np.zeros(0, np.int64)
    return generator_holdout(splits.train.labels, sel.synthetic_holdout, sel.seed)


@output("generator_splits", "data", needs=("splits",))
def generator_splits(cfg: RunConfig, splits: Splits | None = None) -> Splits:
    """The splits as everything the generator learns from sees them (base pretraining, fine-tuning, img2img
    sources, the feedback classifier): the labeled train split without the synthetic choice's holdout. `splits`:
    the data stage's, when they are loaded already."""
    splits = load_splits(cfg) if splits is None else splits
    held = synthetic_holdout(cfg, splits)
    if not len(held):
        return splits
    return dataclasses.replace(splits, train=splits.train.subset(np.setdiff1d(np.arange(len(splits.train)), held)))


@output("selection", "pseudo")
def load_selection(cfg: RunConfig) -> Selection:
    """The cross-validated decisions of the pseudo stage (none under selection.rule=validation)."""
    return results.load(folder(cfg).pseudo.selection, Selection, Selection())


@output("pseudo", "pseudo", needs=("splits",))
def load_pseudo(cfg: RunConfig, splits: Splits):
    """The pseudo-labeled pool images as an ImageSet (empty when there are none), and their labels' record."""
    from augment.pseudo import PseudoLabels

    p = PseudoLabels.load(folder(cfg).pseudo)
    return ImageSet(splits.pool.images[p.index], p.labels, splits.class_names, p.ids), p


@output("candidates", "generate")
def candidates(cfg: RunConfig):
    """Every generated candidate (augment.generate.Candidates)."""
    from augment.generate import load_candidates

    return load_candidates(folder(cfg).candidates.path)


@output("filtered", "filter")
def load_filtered(cfg: RunConfig):
    """All candidates, the filter's score table and the kept mask, as the choice, publish and evaluate read them."""
    import pandas as pd

    cands = candidates(cfg)
    table = pd.read_parquet(folder(cfg).filter.scores)
    kept = table["kept"].to_numpy()
    return cands, table, kept


def adaptations_of(cands) -> list[str]:
    """The adaptations (lora.adaptations) whose samples the candidates hold, in the plan's order."""
    if "adaptation" not in cands.meta or not len(cands.meta):  # planned before the column, or nothing planned
        return ["lora"]
    return list(dict.fromkeys(cands.meta["adaptation"].astype(str)))


def kept_by_adaptation(cands, kept: np.ndarray):
    """The kept samples (images, labels) as the choose stage compares them: one pair, or with several adaptations
    one pair each, in the plan's order."""
    names = adaptations_of(cands)
    if len(names) == 1:
        return cands.images[kept], cands.labels[kept]
    made_by = cands.meta["adaptation"].to_numpy().astype(str)
    return {a: (cands.images[kept & (made_by == a)], cands.labels[kept & (made_by == a)]) for a in names}


def product_adaptation(cands, choice: Choice | None) -> str:
    """The adaptation whose samples the product and the synthetic arms take: the choose stage's, else the first
    listed."""
    names = adaptations_of(cands)
    chosen = choice.adaptation if choice is not None else None
    return chosen if chosen in names else names[0]


def product_kept(cands, kept: np.ndarray, choice: Choice | None) -> np.ndarray:
    """`kept`, narrowed to the product adaptation's samples when the candidates hold several."""
    if len(adaptations_of(cands)) == 1:
        return kept
    return kept & (cands.meta["adaptation"].to_numpy().astype(str) == product_adaptation(cands, choice))


@output("choice", "choose")
def load_choice(cfg: RunConfig) -> Choice:
    """The choose stage's decision (empty when nothing was chosen)."""
    return results.load(folder(cfg).choice.decision, Choice, Choice())


@output("filter_summary", "filter")
def load_filter_summary(cfg: RunConfig) -> FilterSummary:
    """What the filter kept, per class and by reason."""
    return results.load(folder(cfg).filter.decisions, FilterSummary)


@output("evaluation", "evaluate")
def load_evaluation(cfg: RunConfig) -> EvaluationSummary | None:
    """The evaluation's summary (None before the evaluation has run)."""
    return results.load(folder(cfg).evaluation.summary, EvaluationSummary)


def load_published(cfg: RunConfig) -> PublishRecord | None:
    """The published dataset's record (None before anything was published, or when another version wrote it: then
    the dataset is published again)."""
    try:
        return results.load(folder(cfg).dataset.record, PublishRecord)
    except results.RecordError:
        return None


def evaluation_config(cfg: RunConfig, choice: Choice):
    """cfg.evaluation with the one mixing probability the trainings use: the choose stage's, else the first."""
    p = choice.synthetic_prob
    p = cfg.evaluation.synthetic_prob[0] if p is None else p
    return cfg.evaluation.model_copy(update={"synthetic_prob": [p]})
