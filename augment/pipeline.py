"""The stages of one run as plain functions over a run folder: call them from Prefect tasks, a notebook or tests.

Each stage reads what earlier stages wrote under `publish.output_dir`, writes its own sub-folder, and returns a
small JSON-able summary. A stage whose inputs (the config sections it depends on, and the data) have not changed
since it last finished is reused, not recomputed: re-running a job costs only what changed. Where each file lives:
augment.run.RunFolder (`folder(cfg)`).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from contextlib import contextmanager
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from augment import run as run_folder
from augment.arms import has_part
from augment.config import RunConfig
from augment.backends import BaseModelInfo, create, resolve_device
from augment.data import Splits, data_fingerprint, make_splits

# The pseudo stage also makes the run's cross-validated choices, starting from the team's recipe.
CHOICES = ("pseudo", "selection", "evaluation.recipe")


def run_dir(cfg: RunConfig) -> Path:
    return Path(cfg.publish.output_dir)


def folder(cfg: RunConfig) -> run_folder.RunFolder:
    """The run folder's layout: every file of the run by what it holds."""
    return run_folder.RunFolder(cfg.publish.output_dir)


def preflight(cfg: RunConfig) -> None:
    """Every check that needs no run folder: the data loads and splits (kept in memory for the data stage), the
    base checkpoint exists, the output and cache folders may be used. A user error raises here, before anything is
    written."""
    from augment.backends import check_base

    run_folder.check_output_dir(cfg.publish.output_dir, cfg.data.source)
    run_folder.check_writable_dir(cfg.base.cache_dir, "base.cache_dir", cfg.data.source)
    kind = check_base(cfg.base)
    if cfg.generation.feedback_scale > 0:
        from augment.config import ConfigError

        if kind != "pixel":
            raise ConfigError(f"generation.feedback_scale={cfg.generation.feedback_scale} needs the pixel backend "
                              f"(its classifier reads pixels; the {kind} backend samples latents): set it to 0")
        if cfg.pseudo.classifier.kind != "cnn":
            raise ConfigError(f"generation.feedback_scale={cfg.generation.feedback_scale} needs a differentiable "
                              f"classifier: pseudo.classifier.kind is {cfg.pseudo.classifier.kind!r}, set it to cnn")
    splits = make_splits(cfg.data, keep=True)
    if cfg.selection.rule == "cross_validation":
        counts = splits.train.class_counts()
        if min(counts) < 2:
            from augment.config import ConfigError

            name = splits.class_names[int(np.argmin(counts))]
            raise ConfigError(f"selection.rule=cross_validation needs at least 2 labeled train images per class; "
                              f"class {name!r} has {min(counts)} (raise data.shots_per_class, or set "
                              "selection.rule=validation with a validation split)")


def _finished_key(cfg: RunConfig, data: str) -> str | None:
    """What a finished run's outputs depend on: the whole config (paths and runner excluded) and the data's
    fingerprint. None when the base is outside augment's control (a checkpoint that may change under its path)."""
    return None if cfg.base.pretrained != "builtin" else f"{cfg.fingerprint()}-{data}"


def finished(cfg: RunConfig) -> dict | None:
    """The metrics of the run folder's last run when it finished with this config and these data, and its dataset
    and report are still there: nothing to do (`augment run` then returns in about a second, without Prefect)."""
    out = folder(cfg)
    if not out.info.is_file() or _finished_key(cfg, "") is None:
        return None
    key = _finished_key(cfg, data_fingerprint(make_splits(cfg.data, keep=True)))  # the data as it is now
    if key is None or (run_folder.read_json(out.info) or {}).get("finished_key") != key:
        return None
    if not all(f.is_file() for f in (out.metrics, out.report_html, out.dataset.record)):
        return None
    return run_folder.read_json(out.metrics)


def mark_finished(cfg: RunConfig, done: bool = True) -> None:
    """Record (or, as a run starts, clear) that the run folder holds a complete run of this config."""
    record(cfg, None, finished_key=_finished_key(cfg, _data_summary(cfg)["fingerprint"]) if done else None)


@contextmanager
def started(cfg: RunConfig, wait: bool = False):
    """Check the inputs (`preflight`), claim the run folder (refusing one that is not ours), hold its lock (or wait
    for it), and save the config in it.

    Every entry point (the flow, the CLI, a notebook) runs the stages inside this block."""
    preflight(cfg)
    out = run_folder.claim(cfg.publish.output_dir, cfg.data.source, cfg.name)
    with run_folder.lock(out, wait=wait):
        run_folder.save_config(cfg, out)
        yield out


class _Stage:
    """Times a stage and records it in run.json; with a folder, marks it finished under its config key so that
    an unchanged re-run reuses it."""

    def __init__(self, cfg: RunConfig, name: str, where: str | None = None, upstream: str = ""):
        self.cfg, self.name = cfg, name
        self.stage_folder = folder(cfg).stage(where) if where else None
        self.key = cfg.fingerprint(*STAGE_SECTIONS[name])
        if upstream:  # what the stage consumes (a base, an adapter, an earlier stage's key), beyond the config
            self.key += "-" + hashlib.sha256(upstream.encode()).hexdigest()[:12]
        summary = run_folder.read_json(folder(cfg).data.summary, {})
        if name != "data" and "fingerprint" in summary:  # new images under the same config must not reuse old results
            self.key += "-" + summary["fingerprint"]

    @property
    def folder(self) -> Path | None:
        return self.stage_folder.path if self.stage_folder is not None else None

    def reused(self, log=print) -> bool:
        """True (and logged) when the folder holds this stage's finished result for the same key."""
        if (run_folder.read_json(self.stage_folder.stage) or {}).get("key") == self.key:
            log(f"{self.name}: reusing {self.folder}")
            return True
        return False

    def fresh(self) -> "_Stage":
        """Clear a folder made with another config; keep one made with this config (it may hold resumable
        checkpoints or finished shards of an interrupted run). Only ever inside a run folder augment created."""
        owner = self.stage_folder.owner
        if self.folder.exists() and (run_folder.read_json(owner) or {}).get("key") != self.key:
            run_folder.require_ours(run_dir(self.cfg))
            shutil.rmtree(self.folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        run_folder.write_json(owner, {"key": self.key})
        return self

    def __enter__(self):
        self.t0 = time.time()
        return self

    def __exit__(self, exc_type, *_):
        if exc_type is None:
            if self.folder is not None:
                run_folder.write_json(self.stage_folder.stage, {"key": self.key})
            record(self.cfg, self.name, seconds=round(time.time() - self.t0, 2))
        return False


def _stage_key(cfg: RunConfig, where: str) -> str:
    """The key under which an earlier stage finished (its output's identity for the stages after it)."""
    return (run_folder.read_json(folder(cfg).stage(where).stage) or {}).get("key", "")


def record(cfg: RunConfig, stage: str | None, **facts) -> None:
    """Add facts to run.json: under stages.<stage>, or at the top level when stage is None."""
    path = folder(cfg).info
    path.parent.mkdir(parents=True, exist_ok=True)
    run = run_folder.read_json(path, {})
    if not isinstance(run, dict) or not isinstance(run.get("stages"), dict):  # torn or foreign: start over
        run = {"stages": {}}
    (run if stage is None else run["stages"].setdefault(stage, {})).update(facts)
    run_folder.write_json(path, run)


# 1. Data ------------------------------------------------------------------------------------------------------


def prepare_data(cfg: RunConfig) -> dict:
    data = folder(cfg).data
    with _Stage(cfg, "data"):
        splits = make_splits(cfg.data)
        splits.save(data.splits)
        summary = {**splits.summary(), "fingerprint": data_fingerprint(splits), "source": cfg.data.source}
        run_folder.write_json(data.summary, summary)
    return summary


def load_splits(cfg: RunConfig) -> Splits:
    return Splits.load(folder(cfg).data.splits)


# 2. Base model ------------------------------------------------------------------------------------------------


def backend_for(cfg: RunConfig, splits: Splits):
    """The generator backend of this job (augment.backends), set up for its classes and image shape."""
    _, h, _, c = splits.train.images.shape
    return create(cfg.base, splits.class_names, h, c, resolve_device(cfg.device))


def base_model(cfg: RunConfig, log=print, progress: Callable[[int, int], None] | None = None) -> dict:
    with _Stage(cfg, "base"):
        splits = generator_splits(cfg)
        info = backend_for(cfg, splits).prepare(splits.train, splits.pool, log=log, progress=progress)
    return asdict(info)


# 3. Pseudo-labels --------------------------------------------------------------------------------------------


def pseudo_stage(cfg: RunConfig, log=print, progress: Callable[[int, int], None] | None = None) -> dict:
    """The pseudo-labeled pool and, under selection.rule=cross_validation, the run's other choices (the recipe),
    all made on labeled data only; the choices are saved beside the labels for the evaluation and the report."""
    from augment.pseudo import pseudo_label, select_and_label

    st = _Stage(cfg, "pseudo", "pseudo")
    if not st.reused(log):
        with st.fresh():
            splits = load_splits(cfg)
            if cfg.selection.rule == "cross_validation":
                labels, decisions = select_and_label(cfg.pseudo, cfg.selection, splits.train, splits.pool,
                                                     recipe=cfg.evaluation.recipe, workers=cfg.evaluation.workers,
                                                     log=log, progress=progress)
            else:
                labels, decisions = pseudo_label(cfg.pseudo, splits.train, splits.validation, splits.pool,
                                                 log=log), {}
            run_folder.write_json(st.stage_folder.selection, decisions)
            labels.save(st.stage_folder)
    return run_folder.read_json(st.stage_folder.summary)


def load_selection(cfg: RunConfig) -> dict:
    """The cross-validated decisions of the pseudo stage ({} under selection.rule=validation)."""
    return run_folder.read_json(folder(cfg).pseudo.selection, {}) or {}


def load_pseudo(cfg: RunConfig, splits: Splits):
    """The pseudo-labeled pool images as an ImageSet (empty when there are none)."""
    from augment.data import ImageSet
    from augment.pseudo import PseudoLabels

    p = PseudoLabels.load(folder(cfg).pseudo)
    return ImageSet(splits.pool.images[p.index], p.labels, splits.class_names, p.ids), p


# 4. Fine-tune -------------------------------------------------------------------------------------------------


def finetune_stage(cfg: RunConfig, base: dict, log=print, progress: Callable[[int, int], None] | None = None) -> dict:
    from augment.finetune import finetune

    with _Stage(cfg, "finetune", "finetune", upstream=base["fingerprint"]).fresh() as st:
        splits = generator_splits(cfg)
        pseudo, _ = load_pseudo(cfg, splits)
        info = finetune(cfg.lora, backend_for(cfg, splits), BaseModelInfo(**base), splits.train, st.folder,
                        run_config=cfg.model_dump(mode="json"), log=log, pseudo=pseudo, progress=progress)
    return asdict(info)


# 5. Generate --------------------------------------------------------------------------------------------------


def generate_stage(cfg: RunConfig, base: dict, adapter: dict, progress: Callable[[int, int], None] | None = None,
                   log=print, run_shards: Callable[[list[int]], Iterable[int]] | None = None) -> dict:
    """Generate every planned candidate; `run_shards(shards)` generates the missing shards elsewhere (the flow
    passes its task runner's map of `generate_unit`) and yields each shard's sample count in order as it
    finishes, else they are generated here."""
    from augment import generate as gen

    st = _Stage(cfg, "generate", "candidates", upstream=adapter["adapter_hash"])
    if not st.reused(log):
        with st.fresh():
            splits = generator_splits(cfg)
            backend = backend_for(cfg, splits)
            from augment.parallel import worker_count

            workers = worker_count(cfg.evaluation.workers)
            if run_shards is None and backend.device.type == "cpu" and workers > 1:
                run_shards = _local_shards(cfg, base, adapter, workers)  # shards on CPU cores, one thread each
            if run_shards is None:
                model = backend.load(BaseModelInfo(**base), adapter=adapter["path"])
                gen.generate(cfg.generation, backend, model, splits.train, st.folder, progress=progress, log=log,
                             feedback=feedback_classifier(cfg, splits))
            else:
                t0 = time.time()
                df = gen.write_plan(cfg.generation, backend, splits.train, st.folder)
                todo = [int(s) for s in sorted(df["shard"].unique()) if not gen.shard_done(st.folder, df, s)]
                log(f"generate: {len(todo)} of {df['shard'].nunique()} shards to generate")
                done = len(df) - int(df["shard"].isin(todo).sum())
                for n in run_shards(todo):
                    done += n
                    if progress:
                        progress(done, len(df))
                gen.finish(st.folder, len(df), time.time() - t0, cfg.generation, backend.device)
    return json.loads(st.stage_folder.done.read_text())


def _local_shards(cfg: RunConfig, base: dict, adapter: dict, workers: int):
    """run_shards for a local run: the shards on `workers` spawned processes (evaluation.workers, as the other
    CPU-bound units; one torch thread each), each loading the model once; yields each shard's sample count as it
    finishes."""

    def run(shards: list[int]):
        from concurrent.futures import as_completed

        from augment.parallel import spawn_pool

        if len(shards) <= 1:  # not worth starting processes for
            yield from (generate_unit(cfg, base, adapter, s) for s in shards)
            _MODELS.clear()
            return
        pool = spawn_pool(min(workers, len(shards)))
        try:
            for f in as_completed([pool.submit(generate_unit, cfg, base, adapter, s) for s in shards]):
                yield f.result()
        finally:
            pool.shutdown(cancel_futures=True)

    return run


_MODELS: dict = {}  # per process: a worker that generates many shards of one run loads its model once


def generate_unit(cfg: RunConfig, base: dict, adapter: dict, shard: int) -> int:
    """Generate one shard of the run's plan in any process that sees the run folder: the unit that the flow's
    task runner distributes. Returns the number of samples written."""
    import pandas as pd

    from augment import generate as gen

    cands = folder(cfg).candidates
    key = (str(run_dir(cfg)), adapter["adapter_hash"], cfg.fingerprint("generation"))
    if key not in _MODELS:
        _MODELS.clear()
        splits = generator_splits(cfg)
        backend = backend_for(cfg, splits)
        _MODELS[key] = (splits, backend, backend.load(BaseModelInfo(**base), adapter=adapter["path"]),
                        feedback_classifier(cfg, splits))
    splits, backend, model, feedback = _MODELS[key]
    df = pd.read_parquet(cands.plan)
    return gen.generate_shard(cfg.generation, backend, model, splits.train, cands.path, df, shard, feedback=feedback)


def feedback_classifier(cfg: RunConfig, splits: Splits):
    """The classifier of feedback-guided sampling (None when generation.feedback_scale is 0): `pseudo.classifier`
    trained on the recipe's images (the labeled ones, plus the pseudo-labeled pool when the pseudo stage put it in
    the recipe; classic augmentation when the recipe has it), seeded by generation.seed. Every process that
    generates shards trains it again rather than reading it from disk: one training, on one torch thread, the same
    model wherever it runs."""
    if cfg.generation.feedback_scale == 0:
        return None
    import torch

    from augment.classifier import train_classifier
    from augment.parallel import one_thread

    decisions = load_selection(cfg)
    recipe = (decisions.get("recipe") or {}).get("chosen")
    augment = recipe == "real+classic" if recipe else cfg.evaluation.recipe != "none"
    pseudo_chosen = (decisions.get("pseudo") or {}).get("chosen", "")
    pseudo, _ = load_pseudo(cfg, splits)
    images, labels = splits.train.images, splits.train.labels
    if len(pseudo) and (has_part(pseudo_chosen, "pseudo") or not decisions):
        images, labels = np.concatenate([images, pseudo.images]), np.concatenate([labels, pseudo.labels])
    with one_thread():
        clf = train_classifier(cfg.pseudo.classifier, images, labels, len(splits.class_names), cfg.generation.seed,
                               augment=augment)
    net = clf.model.eval()
    for p in net.parameters():
        p.requires_grad_(False)
    size, h = clf.image_size, splits.train.images.shape[1]
    if size is None or size == h:
        return net
    # inputs resized as TrainedClassifier resizes them (area averaging when shrinking), but differentiably
    resize = (torch.nn.AdaptiveAvgPool2d(size) if size < h else
              torch.nn.Upsample(size=(size, size), mode="bilinear", align_corners=False))
    return torch.nn.Sequential(resize, net)


# 6. Filter ----------------------------------------------------------------------------------------------------


def filter_stage(cfg: RunConfig, log=print) -> dict:
    from augment.filters import decide, save_outcome, score_candidates
    from augment.generate import load_candidates

    st = _Stage(cfg, "filter", "filter", upstream=_stage_key(cfg, "candidates"))
    if st.reused(log):
        return json.loads(st.stage_folder.decisions.read_text())
    with st.fresh():
        splits = load_splits(cfg)
        cands = load_candidates(folder(cfg).candidates.path)
        scored, _ = score_candidates(cfg.filter, cands, splits.train, splits.validation, log=log,
                                     workers=cfg.evaluation.workers)
        kept, reason = decide(scored, cfg.filter)
        table = save_outcome(scored, kept, reason, cands, st.folder)
        K = len(splits.class_names)
        per_class = []
        for k in range(K):
            rows = table[table["label"] == k]
            per_class.append({"class": splits.class_names[k], "generated": int(len(rows)),
                              "kept": int(rows["kept"].sum()),
                              "rejected": {r: int(n) for r, n in rows.loc[~rows["kept"], "reason"].value_counts().items()}})
        summary = {"generated": int(len(table)), "kept": int(kept.sum()), "order": list(cfg.filter.order),
                   "per_class": per_class}
        run_folder.write_json(st.stage_folder.decisions, summary)
        log(f"filter: kept {summary['kept']} of {summary['generated']}")
    return summary


def load_filtered(cfg: RunConfig):
    """All candidates, the filter's score table and the kept mask, as publish and evaluate read them."""
    import pandas as pd

    from augment.generate import load_candidates

    cands = load_candidates(folder(cfg).candidates.path)
    table = pd.read_parquet(folder(cfg).filter.scores)
    kept = table["kept"].to_numpy()
    return cands, table, kept


# 7. Choose: whether the synthetic data goes into the product ------------------------------------------------


def synthetic_holdout(cfg: RunConfig, splits: Splits) -> np.ndarray:
    """Rows of the labeled train split kept from the generator for the synthetic choice (none when no choice is
    made: selection.rule=validation, listed arms, or selection.synthetic_holdout=0)."""
    from augment.selection import generator_holdout

    sel = cfg.selection
    if sel.rule != "cross_validation" or cfg.evaluation.arms != "auto" or sel.synthetic_holdout == 0:
        return np.zeros(0, np.int64)
    return generator_holdout(splits.train.labels, sel.synthetic_holdout, sel.seed)


def generator_splits(cfg: RunConfig) -> Splits:
    """The splits as everything the generator learns from sees them (base pretraining, fine-tuning, img2img
    sources, the feedback classifier): the labeled train split without the synthetic choice's holdout."""
    import dataclasses

    splits = load_splits(cfg)
    held = synthetic_holdout(cfg, splits)
    if not len(held):
        return splits
    return dataclasses.replace(splits, train=splits.train.subset(np.setdiff1d(np.arange(len(splits.train)), held)))


def choose_stage(cfg: RunConfig, log=print, progress: Callable[[int, int], None] | None = None) -> dict:
    """Whether the product takes the kept synthetic samples, and at which of evaluation.synthetic_prob, judged on
    the labeled images the generator never saw (synthetic_holdout; augment.selection.choose_synthetic). {} when
    no choice is made: the product takes them at the first probability."""
    from augment.selection import choose_synthetic

    st = _Stage(cfg, "choose", "choice", upstream=_stage_key(cfg, "filter") + _stage_key(cfg, "pseudo"))
    if st.reused(log):
        return run_folder.read_json(st.stage_folder.decision, {})
    with st.fresh():
        decision: dict = {}
        splits = load_splits(cfg)
        holdout = synthetic_holdout(cfg, splits)
        if len(holdout):
            cands, _, kept = load_filtered(cfg)
            decisions = load_selection(cfg)
            recipe = (decisions.get("pseudo") or decisions["recipe"])["chosen"]
            pseudo, _ = load_pseudo(cfg, splits)
            pool = (pseudo.images, pseudo.labels) if has_part(recipe, "pseudo") and len(pseudo) else None
            decision = {"skipped": "no synthetic sample was kept"} if not kept.any() else choose_synthetic(
                cfg.selection, cfg.evaluation.synthetic_prob, recipe, splits.train.images, splits.train.labels,
                len(splits.class_names), holdout, pool, (cands.images[kept], cands.labels[kept]),
                workers=cfg.evaluation.workers, log=log, progress=progress)
        run_folder.write_json(st.stage_folder.decision, decision)
    return decision


def load_choice(cfg: RunConfig) -> dict:
    """The choose stage's decision ({} when nothing was chosen)."""
    return run_folder.read_json(folder(cfg).choice.decision, {}) or {}


def evaluation_config(cfg: RunConfig):
    """cfg.evaluation with the one mixing probability the trainings use: the choose stage's, else the first."""
    p = load_choice(cfg).get("synthetic_prob", cfg.evaluation.synthetic_prob[0])
    return cfg.evaluation.model_copy(update={"synthetic_prob": [p]})


# 8. Evaluate --------------------------------------------------------------------------------------------------


def training_sets(cfg: RunConfig):
    """Everything the downstream trainings read, from the run folder: the splits, the kept and all candidates, the
    pseudo-labeled pool, and what each filter alone would keep."""
    from augment.evaluate import TrainingSets
    from augment.filters import decide, load_scored

    splits = load_splits(cfg)
    cands, table, kept = load_filtered(cfg)
    pseudo, _ = load_pseudo(cfg, splits)
    ablation = {}
    if cfg.evaluation.filter_ablation:
        scored, _ = load_scored(folder(cfg).filter.path)
        for name in cfg.filter.order:
            mask, _ = decide(scored, cfg.filter, order=[name])
            ablation[name] = (cands.images[mask], cands.labels[mask])
    return TrainingSets(splits, (cands.images[kept], cands.labels[kept]), (cands.images, cands.labels),
                        (pseudo.images, pseudo.labels) if len(pseudo) else None, ablation)


_SETS: dict = {}  # per process: a worker that trains many units of one run reads its sets once


def train_unit(cfg: RunConfig, arm: str, recipe: str, seed: int) -> dict:
    """One downstream training (arm x seed) in any process that sees the run folder: the unit that the flow's
    task runner (threads, processes, Dask) distributes."""
    from augment.evaluate import train_unit as train

    key = (str(run_dir(cfg)), _stage_key(cfg, "filter"), _stage_key(cfg, "pseudo"), cfg.fingerprint("filter"))
    if key not in _SETS:
        _SETS.clear()
        _SETS[key] = training_sets(cfg)
    return train(evaluation_config(cfg), _SETS[key], arm, recipe, seed)


def evaluate_stage(cfg: RunConfig, progress: Callable[[int, int], None] | None = None, log=print,
                   run_units=None) -> dict:
    """Downstream trainings; `run_units(units)` runs each phase's (arm, recipe, seed) units elsewhere (the flow
    passes its task runner's map of `train_unit`)."""
    from augment.evaluate import evaluate, summarize_results

    st = _Stage(cfg, "evaluate", "evaluation",
                upstream=_stage_key(cfg, "filter") + _stage_key(cfg, "pseudo") + _stage_key(cfg, "choice"))
    if not st.reused(log):
        with st.fresh():
            decisions, choice = load_selection(cfg), load_choice(cfg)
            if choice:
                decisions["synthetic"] = choice
            evaluate(evaluation_config(cfg), training_sets(cfg), st.folder, progress=progress, log=log,
                     run_units=run_units, decisions=decisions)
    summary = summarize_results(json.loads(st.stage_folder.results.read_text()))
    run_folder.write_json(st.stage_folder.summary, summary)
    return summary


# 9. Publish ---------------------------------------------------------------------------------------------------


def publish_stage(cfg: RunConfig, base: dict, adapter: dict, log=print) -> dict:
    """Publish real train + kept synthetic rows (+ the pseudo-labeled pool rows when the evaluation put them in
    the recipe, i.e. they helped on validation), validation and test. A dataset already published from the same
    inputs is kept as it is (same version, no rewrite)."""
    from augment.publish import publish

    with _Stage(cfg, "publish"):
        evaluation = run_folder.read_json(folder(cfg).evaluation.summary, {})
        with_pseudo = has_part(evaluation.get("product_recipe"), "pseudo")
        provenance = {"base_model": BaseModelInfo(**base).name,
                      "base_fingerprint": base["fingerprint"], "adapter_hash": adapter["adapter_hash"],
                      "config_hash": cfg.fingerprint(), "data_fingerprint": _data_summary(cfg)["fingerprint"]}
        about = _card_facts(cfg, evaluation)
        key = hashlib.sha256(json.dumps({
            "filter": _stage_key(cfg, "filter"), "pseudo": _stage_key(cfg, "pseudo") if with_pseudo else "",
            "provenance": provenance, "publish": cfg.publish.model_dump(mode="json", exclude={"output_dir"}),
            "about": about,
        }, sort_keys=True).encode()).hexdigest()[:16]
        done = run_folder.read_json(folder(cfg).dataset.record) or {}
        if done.get("key") == key:
            log(f"publish: reusing {folder(cfg).dataset.path} (version {done.get('version')})")
            return done["splits"]
        splits = load_splits(cfg)
        cands, table, kept = load_filtered(cfg)
        pseudo = None
        if with_pseudo:
            pseudo_set, labels = load_pseudo(cfg, splits)
            pseudo = (pseudo_set, labels.confidence)
        info = publish(splits, cands.images[kept], table[kept].reset_index(drop=True),
                       folder(cfg).dataset.path, cfg.publish.dataset_name, provenance, cfg.publish.max_shard_rows,
                       pseudo=pseudo, key=key, about=about)
    return info


def _card_facts(cfg: RunConfig, evaluation: dict) -> dict:
    """What the dataset card says about how the data was made and what the evaluation found."""
    from augment.generate import sampling_precision

    decisions = run_folder.read_json(folder(cfg).filter.decisions) or {}
    rejected: dict[str, int] = {}
    for pc in decisions.get("per_class", []):
        for reason, n in pc.get("rejected", {}).items():
            rejected[reason] = rejected.get(reason, 0) + n
    g, b = cfg.generation, cfg.base
    how = (f"Source images: `{cfg.data.source}`, {cfg.data.shots_per_class or 'all'} labeled per class. Generator: "
           f"{b.pretrained if b.pretrained != 'builtin' else 'a pixel-space UNet pretrained on the unlabeled pool'}"
           f" + LoRA rank {cfg.lora.rank}, {cfg.lora.max_train_steps} steps. Sampling: {g.scheduler}, "
           f"{g.num_inference_steps} steps, {sampling_precision(run_dir(cfg), cfg)}, guidance {g.guidance_scale}, "
           f"strengths {g.strengths}. Filters, in order: {', '.join(cfg.filter.order)}; "
           f"{decisions.get('generated', 0)} generated, {decisions.get('kept', 0)} kept; rejected: "
           + (", ".join(f"{r} {n}" for r, n in sorted(rejected.items())) or "none") + ".")
    gain = evaluation.get("gain_over_best_baseline")
    if gain:
        evidence = (f"Downstream classifiers ({cfg.evaluation.seeds} paired seeds, real test split): "
                    f"`{evaluation.get('product_arm')}` against the best baseline `{evaluation.get('best_baseline')}`: "
                    f"{100 * gain['mean']:+.1f} points (95% CI [{100 * (gain.get('ci_low') or gain['mean']):+.1f}, "
                    f"{100 * (gain.get('ci_high') or gain['mean']):+.1f}]), **{gain.get('verdict')}**.")
    else:
        evidence = "No downstream comparison was possible (no synthetic sample was kept, or no baseline ran)."
    return {"license": cfg.publish.license, "how": how, "evidence": evidence}


def _data_summary(cfg: RunConfig) -> dict:
    return json.loads(folder(cfg).data.summary.read_text())


def cpu_kind() -> str:
    """The machine's CPU kind, recorded with each run (speed depends on it far more than on anything else)."""
    from augment.diffusion.tensors import cpu_kind as kind

    return kind()


def versions() -> dict:
    import datasets
    import diffusers
    import peft
    import torch

    return {"torch": torch.__version__, "diffusers": diffusers.__version__, "peft": peft.__version__,
            "datasets": datasets.__version__, "numpy": np.__version__}


# The run: one list of stages, walked by `run` here and by the Prefect flow ----------------------------------


@dataclass(frozen=True)
class Stage:
    """One step of a run, as data: both `run` (here) and the Prefect flow walk STAGES and nothing else.

    `call(cfg, kept, log=, progress=, units=)` runs it: `kept` holds what earlier stages kept (the base and the
    adapter), `units` is a task runner's map of the stage's independent units (None: here). `what` and `unit`: how
    its progress reads (a bar, or log lines; unit "" = the heartbeat only). `sections`: the config sections its
    reuse key covers (besides the data's fingerprint and its upstream outputs). `keeps`: its result is recorded in
    run.json under that name and handed to the stages after it. `artifact`: the flow's progress artifact (key,
    description; "" = none). `distributed`: its units (generation shards, downstream trainings) can run on the
    flow's task runner. `retries`: safe to retry in the flow (disk I/O only). `timed`: part of the run's
    total_seconds (the report, which shows the total, is not)."""

    name: str
    what: str
    unit: str
    call: Callable[..., dict]
    sections: tuple[str, ...] = ("data",)
    keeps: str | None = None
    artifact: tuple[str, str] = ("", "")
    distributed: bool = False
    retries: int = 0
    timed: bool = True


STAGES: tuple[Stage, ...] = (
    Stage("data", "data", "", lambda cfg, kept, log, progress, units: prepare_data(cfg)),
    Stage("base", "base pretraining", "step", keeps="base", artifact=("pretraining", "Base pretraining steps"),
          call=lambda cfg, kept, log, progress, units: base_model(cfg, log=log, progress=progress)),
    Stage("pseudo", "selection", "training", sections=("data", *CHOICES),
          artifact=("selection", "Cross-validation trainings"),
          call=lambda cfg, kept, log, progress, units: pseudo_stage(cfg, log=log, progress=progress)),
    Stage("finetune", "fine-tuning", "step", sections=("data", "base", *CHOICES, "lora"), keeps="adapter",
          artifact=("finetuning", "LoRA fine-tuning steps"),
          call=lambda cfg, kept, log, progress, units: finetune_stage(cfg, kept["base"], log=log,
                                                                      progress=progress)),
    Stage("generate", "generation", "sample", sections=("data", "base", *CHOICES, "lora", "generation"),
          artifact=("generation", "Candidates generated"), distributed=True,
          call=lambda cfg, kept, log, progress, units: generate_stage(cfg, kept["base"], kept["adapter"],
                                                                      progress=progress, log=log,
                                                                      run_shards=units)),
    Stage("filter", "filter", "", sections=("data", "base", *CHOICES, "lora", "generation", "filter"),
          call=lambda cfg, kept, log, progress, units: filter_stage(cfg, log=log)),
    Stage("choose", "synthetic choice", "training",
          sections=("data", "base", *CHOICES, "lora", "generation", "filter", "evaluation.synthetic_prob",
                    "evaluation.arms"),
          artifact=("choice", "Cross-validation trainings with synthetic data"),
          call=lambda cfg, kept, log, progress, units: choose_stage(cfg, log=log, progress=progress)),
    # before publishing: it decides whether the pseudo-labeled pool rows are published
    Stage("evaluate", "evaluation", "training",
          sections=("data", "base", "pseudo", "selection", "lora", "generation", "filter", "evaluation"),
          artifact=("evaluation", "Downstream training runs finished"), distributed=True,
          call=lambda cfg, kept, log, progress, units: evaluate_stage(cfg, progress=progress, log=log,
                                                                      run_units=units)),
    Stage("publish", "publish", "", retries=2,
          call=lambda cfg, kept, log, progress, units: publish_stage(cfg, kept["base"], kept["adapter"], log=log)),
    Stage("report", "report", "", timed=False,
          call=lambda cfg, kept, log, progress, units: _build_report(cfg)),
)
STAGE = {s.name: s for s in STAGES}
STAGE_SECTIONS = {s.name: s.sections for s in STAGES}  # what each stage's reuse key covers


def _build_report(cfg: RunConfig) -> dict:
    from augment.report import build_report

    return build_report(run_dir(cfg))


def walk(cfg: RunConfig, call: Callable[[Stage, dict], dict], wait: bool = False,
         t0: float | None = None) -> dict:
    """Every stage of STAGES in order, inside `started` (inputs checked, the run folder claimed and locked):
    `call(stage, kept)` runs one (here, or as a Prefect task) and returns its result. Returns the last stage's
    result: the report's metrics."""
    t0 = time.time() if t0 is None else t0
    kept: dict = {}
    with started(cfg, wait=wait):
        mark_finished(cfg, False)
        record(cfg, None, versions=versions(), cpu=cpu_kind())
        timing = True
        for s in STAGES:
            if timing and not s.timed:
                record(cfg, None, total_seconds=round(time.time() - t0, 1))
                timing = False
            out = call(s, kept)
            if s.keeps:
                kept[s.keeps] = out
                record(cfg, None, **{s.keeps: out})
        mark_finished(cfg)
    return out


def run(cfg: RunConfig, log=print, on_stage: Callable[[str | None], None] | None = None, wait: bool = False) -> dict:
    """Every stage, here, without Prefect (notebooks, benchmarks); returns the report's metrics. `on_stage(name)`
    is called as each stage starts, and with None at the end."""
    from augment.progress import stage as progress

    mark = on_stage or (lambda name: None)

    def call(s: Stage, kept: dict) -> dict:
        mark(s.name)
        with progress(s.what, s.unit, log) as p:
            return s.call(cfg, kept, log=log, progress=p, units=None)

    metrics = walk(cfg, call, wait=wait)
    mark(None)
    return metrics
