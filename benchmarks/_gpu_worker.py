"""One side of one family of benchmarks/gpu.py, in its own process (so that each peak memory is its own):

    python benchmarks/_gpu_worker.py script SPEC.json     # diffusers' official LoRA script, unchanged
    python benchmarks/_gpu_worker.py augment SPEC.json    # augment's fine-tuning and generation
    python benchmarks/_gpu_worker.py pipeline SPEC.json   # the family's plain diffusers pipeline + the script's LoRA
    python benchmarks/_gpu_worker.py augment,pipeline SPEC.json   # both in turn (one start-up)

Each prints one line `RESULT {json}` (keyed by side when several run). A side's peak GPU memory counts only what
it allocated: the peak since its start, less what was still held then.

Steps/s comes from a timestamp after every optimizer step (each side reads
the loss with .item() there, so the GPU has finished the step): (k_last - k_first) / (t_last - t_first) over the
steps after the first `skip`, so that loading, latent caching and the first steps' warm-up are not counted.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


HELD = [0]  # bytes still allocated at the last reset (what an earlier side of this process left behind)


def peak_gb(dev: torch.device) -> float:
    """Peak GPU memory allocated since the last reset, above what was held then (CUDA), else this process's peak
    RSS, in GB."""
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        return (torch.cuda.max_memory_allocated(dev) - HELD[0]) / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9


def reset_peak(dev: torch.device) -> None:
    import gc

    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)
        HELD[0] = torch.cuda.memory_allocated(dev)


def rate(stamps: list[tuple[int, float]], skip: int) -> float | None:
    """Steps per second between the (step, time) stamps after the first `skip` steps."""
    kept = [s for s in stamps if s[0] > skip]
    if len(kept) < 2:
        return None
    (k0, t0), (k1, t1) = kept[0], kept[-1]
    return (k1 - k0) / (t1 - t0)


def images(spec: dict) -> np.ndarray:
    from PIL import Image

    files = sorted(Path(spec["images"]).glob("*.png"))
    return np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files])


def augment_side(spec: dict) -> dict:
    """augment's own code on the checkpoint: finetune() (the product's loop) and backend.sample (its sampler)."""
    from augment.backends import create, resolve_device
    from augment.config import BaseModelConfig, GenerationConfig, LoRAConfig
    from augment.data import ImageSet
    from augment.finetune import finetune

    # 1. The backend over the checkpoint, the photos as one class prompted with the script's instance prompt.
    dev = resolve_device("auto")
    x = images(spec)
    train = ImageSet(x, np.zeros(len(x), np.int64), ["photo"], [f"photo-{i}" for i in range(len(x))])
    out = Path(spec["out"]) / "augment"
    base = BaseModelConfig(kind=spec["kind"], pretrained=spec["checkpoint"], prompt_template=spec["prompt"],
                           cache_dir=str(out / "cache"), gradient_checkpointing=spec["gradient_checkpointing"])
    backend = create(base, train.class_names, spec["resolution"], 3, dev)
    info = backend.prepare(train, train, log=lambda m: None)
    lora = LoRAConfig(rank=spec["rank"], lora_alpha=spec["rank"], max_train_steps=spec["steps"],
                      train_batch_size=spec["batch"], mixed_precision=spec["mixed_precision"],
                      learning_rate=1e-4, checkpointing_steps=spec["steps"], use_pseudo_labeled=False, seed=0)

    # 2. Fine-tune, a timestamp after every step.
    stamps: list[tuple[int, float]] = []
    reset_peak(dev)
    adapter = finetune(lora, backend, info, train, out / "finetune", log=lambda m: None,
                       progress=lambda k, n: stamps.append((k, time.perf_counter())))
    train_peak = peak_gb(dev)

    # 3. Generate with the fused adapter: a warm-up batch of 2 steps, then one timed batch.
    reset_peak(dev)
    model = backend.for_sampling(backend.load(info, adapter.path))  # the training model is gone with finetune()
    gen = GenerationConfig(num_inference_steps=spec["inference_steps"], guidance_scale=spec["guidance_scale"],
                           batch_size=spec["gen_images"], num_per_class=spec["gen_images"])
    backend.sample(model, np.zeros(1, np.int64), [0], gen.model_copy(update={"num_inference_steps": 2}))
    t0 = time.perf_counter()
    made = backend.sample(model, np.zeros(spec["gen_images"], np.int64), list(range(spec["gen_images"])), gen)
    seconds = time.perf_counter() - t0
    assert made.shape == (spec["gen_images"], spec["resolution"], spec["resolution"], 3), made.shape
    return {"steps_per_s": rate(stamps, spec["skip"]), "train_peak_gb": train_peak,
            "images_per_s": spec["gen_images"] / seconds, "gen_peak_gb": peak_gb(dev),
            "sampler": backend.sampler_name(gen), "dtype": str(backend.dtype).replace("torch.", "")}


def script_side(spec: dict) -> dict:
    """diffusers' official script, run unchanged in this process (runpy): a timestamp at each step's
    progress_bar.set_postfix (after its loss.item()); the run stops once the LoRA is saved, before the script's
    final inference reloads the whole pipeline (with no validation prompt it only loads it)."""
    import runpy

    from diffusers.loaders import lora_base
    from tqdm.auto import tqdm

    # 1. Hooks: the step timestamps and peak memory; stop after the LoRA is written.
    dev, stamps, peaks, result = device(), [], [], {}
    set_postfix = tqdm.set_postfix

    def timed_postfix(bar, *args, **kwargs):
        if getattr(bar, "desc", "").startswith("Steps"):
            stamps.append((len(stamps) + 1, time.perf_counter()))
            peaks.append(peak_gb(dev))
        return set_postfix(bar, *args, **kwargs)

    save = lora_base.LoraBaseMixin.__dict__["_save_lora_weights"].__func__

    def save_then_stop(cls, *args, **kwargs):
        save(cls, *args, **kwargs)
        finish()
        os._exit(0)

    def finish() -> None:
        result.update(steps_per_s=rate(stamps, spec["skip"]), train_peak_gb=max(peaks) if peaks else None,
                      steps=len(stamps))
        print("RESULT " + json.dumps(result), flush=True)

    tqdm.set_postfix = timed_postfix
    lora_base.LoraBaseMixin._save_lora_weights = classmethod(save_then_stop)
    # 2. The script's own command line.
    sys.argv = [spec["script"], *spec["script_args"]]
    reset_peak(dev)
    runpy.run_path(spec["script"], run_name="__main__")
    finish()  # the script returned without saving through LoraBaseMixin
    return result


def pipeline_side(spec: dict) -> dict:
    """What a team would run: the family's pipeline from_pretrained, load_lora_weights on the script's adapter,
    then the pipeline call (DPM-Solver++ for SD 1.x/2.x and SDXL, as augment samples; the flow families keep
    their FlowMatch Euler)."""
    import diffusers

    dev = device()
    dtype = torch.bfloat16 if dev.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    reset_peak(dev)
    pipe = getattr(diffusers, spec["pipeline"]).from_pretrained(spec["checkpoint"], torch_dtype=dtype).to(dev)
    if spec["kind"] in ("stable_diffusion", "sdxl"):
        pipe.scheduler = diffusers.DPMSolverMultistepScheduler.from_config(
            pipe.scheduler.config, algorithm_type="dpmsolver++", solver_order=2)
    pipe.load_lora_weights(spec["lora_dir"])
    pipe.set_progress_bar_config(disable=True)
    kw = dict(height=spec["resolution"], width=spec["resolution"], guidance_scale=spec["guidance_scale"],
              output_type="np")
    if spec["kind"] in ("sd3", "flux"):
        kw["max_sequence_length"] = spec["max_sequence_length"]
    pipe(spec["prompt"], num_inference_steps=2, num_images_per_prompt=1, **kw)  # warm-up
    t0 = time.perf_counter()
    out = pipe(spec["prompt"], num_inference_steps=spec["inference_steps"],
               num_images_per_prompt=spec["gen_images"], generator=torch.Generator().manual_seed(0), **kw).images
    seconds = time.perf_counter() - t0
    assert len(out) == spec["gen_images"], len(out)
    return {"images_per_s": spec["gen_images"] / seconds, "gen_peak_gb": peak_gb(dev),
            "sampler": type(pipe.scheduler).__name__, "dtype": str(dtype).replace("torch.", "")}


def job_side(spec: dict) -> dict:
    """The whole job, every stage in this process (augment.pipeline.run, no Prefect): seconds per stage."""
    try:
        from augment import pipeline
        from augment.configfile import load_config
    except ImportError as err:  # the GPU machine's image lacks pydantic and datasets unless they are carried
        raise SystemExit(f"job skipped: {err} (carry its wheel: see benchmarks/gpu.py)") from None
    cfg = load_config(spec["config"], spec["overrides"])
    t0 = time.perf_counter()
    pipeline.run(cfg, log=lambda m: None)
    wall = time.perf_counter() - t0
    stages = pipeline.runfolder.read_json(Path(spec["run"]) / "run.json")["stages"]
    return {"seconds": {k: v.get("seconds") for k, v in stages.items()}, "wall": wall}


if __name__ == "__main__":
    side, spec = sys.argv[1], json.loads(Path(sys.argv[2]).read_text())
    if spec.get("threads"):  # --tiny: one torch thread, so that a busy small CPU times both sides alike
        torch.set_num_threads(spec["threads"])
    sides = {"augment": augment_side, "script": script_side, "pipeline": pipeline_side, "job": job_side}
    if side == "script":
        script_side(spec)
    else:
        names = side.split(",")
        results = {name: sides[name](spec) for name in names}
        print("RESULT " + json.dumps(results if len(names) > 1 else results[names[0]]), flush=True)
