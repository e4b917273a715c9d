"""Use a finished run's generator elsewhere: more samples on demand, and a standalone diffusers checkpoint.

    augment generate RUN_DIR --class 3 -n 100 --seed 7 --out more/     # an image folder + provenance.parquet
    augment export RUN_DIR OUT                                         # a diffusers checkpoint + model card

Both read only the run folder (its config.yaml, run.json and adapter) and the base model it names.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from urllib.parse import quote

import numpy as np
import pandas as pd
from augment.stages import core, generator, outputs
from augment import results, runfolder
from augment.backends import BaseModelInfo
from augment.finetune import AdapterInfo
from augment.config import RunConfig
from augment.configfile import load_config
from augment.errors import ModelError
from augment.generate import sampling_precision
from augment.report.schema import Metrics, read_metrics
from augment.runfolder import RunFolderError

# Every sample stays in memory until all are drawn (and the Python API returns them): a request that needs more
# is refused at once instead of running out of memory hours in.
MEMORY_BUDGET = 4 << 30


def load_run(run_dir: str | Path) -> RunConfig:
    """The config and run.json of a finished run folder (the folder may have moved: its path is taken from here)."""
    run = runfolder.RunFolder(run_dir)
    if not run.config.exists() or not run.info.exists():
        raise FileNotFoundError(f"{run.root} is not an augment run folder (no {run.config.name} / {run.info.name})")
    cfg = load_config(run.config, saved=True)
    cfg = cfg.model_copy(update={"publish": cfg.publish.model_copy(update={"output_dir": str(run.root)})})
    info = runfolder.read_json(run.info) or {}
    if "adapter" not in info or not run.finetune.adapter.path.exists():
        raise FileNotFoundError(f"{run.root} has no fine-tuned adapter yet: run the job to its end first")
    return cfg


def _model(cfg: RunConfig, splits=None):
    """The run's fine-tuned generator: the base with the run's LoRA fused."""
    splits = outputs.load_splits(cfg) if splits is None else splits
    backend = generator.backend_for(cfg, splits)
    adapter = core.folder(cfg).finetune.adapter.path
    base, _ = generator.recorded(cfg)
    return splits, backend, backend.load(base, adapter=adapter)


def _product_adaptation(cfg: RunConfig) -> str:
    """The adaptation whose samples the run published (lora.adaptations; the choose stage's pick)."""
    chosen = outputs.load_choice(cfg).adaptation
    return chosen if chosen in cfg.lora.adaptations else cfg.lora.adaptations[0]


def class_folder(name: str) -> str:
    """The folder `generate` writes class `name` into: the name itself when it is one ordinary path component, else
    percent-encoded (a leading dot too), so that a label such as `../x` or `/abs` (a manifest or `datasets` label can
    be anything) cannot put images outside --out. provenance.parquet keeps the true name."""
    if name and not name.startswith(".") and not any(c in name for c in "/\\\0"):
        return name
    if not name:
        return "%"  # quote() never yields a bare "%", so no other name maps here
    encoded = quote(name, safe="")
    return "%2E" + encoded[1:] if encoded.startswith(".") else encoded


def _check_new_folder(out: Path, what: str, cfg: RunConfig) -> Path:
    """`out` resolved, or RunFolderError with nothing written: generate and export write only into a new or empty
    folder that this process may write, outside the run's data source (synthetic images among the real ones) and
    outside the run folder (which augment itself rewrites and deletes in)."""
    resolved = runfolder.check_writable_dir(out, what, str(cfg.data.source))
    root = Path(cfg.publish.output_dir).expanduser().resolve()
    if resolved == root or root in resolved.parents:
        raise RunFolderError(f"{what} {out} lies inside the run folder {root}: choose a folder outside it")
    if resolved.is_dir() and any(resolved.iterdir()):
        raise RunFolderError(f"{what} {out} exists and is not empty: choose a new or empty folder")
    return resolved


def _write_new_folder(out: Path, write) -> None:
    """Fill `out` by `write(folder)` so that a failure or Ctrl-C leaves nothing half-written there: a new `out` is
    written as a temporary sibling and renamed into place; an existing empty one (maybe a mount point or the
    working directory, which a rename must not replace) gets a temporary folder inside, whose entries move up."""
    fresh = not out.exists()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = (out.parent / f".{out.name}.{os.getpid()}.tmp") if fresh else out / f".augment-{os.getpid()}.tmp"
    try:
        tmp.mkdir()
        write(tmp)
        if fresh:
            tmp.rename(out)
            return
        for entry in sorted(tmp.iterdir()):
            entry.rename(out / entry.name)
        tmp.rmdir()
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _sample_index(splits, class_name: str, n: int, seed: int) -> int:
    """The class index, after refusing a request that cannot be met (before the model loads)."""
    names = splits.class_names
    if class_name not in names:
        raise ModelError(f"class {class_name!r} is not one of this run's classes: {', '.join(names)}")
    if n < 1:
        raise ModelError(f"-n must be at least 1 (got {n})")
    if seed < 0:  # numpy's SeedSequence, which derives every sample's seed, takes no negative seed
        raise ModelError(f"--seed must be 0 or more (got {seed})")
    _, h, w, c = splits.train.images.shape
    limit = max(1, MEMORY_BUDGET // (h * w * c))
    if n > limit:
        raise ModelError(f"-n {n} is more than one call holds in memory ({limit} images of {h}x{w}x{c}): draw them in "
                         "several calls, each with its own --seed and --out")
    return names.index(class_name)


def generate_more(run_dir: str | Path, class_name: str, n: int, seed: int = 0,
                  output_dir: str | Path | None = None) -> pd.DataFrame:
    """Draw `n` new samples of `class_name` from the run's generator, with the run's sampler settings: the
    fine-tuned one, or the base alone when the run compared adaptations and its samples came from `none`.

    Sample j of class k gets the seed the run's plan would give it under generation seed `seed` (so `--seed` equal
    to the run's generation.seed reproduces its candidates). With `output_dir` (a new or empty folder), writes
    `<class>/<sample_id>.png` (the class as `class_folder` names it) and `provenance.parquet` there. Returns the
    provenance table (with an `image` column of uint8 arrays)."""
    from augment.generate import sample_seed

    cfg = load_run(run_dir)
    splits = outputs.load_splits(cfg)
    k = _sample_index(splits, class_name, n, seed)
    out = None if output_dir is None else _check_new_folder(Path(output_dir), "--out", cfg)
    adaptation = _product_adaptation(cfg)
    backend = generator.backend_for(cfg, splits)
    base, adapter = generator.recorded(cfg)
    folder = generator.adaptation_adapter(cfg, adaptation)
    model = backend.load(base, adapter=folder.path if adaptation in ("lora", "lora+ti") else None)
    if adaptation in generator.TRAINED_BESIDE_LORA:
        backend.load_ti(adaptation, folder.path)
        adapter = results.load(folder.info, AdapterInfo)
    backend.condition_variants(adaptation)
    backend.use_adaptation(adaptation)
    seeds = [sample_seed(seed, k, j) for j in range(n)]
    rows = [backend.row_prompt(adaptation, k, j) for j in range(n)]  # (prompt, negative), conditioning row
    conditions = np.array([c for _, c in rows], np.int64)
    gen = cfg.generation
    images = np.concatenate([backend.sample(model, conditions[i:i + gen.batch_size], seeds[i:i + gen.batch_size], gen)
                             for i in range(0, n, gen.batch_size)])
    prompt, negative = [p for (p, _), _ in rows], [q for (_, q), _ in rows]
    table = pd.DataFrame({
        "sample_id": [f"more-{seed}-{k}-{j}" for j in range(n)], "label": k, "class": class_name,
        "seed": np.array(seeds, np.int64), "strength": 1.0, "guidance_scale": gen.guidance_scale,
        "num_inference_steps": gen.num_inference_steps, "scheduler": backend.sampler_name(gen), "prompt": prompt,
        "negative_prompt": negative, "base_model": base.name,
        "adapter_hash": adapter.adapter_hash if adaptation != "none" else "", "config_hash": cfg.fingerprint(),
    })
    if out is not None:
        _write_new_folder(out, lambda folder: _write_samples(folder, class_name, table, images))
    return table.assign(image=list(images))


def _write_samples(folder: Path, class_name: str, table: pd.DataFrame, images: np.ndarray) -> None:
    from augment.imagefiles import to_pil

    (folder / class_folder(class_name)).mkdir()
    for sid, img in zip(table["sample_id"], images):
        to_pil(img).save(folder / class_folder(class_name) / f"{sid}.png")
    table.to_parquet(folder / "provenance.parquet")


def export_model(run_dir: str | Path, output_dir: str | Path) -> Path:
    """Write the fine-tuned generator as a standalone diffusers checkpoint with a model card: the pixel backend's
    merged `UNet2DModel` (K + 1 class rows, the last one the null class) and scheduler, or the Stable Diffusion
    pipeline with the LoRA fused into its UNet. No augment needed to load it."""
    cfg = load_run(run_dir)
    out = _check_new_folder(Path(output_dir), "OUT", cfg)
    splits, backend, model = _model(cfg)
    metrics = read_metrics(runfolder.RunFolder(run_dir).metrics)
    card = _model_card(cfg, *generator.recorded(cfg), splits.class_names, backend, metrics,
                       sampling_precision(run_dir, cfg))

    def write(folder: Path) -> None:
        backend.export(model, folder)
        (folder / "README.md").write_text(card)

    _write_new_folder(out, write)
    return Path(output_dir)


def _model_card(cfg: RunConfig, base: BaseModelInfo, adapter: AdapterInfo, names: list[str], backend,
                metrics: Metrics | None, precision: str) -> str:
    gain = metrics.gain_over_best_baseline if metrics else None
    verdict = gain.verdict if gain else "not evaluated"
    product = metrics.product_arm if metrics else None
    mean, low, high = (gain.mean, gain.ci_low, gain.ci_high) if gain else (None, None, None)
    syn = metrics.evaluation.selection.synthetic if metrics else None
    left_out = ("" if syn is None or syn.in_product is not False else
                f" The run left this generator's samples out of its product: on the {syn.images} labeled "
                "images it never saw, they did not help.")
    trained = (f"{adapter.labeled_images} labeled images"
               + (f" and {adapter.pseudo_labeled_images} pseudo-labeled pool images" if adapter.pseudo_labeled_images
                  else ""))
    classes = "\n".join(f"- {k}: {n}" + (f" (prompt `{backend.prompt(k)[0]}`)" if backend.prompt(k)[0] else "")
                        for k, n in enumerate(names))
    return f"""---
library_name: diffusers
tags: [augment, synthetic-data, lora, {backend.kind}]
---
# {cfg.name}: class-conditional generator fine-tuned by augment

Base: {base.name}. LoRA (rank {cfg.lora.rank}, alpha
{cfg.lora.lora_alpha}, {adapter.steps} steps) trained on {trained} from `{cfg.data.source}`
(adapter hash `{adapter.adapter_hash}`, config hash `{cfg.fingerprint()}`), then merged into these weights.

Classes (index: name):
{classes}

## Use
{backend.usage()}

Sampling settings of the run: {backend.sampler_name(cfg.generation)}, {cfg.generation.num_inference_steps} steps,
guidance {cfg.generation.guidance_scale}, {precision} (a sample is reproduced exactly in the same precision: run
the denoiser under `torch.autocast("cpu", dtype=torch.bfloat16)` when it says bf16).

## Evidence and limits
The run's verdict on its own test split: **{verdict}** (product arm `{product}`, mean gain over
the best baseline {mean} with 95% interval [{low}, {high}]).{left_out} It was
trained on a small labeled set: samples can be near copies of training images (the run's filter measured this;
see its report) and are meant as training data for the same task, filtered, not as a general image generator.
"""
