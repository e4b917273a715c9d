"""Use a finished run's generator elsewhere: more samples on demand, and a standalone diffusers checkpoint.

    augment generate RUN_DIR --class 3 -n 100 --seed 7 --out more/     # an image folder + provenance.parquet
    augment export RUN_DIR OUT                                         # a diffusers checkpoint + model card

Both read only the run folder (its config.yaml, run.json and adapter) and the base model it names.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from augment.stages import core, generator, outputs
from augment import run as run_folder
from augment.backends import BaseModelInfo
from augment.finetune import AdapterInfo
from augment.config import RunConfig
from augment.configfile import load_config
from augment.errors import ModelError
from augment.generate import sampling_precision
from augment.report.schema import Metrics, read_metrics


def load_run(run_dir: str | Path) -> RunConfig:
    """The config and run.json of a finished run folder (the folder may have moved: its path is taken from here)."""
    run = run_folder.RunFolder(run_dir)
    if not run.config.exists() or not run.info.exists():
        raise FileNotFoundError(f"{run.root} is not an augment run folder (no {run.config.name} / {run.info.name})")
    cfg = load_config(run.config)
    cfg = cfg.model_copy(update={"publish": cfg.publish.model_copy(update={"output_dir": str(run.root)})})
    info = run_folder.read_json(run.info) or {}
    if "adapter" not in info or not run.finetune.adapter.path.exists():
        raise FileNotFoundError(f"{run.root} has no fine-tuned adapter yet: run the job to its end first")
    return cfg


def _model(cfg: RunConfig):
    splits = outputs.load_splits(cfg)
    backend = generator.backend_for(cfg, splits)
    adapter = core.folder(cfg).finetune.adapter.path
    base, _ = generator.recorded(cfg)
    return splits, backend, backend.load(base, adapter=adapter)


def generate_more(run_dir: str | Path, class_name: str, n: int, seed: int = 0,
                  output_dir: str | Path | None = None) -> pd.DataFrame:
    """Draw `n` new samples of `class_name` from the run's fine-tuned generator, with the run's sampler settings.

    Sample j of class k gets the seed the run's plan would give it under generation seed `seed` (so `--seed` equal
    to the run's generation.seed reproduces its candidates). With `output_dir`, writes `<class>/<sample_id>.png`
    and `provenance.parquet` there. Returns the provenance table (with an `image` column of uint8 arrays)."""
    from augment.imagefiles import to_pil

    from augment.generate import sample_seed

    cfg = load_run(run_dir)
    splits, backend, model = _model(cfg)
    base, adapter = generator.recorded(cfg)
    names = splits.class_names
    if class_name not in names:
        raise ModelError(f"class {class_name!r} is not one of this run's classes: {', '.join(names)}")
    if n < 1:
        raise ModelError(f"-n must be at least 1 (got {n})")
    k = names.index(class_name)
    seeds = [sample_seed(seed, k, j) for j in range(n)]
    gen = cfg.generation
    images = np.concatenate([backend.sample(model, np.full(len(seeds[i:i + gen.batch_size]), k),
                                            seeds[i:i + gen.batch_size], gen)
                             for i in range(0, n, gen.batch_size)])
    prompt, negative = backend.prompt(k)
    table = pd.DataFrame({
        "sample_id": [f"more-{seed}-{k}-{j}" for j in range(n)], "label": k, "class": class_name,
        "seed": np.array(seeds, np.int64), "strength": 1.0, "guidance_scale": gen.guidance_scale,
        "num_inference_steps": gen.num_inference_steps, "scheduler": gen.scheduler, "prompt": prompt,
        "negative_prompt": negative, "base_model": base.name,
        "adapter_hash": adapter.adapter_hash, "config_hash": cfg.fingerprint(),
    })
    if output_dir is not None:
        out = Path(output_dir)
        (out / class_name).mkdir(parents=True, exist_ok=True)
        for sid, img in zip(table["sample_id"], images):
            to_pil(img).save(out / class_name / f"{sid}.png")
        table.to_parquet(out / "provenance.parquet")
    return table.assign(image=list(images))


def export_model(run_dir: str | Path, output_dir: str | Path) -> Path:
    """Write the fine-tuned generator as a standalone diffusers checkpoint with a model card: the pixel backend's
    merged `UNet2DModel` (K + 1 class rows, the last one the null class) and scheduler, or the Stable Diffusion
    pipeline with the LoRA fused into its UNet. No augment needed to load it."""
    cfg = load_run(run_dir)
    out = Path(output_dir)
    if out.exists() and any(out.iterdir()):
        raise ModelError(f"{out} exists and is not empty; export writes into a new or empty folder")
    splits, backend, model = _model(cfg)
    backend.export(model, out)
    metrics = read_metrics(run_folder.RunFolder(run_dir).metrics)
    (out / "README.md").write_text(_model_card(cfg, *generator.recorded(cfg), splits.class_names, backend, metrics,
                                               sampling_precision(run_dir, cfg)))
    return out


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

Sampling settings of the run: {cfg.generation.scheduler}, {cfg.generation.num_inference_steps} steps, classifier-free
guidance {cfg.generation.guidance_scale}, {precision} (a sample is reproduced exactly in the same precision: run
the UNet under `torch.autocast("cpu", dtype=torch.bfloat16)` when it says bf16).

## Evidence and limits
The run's verdict on its own test split: **{verdict}** (product arm `{product}`, mean gain over
the best baseline {mean} with 95% interval [{low}, {high}]).{left_out} It was
trained on a small labeled set: samples can be near copies of training images (the run's filter measured this;
see its report) and are meant as training data for the same task, filtered, not as a general image generator.
"""
