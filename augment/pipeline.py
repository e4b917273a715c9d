"""The run: the stages in order (STAGES, walked by `run` here and by the Prefect flow), inside a checked, claimed
and locked run folder.

Each stage (augment.stages) is a plain function over the run folder: call it from a Prefect task, a notebook or a
test. It reads what earlier stages wrote under `publish.output_dir`, writes its own sub-folder, and returns a small
summary. A stage whose inputs (the config sections it declares, and its upstream stages' outputs) have not changed
since it last finished is reused, not recomputed (augment.stages.core): re-running a job costs only what changed.
Where each file lives: augment.runfolder.RunFolder.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import numpy as np

from augment import runfolder
from augment.config import RunConfig
from augment.data import data_fingerprint, make_splits
from augment.report.schema import Metrics
from augment.stages import choices, generator, outcome
from augment.stages.core import Stage, folder, identity, record, to_json


def preflight(cfg: RunConfig) -> None:
    """Every check that needs no run folder: the data loads and splits (kept in memory for the data stage), the
    base checkpoint exists, the output and cache folders may be used. A user error raises here, before anything is
    written."""
    from augment.backends import check_base
    from augment.cpus import fair_share

    fair_share()  # a bad AUGMENT_THREADS is refused here, not when the first stage starts
    runfolder.check_output_dir(cfg.publish.output_dir, cfg.data.source)
    runfolder.check_writable_dir(cfg.base.cache_dir, "base.cache_dir", cfg.data.source)
    kind = check_base(cfg.base)
    if kind in ("flux", "sd3") and cfg.base.weights_dtype == "fp16":
        from augment.config import ConfigError

        raise ConfigError(f"base.weights_dtype=fp16: the {kind} backend's T5 text encoder overflows in fp16; use "
                          "bf16 (or auto, which takes bf16 where the GPU has it and fp32 where it does not)")
    if kind in ("flux", "sd3") and cfg.lora.snr_gamma is not None:
        from augment.config import ConfigError

        raise ConfigError(f"lora.snr_gamma={cfg.lora.snr_gamma} weights noise-prediction losses; the {kind} backend "
                          "trains by flow matching: set it to null")
    if "none" in cfg.lora.adaptations and kind == "pixel":
        from augment.config import ConfigError

        raise ConfigError(f"lora.adaptations={cfg.lora.adaptations}: `none` samples the pretrained model from its "
                          "class prompts, and the pixel backend's base has none (it learns the classes in "
                          "fine-tuning): use a text-to-image base (stable_diffusion, sdxl, sd3, flux) or list lora "
                          "alone")
    ti = [a for a in cfg.lora.adaptations if a in ("textual_inversion", "lora+ti")]
    if ti and kind not in ("stable_diffusion", "sdxl"):
        from augment.config import ConfigError

        raise ConfigError(f"lora.adaptations lists {', '.join(ti)}: textual inversion learns tokens in CLIP text "
                          f"encoders, which the stable_diffusion and sdxl backends have alone; the {kind} backend "
                          "is not supported for it yet (list lora and none)")
    if cfg.generation.feedback_scale > 0:
        from augment.config import ConfigError

        if kind != "pixel":
            raise ConfigError(f"generation.feedback_scale={cfg.generation.feedback_scale} needs the pixel backend "
                              f"(its classifier reads pixels; the {kind} backend samples latents): set it to 0")
        if cfg.pseudo.classifier.kind != "cnn":
            raise ConfigError(f"generation.feedback_scale={cfg.generation.feedback_scale} needs a differentiable "
                              f"classifier: pseudo.classifier.kind is {cfg.pseudo.classifier.kind!r}, set it to cnn")
    from augment.backends import resolve_device
    from augment.config import CLASSIFIER_SECTIONS

    resolve_device(cfg.device)  # a GPU that is not there: one line now, not after the base has trained
    if cfg.runner.kind != "local":
        from augment.gpus import runner_workers

        runner_workers(cfg)  # several workers on one GPU, or a GPU runner.devices names that is not there
    for section, key in CLASSIFIER_SECTIONS:
        clf = getattr(getattr(cfg, section), key)
        if clf.kind == "encoder" and clf.backbone == "base":
            from augment.config import ConfigError

            if kind != "pixel" or cfg.base.pretrained != "builtin":
                what = f"the {kind} backend's base" if kind != "pixel" else f"base.pretrained={cfg.base.pretrained}"
                raise ConfigError(f"{section}.{key}.backbone=base reads the builtin base (base.pretrained: builtin, "
                                  f"a UNet pretrained on the job's images, cached by its content); {what} is not "
                                  "one: name a transformers vision model (e.g. facebook/dinov2-small)")
            if clf.image_size not in (None, cfg.data.image_size):
                raise ConfigError(f"{section}.{key}.image_size={clf.image_size}: backbone base reads images at the "
                                  f"base's size, data.image_size={cfg.data.image_size}; set it to null")
        elif clf.kind == "encoder":
            from augment.encoders import check_backbone

            check_backbone(clf.backbone, f"{section}.{key}.backbone")
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


def finished(cfg: RunConfig) -> Metrics | None:
    """The metrics of the run folder's last run when it finished with this config and these data, and its dataset
    and report are still there: nothing to do (`augment run` then returns in about a second, without Prefect)."""
    out = folder(cfg)
    if not out.info.is_file() or _finished_key(cfg, "") is None:
        return None
    key = _finished_key(cfg, data_fingerprint(make_splits(cfg.data, keep=True)))  # the data as it is now
    if key is None or (runfolder.read_json(out.info) or {}).get("finished_key") != key:
        return None
    if not all(f.is_file() for f in (out.metrics, out.report_html, out.dataset.record)):
        return None
    from augment.report.schema import MetricsError, read_metrics

    try:
        return read_metrics(out.metrics)  # None when it is not JSON
    except MetricsError:  # metrics.json of another version, or edited: the run is done again and the file rewritten
        return None


def mark_finished(cfg: RunConfig, done: bool = True) -> None:
    """Record (or, as a run starts, clear) that the run folder holds a complete run of this config."""
    record(cfg, None, finished_key=_finished_key(cfg, identity(cfg, "data")) if done else None)


@contextmanager
def started(cfg: RunConfig, wait: bool = False):
    """Check the inputs (`preflight`), claim the run folder (refusing one that is not ours), hold its lock (or wait
    for it), and save the config in it.

    Every entry point (the flow, the CLI, a notebook) runs the stages inside this block."""
    from augment.cpus import job

    preflight(cfg)
    out = runfolder.claim(cfg.publish.output_dir, cfg.data.source, cfg.name)
    with runfolder.lock(out, wait=wait), job():  # counted among the machine's running jobs (augment/cpus.py)
        runfolder.save_config(cfg, out)
        yield out


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


STAGES: tuple[Stage, ...] = tuple(f.stage for f in (
    generator.prepare_data, generator.base_model, choices.pseudo_stage, generator.finetune_stage,
    generator.generate_stage, outcome.filter_stage, choices.choose_stage, outcome.evaluate_stage,
    outcome.publish_stage, outcome.report_stage))
STAGE = {s.name: s for s in STAGES}


@contextmanager
def _worker_processes() -> Iterator[None]:
    """The run's stages share one pool of worker processes (augment.parallel.spawn_pool); it stops with the run, so
    that no idle process outlives it (a served flow's process runs many)."""
    from augment.parallel import close_pool

    try:
        yield
    except BaseException:  # an error or an interrupt: cut the units in flight (recomputed on resume)
        close_pool(kill=True)
        raise
    finally:
        close_pool()


def walk(cfg: RunConfig, call: Callable[[Stage, dict], object], wait: bool = False,
         t0: float | None = None) -> Metrics:
    """Every stage of STAGES in order, inside `started` (inputs checked, the run folder claimed and locked):
    `call(stage, kept)` runs one (here, or as a Prefect task) and returns its result. Returns the last stage's
    result: the report's metrics."""
    from augment.backends import device_name
    from augment.cpus import fair_share, running_jobs, usable_cpus

    t0 = time.time() if t0 is None else t0
    kept: dict = {}
    with started(cfg, wait=wait), _worker_processes():
        mark_finished(cfg, False)
        # trainings round by their thread count: it is recorded with the CPU (augment/cpus.py says how it is chosen)
        record(cfg, None, versions=versions(), cpu=cpu_kind(), device=device_name(cfg.device), threads=fair_share(),
               usable_cpus=usable_cpus(), jobs_running=running_jobs())
        timing = True
        for s in STAGES:
            if timing and not s.timed:
                record(cfg, None, total_seconds=round(time.time() - t0, 1))
                timing = False
            out = call(s, kept)
            if s.keeps:
                kept[s.keeps] = out
                record(cfg, None, **{s.keeps: to_json(out)})
        mark_finished(cfg)
    return out  # the report stage's Metrics


def run(cfg: RunConfig, log=print, on_stage: Callable[[str | None], None] | None = None,
        wait: bool = False) -> Metrics:
    """Every stage, here, without Prefect (notebooks, benchmarks); returns the report's metrics. `on_stage(name)`
    is called as each stage starts, and with None at the end."""
    from augment.progress import stage as progress

    mark = on_stage or (lambda name: None)

    def call(s: Stage, kept: dict):
        mark(s.name)
        with progress(s.what, s.unit, log) as p:
            return s.call(cfg, kept, log=log, progress=p, units=None)

    metrics = walk(cfg, call, wait=wait)
    mark(None)
    return metrics
