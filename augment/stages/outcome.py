"""What the samples are worth: the filter, the downstream evaluation (`train_unit` is the unit a task runner
spreads), the published dataset and the report."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

from augment import results
from augment.arms import has_part
from augment.config import RunConfig
from augment.data import Splits
from augment.parallel import worker_state
from augment.report.schema import Metrics
from augment.results import (AdapterInfo, BaseModelInfo, Choice, ClassFilter, EvaluationSummary, FilterSummary,
                             PublishRecord, Selection)
from augment.gpus import local_workers
from augment.stages.core import ALL, Read, StageRun, folder, identity, output_dir, stage, with_base
from augment.stages.outputs import (evaluation_config, load_choice, load_filter_summary, load_filtered,
                                    load_published, load_pseudo, load_splits, product_adaptation, product_kept)

if TYPE_CHECKING:  # pragma: no cover  (augment.trainings imports sklearn, ~1 s: loaded when a training runs)
    from augment.trainings import TrainingRun, TrainingSets


@stage("filter", "filter", sections=("filter",), reads=("splits", "candidates"), folder="filter")
def filter_stage(cfg: RunConfig, splits: Read[Splits], candidates: Read, log=print, progress=None) -> FilterSummary:
    from augment.filters import decide, save_outcome, score_candidates

    st = StageRun(cfg, "filter")
    if st.reused(log):
        return load_filter_summary(cfg)
    with st.fresh():
        splits, cands = splits(), candidates()
        scored, _ = score_candidates(cfg.filter, cands, splits.train, splits.validation, log=log,
                                     workers=local_workers(cfg, cfg.filter.quality_classifier))
        kept, reason = decide(scored, cfg.filter)
        table = save_outcome(scored, kept, reason, cands, st.folder)
        per_class = []
        for k, name in enumerate(splits.class_names):
            rows = table[table["label"] == k]
            rejected = rows.loc[~rows["kept"], "reason"].value_counts()
            per_class.append(ClassFilter(class_=name, generated=len(rows), kept=int(rows["kept"].sum()),
                                         rejected={r: int(n) for r, n in rejected.items()}))
        summary = FilterSummary(generated=len(table), kept=int(kept.sum()), order=list(cfg.filter.order),
                                per_class=per_class)
        results.save(st.stage_folder.decisions, summary)
        log(f"filter: kept {summary.kept} of {summary.generated}")
    return summary


def training_sets(cfg: RunConfig, splits: Splits, filtered, pseudo, choice: Choice | None = None) -> TrainingSets:
    """Everything the downstream trainings read: the splits, the kept and all candidates (`filtered`, as
    load_filtered reads them) of the product's adaptation (the choose stage's `choice`, when several were
    generated), the pseudo-labeled pool (as load_pseudo reads it), and what each filter alone would keep (from the
    filter's scores)."""
    from augment.filters import decide, load_scored
    from augment.trainings import Examples, TrainingSets

    cands, _, kept = filtered
    mine = product_kept(cands, np.ones(len(cands), bool), choice)
    pseudo, _ = pseudo
    ablation = {}
    if cfg.evaluation.filter_ablation:
        scored, _ = load_scored(folder(cfg).filter.path)
        for name in cfg.filter.order:
            mask, _ = decide(scored, cfg.filter, order=[name])
            ablation[name] = Examples(cands.images[mask & mine], cands.labels[mask & mine])
    if mine.all():  # one adaptation: every candidate (no copies of the arrays)
        every = Examples(cands.images, cands.labels)
    else:
        every = Examples(cands.images[mine], cands.labels[mine])
    return TrainingSets(splits, Examples(cands.images[kept & mine], cands.labels[kept & mine]), every,
                        Examples(pseudo.images, pseudo.labels) if len(pseudo) else None, ablation)


_SETS: dict = worker_state()  # per process: a worker that trains many units of one run reads its sets once


def train_unit(cfg: RunConfig, arm: str, recipe: str, seed: int) -> TrainingRun:
    """One downstream training (arm x seed) in any process that sees the run folder: the unit that the flow's
    task runner (threads, processes, Dask) distributes."""
    from augment.trainings import train_arm

    cfg = with_base(cfg)  # a unit on another worker: the base its classifier may read
    key = (str(output_dir(cfg)), identity(cfg, "filter"), identity(cfg, "pseudo"), identity(cfg, "choose"),
           cfg.fingerprint("filter"))
    if key not in _SETS:
        _SETS.clear()
        splits = load_splits(cfg)
        _SETS[key] = training_sets(cfg, splits, load_filtered(cfg), load_pseudo(cfg, splits), load_choice(cfg))
    return train_arm(evaluation_config(cfg, load_choice(cfg)), _SETS[key], arm, recipe, seed)


# before publishing: it decides whether the pseudo-labeled pool rows are published
@stage("evaluate", "evaluation", "training", sections=("evaluation",),
       reads=("splits", "filtered", "pseudo", "selection", "choice"), folder="evaluation",
       artifact=("evaluation", "Downstream training runs finished"), distributed=True)
def evaluate_stage(cfg: RunConfig, splits: Read[Splits], filtered: Read, pseudo: Read, selection: Read[Selection],
                   choice: Read[Choice], log=print, progress: Callable[[int, int], None] | None = None,
                   units=None) -> EvaluationSummary:
    """Downstream trainings; `units(units)` runs each phase's (arm, recipe, seed) units elsewhere (the flow passes
    its task runner's map of `train_unit`, which reads the same outputs in its own process). A reused stage's runs
    are read back from its results file."""
    from augment.evaluate import EvaluationRuns, evaluate, summarize_results

    st = StageRun(cfg, "evaluate")
    if st.reused(log):
        runs = EvaluationRuns.load(st.stage_folder.results)
    else:
        with st.fresh():
            decisions, chosen = selection(), choice()
            if chosen.to_json():
                decisions = decisions.with_(synthetic=chosen)
            sets = training_sets(cfg, splits(), filtered(), pseudo(), chosen)
            runs = evaluate(evaluation_config(cfg, chosen), sets, st.folder, progress=progress, log=log,
                            run_units=units, decisions=decisions, workers=local_workers(cfg, cfg.evaluation.model))
    summary = summarize_results(runs)
    results.save(st.stage_folder.summary, summary)
    return summary


# the published dataset's key covers the whole config (the card states much of it)
@stage("publish", "publish", sections=ALL,
       reads=("splits", "base", "adapter", "pseudo", "filtered", "filter_summary", "evaluation"), retries=2)
def publish_stage(cfg: RunConfig, splits: Read[Splits], base: BaseModelInfo, adapter: AdapterInfo, pseudo: Read,
                  filtered: Read, filter_summary: Read[FilterSummary], evaluation: Read[EvaluationSummary],
                  log=print, progress=None) -> PublishRecord:
    """Publish real train + kept synthetic rows (+ the pseudo-labeled pool rows when the evaluation put them in
    the recipe), validation and test. A dataset already published under the same key (the whole config and every
    upstream stage's output) is kept as it is (same version, no rewrite)."""
    from augment.publish import publish

    with StageRun(cfg, "publish", consumed={"base": base, "finetune": adapter}) as st:
        done = load_published(cfg)
        if done is not None and done.key == st.key:
            log(f"publish: reusing {folder(cfg).dataset.path} (version {done.version})")
            return done
        summary = evaluation()
        provenance = {"base_model": base.name, "base_fingerprint": base.fingerprint,
                      "adapter_hash": adapter.adapter_hash, "config_hash": cfg.fingerprint(),
                      "data_fingerprint": identity(cfg, "data")}
        cands, table, kept = filtered()
        chosen = summary.selection.synthetic
        kept, adaptation = product_kept(cands, kept, chosen), product_adaptation(cands, chosen)
        if adaptation == "none":  # the base alone made the published samples
            provenance["adapter_hash"] = ""
        elif adaptation != "lora":  # a textual-inversion adaptation's own adapter (finetune/<name>/adapter)
            from augment.stages.generator import adaptation_adapter

            provenance["adapter_hash"] = results.load(adaptation_adapter(cfg, adaptation).info,
                                                      AdapterInfo).adapter_hash
        sampler = str(cands.meta["scheduler"].iloc[0]) if len(cands) else cfg.generation.scheduler
        pool = None
        if has_part(summary.product_recipe, "pseudo"):
            pseudo_set, labels = pseudo()
            pool = (pseudo_set, labels.confidence)
        return publish(splits(), cands.images[kept], table[kept].reset_index(drop=True),
                       folder(cfg).dataset.path, cfg.publish.dataset_name, provenance, cfg.publish.max_shard_rows,
                       pseudo=pool, key=st.key,
                       about=_card_facts(cfg, summary, filter_summary(), sampler, adaptation))


def _card_facts(cfg: RunConfig, evaluation: EvaluationSummary, decisions: FilterSummary, sampler: str,
                adaptation: str) -> dict:
    """What the dataset card says about how the data was made (`sampler`: the published samples' sampler,
    `adaptation`: the generator's adaptation that made them) and what the evaluation found."""
    from augment.generate import sampling_precision

    rejected: dict[str, int] = {}
    for pc in decisions.per_class:
        for reason, n in pc.rejected.items():
            rejected[reason] = rejected.get(reason, 0) + n
    g, b = cfg.generation, cfg.base
    how = (f"Source images: `{cfg.data.source}`, {cfg.data.shots_per_class or 'all'} labeled per class. Generator: "
           f"{b.pretrained if b.pretrained != 'builtin' else 'a pixel-space UNet pretrained on the unlabeled pool'}"
           + {"lora": f" + LoRA rank {cfg.lora.rank}, {cfg.lora.max_train_steps} steps",
              "textual_inversion": f" + a token per class learned by textual inversion, {cfg.lora.max_train_steps} "
                                   "steps",
              "lora+ti": f" + LoRA rank {cfg.lora.rank} and a token per class learned together (pivotal tuning), "
                         f"{cfg.lora.max_train_steps} steps",
              "none": ", not fine-tuned (its class prompts alone)"}[adaptation]
           + (f" (the best of the adaptations {', '.join(cfg.lora.adaptations)} on held-out labeled images)"
              if len(cfg.lora.adaptations) > 1 else "")
           + f". Sampling: {sampler}, "
           f"{g.num_inference_steps} steps, {sampling_precision(output_dir(cfg), cfg)}, guidance {g.guidance_scale}, "
           f"strengths {g.strengths}. Filters, in order: {', '.join(cfg.filter.order)}; "
           f"{decisions.generated} generated, {decisions.kept} kept; rejected: "
           + (", ".join(f"{r} {n}" for r, n in sorted(rejected.items())) or "none") + ".")
    gain = evaluation.gain_over_best_baseline
    if gain:
        low, high = (gain.mean if b is None else b for b in (gain.ci_low, gain.ci_high))
        evidence = (f"Downstream classifiers ({cfg.evaluation.seeds} paired seeds, real test split): "
                    f"`{evaluation.product_arm}` against the best baseline `{evaluation.best_baseline}`: "
                    f"{100 * gain.mean:+.1f} points (95% CI [{100 * low:+.1f}, {100 * high:+.1f}]), "
                    f"**{gain.verdict}**.")
    else:
        evidence = "No downstream comparison was possible (no synthetic sample was kept, or no baseline ran)."
    return {"license": cfg.publish.license, "how": how, "evidence": evidence}


# the report reads the whole run folder (build_report): it is rebuilt every run, never reused, so it has no key
@stage("report", "report", timed=False)
def report_stage(cfg: RunConfig, log=print, progress=None) -> Metrics:
    """The report (HTML, Markdown, metrics.json) from the run folder; returns the metrics, typed."""
    from augment.report.render import build_report

    return build_report(output_dir(cfg))
