"""The generator's stages: the data split, the base model, LoRA fine-tuning and generation (sharded: `generate_unit`
is the unit a task runner spreads over processes or Dask workers)."""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Iterable

import numpy as np

from augment import results, runfolder
from augment.arms import has_part
from augment.backends import create, resolve_device
from augment.config import RunConfig
from augment.data import Splits, data_fingerprint, make_splits
from augment.parallel import worker_state
from augment.results import AdapterInfo, BaseModelInfo, DataSummary, GenerationRecord
from augment.stages import outputs
from augment.stages.core import Read, StageRun, folder, output_dir, stage
from augment.stages.outputs import load_pseudo, load_selection


@stage("data", "data", sections=("data",), identity="fingerprint")
def prepare_data(cfg: RunConfig, log=print, progress=None) -> DataSummary:
    data = folder(cfg).data
    with StageRun(cfg, "data") as st:
        splits = make_splits(cfg.data)
        splits.save(data.splits)
        summary = results.parse(DataSummary, {**splits.summary(), "fingerprint": data_fingerprint(splits),
                                              "source": cfg.data.source}, "the data's summary")
        results.save(data.summary, summary)
    st.identify(summary)
    return summary


def recorded(cfg: RunConfig) -> tuple[BaseModelInfo, AdapterInfo]:
    """The base and the adapter of the run folder's last run, as run.json records them."""
    info = runfolder.read_json(folder(cfg).info, {}) or {}
    return (results.parse(BaseModelInfo, info.get("base"), f"{folder(cfg).info}: base"),
            results.parse(AdapterInfo, info.get("adapter"), f"{folder(cfg).info}: adapter"))


def backend_for(cfg: RunConfig, splits: Splits):
    """The generator backend of this job (augment.backends), set up for its classes and image shape."""
    _, h, _, c = splits.train.images.shape
    return create(cfg.base, splits.class_names, h, c, resolve_device(cfg.device))


@stage("base", "base pretraining", "step", reads=("generator_splits",), identity="fingerprint", keeps="base",
       artifact=("pretraining", "Base pretraining steps"))
def base_model(cfg: RunConfig, generator_splits: Read[Splits], log=print,
               progress: Callable[[int, int], None] | None = None) -> BaseModelInfo:
    """The base model (the backend keeps its own cache of pretrained bases, keyed by what they learned from)."""
    with StageRun(cfg, "base") as st:
        splits = generator_splits()
        info = backend_for(cfg, splits).prepare(splits.train, splits.pool, log=log, progress=progress)
    st.identify(info)
    return info


@stage("finetune", "fine-tuning", "step", sections=("base", "lora"), reads=("generator_splits", "base", "pseudo"),
       folder="finetune", identity="adapter_hash", keeps="adapter", artifact=("finetuning", "LoRA fine-tuning steps"))
def finetune_stage(cfg: RunConfig, generator_splits: Read[Splits], base: BaseModelInfo, pseudo: Read, log=print,
                   progress: Callable[[int, int], None] | None = None) -> AdapterInfo:
    from augment.finetune import adapter_damage, finetune

    st = StageRun(cfg, "finetune", consumed={"base": base})

    def damage() -> str | None:
        problem = adapter_damage(st.stage_folder.adapter)
        if problem is not None:  # trained again below (finetune reuses any adapter it finds in place)
            shutil.rmtree(st.stage_folder.adapter.path)
        return problem

    if st.reused(log, damage=damage):
        info = results.load(st.stage_folder.adapter.info, AdapterInfo)
    else:
        with st.fresh():
            splits = generator_splits()
            backend, pool = backend_for(cfg, splits), pseudo()[0]
            info = finetune(cfg.lora, backend, base, splits.train, st.folder,
                            run_config=cfg.model_dump(mode="json"), log=log, pseudo=pool, progress=progress)
            for adaptation in [a for a in cfg.lora.adaptations if a in TRAINED_BESIDE_LORA]:
                log(f"finetune: {adaptation}")
                finetune(cfg.lora, backend, base, splits.train, st.folder / adaptation, adaptation=adaptation,
                         run_config=cfg.model_dump(mode="json"), log=log, pseudo=pool, progress=progress)
    st.identify(info)
    return info


# the adaptations (lora.adaptations) that the finetune stage trains beside the LoRA, each in finetune/<name>/adapter
TRAINED_BESIDE_LORA = {"textual_inversion", "lora+ti"}


def adaptation_adapter(cfg: RunConfig, adaptation: str):
    """The adapter folder (runfolder.AdapterFolder) of a trained adaptation; None for `none`."""
    from augment.runfolder import FinetuneFolder

    if adaptation == "none":
        return None
    if adaptation == "lora":
        return folder(cfg).finetune.adapter
    return FinetuneFolder(folder(cfg).finetune.path / adaptation).adapter


# generation reads the pseudo stage's choices and pool only for feedback-guided sampling (feedback_classifier)
@stage("generate", "generation", "sample", sections=("generation",),
       reads=("generator_splits", "base", "adapter", "selection", "pseudo"), folder="candidates",
       artifact=("generation", "Candidates generated"), distributed=True)
def generate_stage(cfg: RunConfig, generator_splits: Read[Splits], base: BaseModelInfo, adapter: AdapterInfo,
                   selection: Read, pseudo: Read, log=print, progress: Callable[[int, int], None] | None = None,
                   units: Callable[[list[int]], Iterable[int]] | None = None) -> GenerationRecord:
    """Generate every planned candidate; `units(shards)` generates the missing shards elsewhere (the flow passes its
    task runner's map of `generate_unit`) and yields each shard's sample count in order as it finishes, else they
    are generated here (each process that generates reads the selection and the pool itself, for the feedback
    classifier)."""
    from augment import generate as gen
    from augment.parallel import worker_count

    st = StageRun(cfg, "generate", consumed={"finetune": adapter})

    def damage() -> str | None:
        bad = gen.damaged_shards(st.folder)
        return f"{len(bad)} shard(s) cannot be read ({', '.join(p.name for p in bad[:3])})" if bad else None

    if not st.reused(log, damage=damage):
        with st.fresh():
            splits = generator_splits()
            backend = backend_for(cfg, splits)
            workers = worker_count(cfg.runner.local_workers)
            if units is None and backend.device.type == "cpu" and workers > 1:
                units = _local_shards(cfg, base, adapter, workers)  # shards on CPU cores, one thread each
            if units is None:
                gen.generate(cfg.generation, backend, denoisers(cfg, backend, base), splits.train, st.folder,
                             progress=progress, log=log, feedback=feedback_classifier(cfg, splits))
            else:
                t0 = time.time()
                df = gen.write_plan(cfg.generation, backend, splits.train, st.folder, cfg.lora.adaptations)
                todo = [int(s) for s in sorted(df["shard"].unique()) if not gen.shard_done(st.folder, df, s)]
                log(f"generate: {len(todo)} of {df['shard'].nunique()} shards to generate")
                done = len(df) - int(df["shard"].isin(todo).sum())
                for n in units(todo):
                    done += n
                    if progress:
                        progress(done, len(df))
                gen.finish(st.folder, len(df), time.time() - t0, gen.sampled_in(backend, cfg.generation))
    return results.load(st.stage_folder.done, GenerationRecord)


def _local_shards(cfg: RunConfig, base: BaseModelInfo, adapter: AdapterInfo, workers: int):
    """units for a local run: the shards on `workers` spawned processes (runner.local_workers, as the other CPU-bound
    units; one torch thread each), each loading the model once; yields each shard's sample count as it finishes."""

    def run(shards: list[int]):
        from concurrent.futures import as_completed

        from augment.parallel import spawn_pool

        if len(shards) <= 1:  # not worth starting processes for
            yield from (generate_unit(cfg, base, adapter, s) for s in shards)
            _MODELS.clear()
            return
        pool = spawn_pool(workers)
        try:
            for f in as_completed([pool.submit(generate_unit, cfg, base, adapter, s) for s in shards]):
                yield f.result()
        finally:
            pool.shutdown(cancel_futures=True)

    return run


# per process: a worker that generates many shards of one run loads its model once (emptied after the batch)
_MODELS: dict = worker_state()


def denoisers(cfg: RunConfig, backend, base: BaseModelInfo) -> dict:
    """The denoiser of every listed adaptation (lora.adaptations), in order: `lora` with the run's adapter fused,
    `none` and `textual_inversion` the base as it is, `lora+ti` with its own LoRA fused; the textual-inversion
    ones' learned tokens go into the backend's text encoders (backend.use_adaptation picks the conditioning).
    The adapters of the run folder in hand, not the paths run.json recorded: a copied or moved folder (cp -a, or a
    relative --output-dir re-run from elsewhere) must not read the original's."""
    models = {}
    for a in cfg.lora.adaptations:
        adapter = adaptation_adapter(cfg, a)
        models[a] = backend.load(base, adapter=adapter.path if a in ("lora", "lora+ti") else None)
        if a in TRAINED_BESIDE_LORA:
            backend.load_ti(a, adapter.path)
        backend.condition_variants(a)
        models[a] = backend.for_sampling(models[a])
    return models


def generate_unit(cfg: RunConfig, base: BaseModelInfo, adapter: AdapterInfo, shard: int) -> int:
    """Generate one shard of the run's plan in any process that sees the run folder: the unit that the flow's
    task runner distributes. Returns the number of samples written."""
    import pandas as pd

    from augment import generate as gen

    cands = folder(cfg).candidates
    key = (str(output_dir(cfg)), adapter.adapter_hash, cfg.fingerprint("generation"))
    if key not in _MODELS:
        _MODELS.clear()
        splits = outputs.generator_splits(cfg)
        backend = backend_for(cfg, splits)
        _MODELS[key] = (splits, backend, denoisers(cfg, backend, base), feedback_classifier(cfg, splits))
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
    recipe = decisions.recipe.chosen if decisions.recipe else None
    augment = recipe == "real+classic" if recipe else cfg.evaluation.recipe != "none"
    pseudo_chosen = (decisions.pseudo.chosen if decisions.pseudo else None) or ""
    pseudo, _ = load_pseudo(cfg, splits)
    images, labels = splits.train.images, splits.train.labels
    if len(pseudo) and (has_part(pseudo_chosen, "pseudo") or not decisions.to_json()):
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
