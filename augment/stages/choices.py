"""The run's choices, made on labeled data only: the pseudo-labeled pool and the recipe (cross-validated), and
whether the synthetic samples go into the product (on labeled images the generator never saw)."""

from __future__ import annotations

from collections.abc import Callable

from augment import results
from augment.arms import has_part
from augment.config import RunConfig
from augment.data import Splits
from augment.results import Choice, PseudoSummary, Selection
from augment.gpus import local_workers
from augment.stages.core import CHOICES, Read, StageRun, stage
from augment.stages.outputs import kept_by_adaptation, load_choice, synthetic_holdout


@stage("pseudo", "selection", "training", sections=CHOICES, reads=("splits",), folder="pseudo",
       artifact=("selection", "Cross-validation trainings"))
def pseudo_stage(cfg: RunConfig, splits: Read[Splits], log=print,
                 progress: Callable[[int, int], None] | None = None) -> PseudoSummary:
    """The pseudo-labeled pool and, under selection.rule=cross_validation, the run's other choices (the recipe),
    all made on labeled data only; the choices are saved beside the labels for the evaluation and the report."""
    from augment.pseudo import pseudo_label, select_and_label

    st = StageRun(cfg, "pseudo")
    if not st.reused(log):
        with st.fresh():
            splits = splits()
            if cfg.selection.rule == "cross_validation":
                labels, decisions = select_and_label(cfg.pseudo, cfg.selection, splits.train, splits.pool,
                                                     recipe=cfg.evaluation.recipe,
                                                     workers=local_workers(cfg, cfg.selection.model,
                                                                           cfg.pseudo.classifier),
                                                     log=log, progress=progress)
            else:
                labels, decisions = pseudo_label(cfg.pseudo, splits.train, splits.validation, splits.pool,
                                                 log=log), Selection()
            results.save(st.stage_folder.selection, decisions)
            labels.save(st.stage_folder)
    return results.load(st.stage_folder.summary, PseudoSummary)


@stage("choose", "synthetic choice", "training", sections=("evaluation.synthetic_prob", "evaluation.arms"),
       reads=("splits", "filtered", "selection", "pseudo"), folder="choice",
       artifact=("choice", "Cross-validation trainings with synthetic data"))
def choose_stage(cfg: RunConfig, splits: Read[Splits], filtered: Read, selection: Read[Selection], pseudo: Read,
                 log=print, progress: Callable[[int, int], None] | None = None) -> Choice:
    """Whether the product takes the kept synthetic samples, and at which of evaluation.synthetic_prob, judged on
    the labeled images the generator never saw (synthetic_holdout; augment.selection.choose_synthetic). An empty
    Choice when no choice is made: the product then takes them at the first probability."""
    from augment.selection import choose_synthetic

    st = StageRun(cfg, "choose")
    if st.reused(log):
        return load_choice(cfg)
    with st.fresh():
        decision = Choice()
        splits = splits()
        holdout = synthetic_holdout(cfg, splits)
        if len(holdout):
            cands, _, kept = filtered()
            decisions = selection()
            recipe = (decisions.pseudo or decisions.recipe).chosen
            pool_set, _ = pseudo()
            pool = (pool_set.images, pool_set.labels) if has_part(recipe, "pseudo") and len(pool_set) else None
            decision = Choice(skipped="no synthetic sample was kept") if not kept.any() else choose_synthetic(
                cfg.selection, cfg.evaluation.synthetic_prob, recipe, splits.train.images, splits.train.labels,
                len(splits.class_names), holdout, pool, kept_by_adaptation(cands, kept),
                workers=local_workers(cfg, cfg.selection.model), log=log, progress=progress)
        results.save(st.stage_folder.decision, decision)
    return decision
