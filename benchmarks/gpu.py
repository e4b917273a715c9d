"""augment against diffusers' official LoRA scripts on one GPU, per family at its native resolution.

Sized for a 10-minute run on one H100 (under 8 minutes with the default families); `--tiny` runs the same code at
tiny sizes on the CPU in about a minute (tests/test_gpu_benchmark.py keeps it working).

On a GPU machine that has torch, transformers, peft, accelerate, pandas, pyarrow and scikit-learn but no diffusers,
pydantic, datasets or prefect, and no network: download the missing wheels here, carry them, install them there.

    echo /.whl/ >> .git/info/exclude
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
        diffusers==0.42.1 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types typing-inspection
    # --job also needs: datasets==5.2.0 dill multiprocess (and whatever `pip check` there names)
    # there (the device's `run`, carry=[".whl"]):
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
        && PYTHONPATH=/tmp/site:. python3 benchmarks/gpu.py --json $OUT/gpu.json

The diffusers scripts (examples/dreambooth/train_dreambooth_lora{,_sdxl,_sd3,_flux}.py) are not in diffusers'
wheel: benchmarks/diffusers_examples/README.md says where they come from. What it measures, per family:
1. A checkpoint: the published architecture with random weights (`_gpu_models.py`; --tiny: test-sized, 32 px),
   and photo-like random images (1/f spectrum) at the native resolution, prompted "a photo of a photo".
2. augment: `augment.finetune.finetune` (LoRA steps/s, peak memory), then `backend.sample` with the fused adapter.
3. diffusers: the official script, unchanged, with the same checkpoint, resolution, batch, rank, LoRA targets, steps
   and precision (steps/s from a timestamp after every step; load and warm-up excluded on both sides), then the
   family's pipeline + load_lora_weights on the script's adapter (images/s, peak memory).
4. `--job`: the whole job (`augment.pipeline.run`, no Prefect) on a photo-like image folder with the SD checkpoint:
   stage times.
Ratios are augment / diffusers: above 1, augment is faster.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _common import ROOT, print_table  # noqa: E402
from _gpu_models import T5_LENGTH, photo_like, write_checkpoint, write_images  # noqa: E402

SCRIPTS = ROOT / "benchmarks" / "diffusers_examples"
PROMPT = "a photo of a photo"
LORA_TARGETS = "to_k,to_q,to_v,to_out.0"  # augment's default targets, given to the scripts that take --lora_layers
# Seconds each family is expected to take on one H100 (writing the checkpoint, both sides, two process starts):
# estimates from the models' sizes, not yet measured; the budget guard skips a family that would not fit.
ESTIMATE_S = {"sd": 90, "sdxl": 140, "sd3": 130, "flux": 270}
# family: augment's backend, diffusers' script and pipeline, native size, train batch, generated batch, guidance,
# gradient checkpointing (both sides), the script's own extra flags
FAMILIES = {
    "sd": dict(kind="stable_diffusion", script="train_dreambooth_lora.py", pipeline="StableDiffusionPipeline",
               resolution=512, batch=4, gen_images=8, guidance_scale=7.5, gradient_checkpointing=False, extra=[]),
    "sdxl": dict(kind="sdxl", script="train_dreambooth_lora_sdxl.py", pipeline="StableDiffusionXLPipeline",
                 resolution=1024, batch=2, gen_images=4, guidance_scale=5.0, gradient_checkpointing=False, extra=[]),
    "sd3": dict(kind="sd3", script="train_dreambooth_lora_sd3.py", pipeline="StableDiffusion3Pipeline",
                resolution=1024, batch=2, gen_images=4, guidance_scale=7.0, gradient_checkpointing=False,
                extra=["--cache_latents", "--lora_layers", LORA_TARGETS]),
    "flux": dict(kind="flux", script="train_dreambooth_lora_flux.py", pipeline="FluxPipeline",
                 resolution=1024, batch=1, gen_images=2, guidance_scale=3.5, gradient_checkpointing=True,
                 extra=["--cache_latents", "--lora_layers", LORA_TARGETS]),
}


def device_name(dev: torch.device) -> str:
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        model = next(line.split(":", 1)[1].strip() for line in lines if line.startswith("model name"))
    except (OSError, StopIteration):
        model = platform.processor() or platform.machine()
    return f"CPU: {model}, {torch.get_num_threads()} threads"


def run_worker(side: str, spec: dict, folder: Path, timeout: float) -> tuple[dict | None, str]:
    """One side in its own process; (its RESULT, '') or (None, why it failed, with the end of its log)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{side}.json").write_text(json.dumps(spec))
    env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    cmd = [sys.executable, str(ROOT / "benchmarks" / "_gpu_worker.py"), side, str(folder / f"{side}.json")]
    log = folder / f"{side}.log"
    try:
        with log.open("w") as f:
            subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, timeout=timeout, cwd=folder)
    except subprocess.TimeoutExpired:
        return None, f"{side}: over its {timeout:.0f} s"
    text = log.read_text(errors="replace")
    results = [line[len("RESULT "):] for line in text.splitlines() if line.startswith("RESULT ")]
    if results:
        return json.loads(results[-1]), ""
    tail = [line for line in text.replace("\r", "\n").splitlines() if line.strip()][-6:]
    return None, f"{side} failed ({log}):\n    " + "\n    ".join(tail)


def script_args(spec: dict, f: dict, out: Path, cuda: bool) -> list[str]:
    """The official script's command line: the same checkpoint, data, resolution, batch, rank, steps and precision
    as augment's side; no validation, no hub push, no intermediate checkpoint."""
    args = ["--pretrained_model_name_or_path", spec["checkpoint"], "--instance_data_dir", spec["images"],
            "--instance_prompt", PROMPT, "--resolution", str(spec["resolution"]),
            "--train_batch_size", str(spec["batch"]), "--max_train_steps", str(spec["steps"]),
            "--rank", str(spec["rank"]), "--mixed_precision", spec["mixed_precision"], "--output_dir", str(out),
            "--learning_rate", "1e-4", "--lr_warmup_steps", "0", "--seed", "0", "--dataloader_num_workers", "0",
            "--checkpointing_steps", str(spec["steps"] + 1), "--report_to", "tensorboard", *f["extra"]]
    if spec["kind"] == "flux":
        args += ["--lora_alpha", str(spec["rank"])]  # the others set alpha = rank, as augment here
    if spec["kind"] in T5_LENGTH:
        args += ["--max_sequence_length", str(spec["max_sequence_length"])]
    if f["gradient_checkpointing"]:
        args.append("--gradient_checkpointing")
    if cuda:
        args.append("--allow_tf32")  # augment turns TF32 on for CUDA matmuls (backends.resolve_device)
    return args


def t5_length(kind: str, checkpoint: Path) -> int | None:
    """The T5 tokens augment's backend uses: the pipeline's default, or the tokenizer's maximum when shorter."""
    if kind not in T5_LENGTH:
        return None
    sub = "tokenizer_3" if kind == "sd3" else "tokenizer_2"
    conf = json.loads((checkpoint / sub / "tokenizer_config.json").read_text())
    return int(min(T5_LENGTH[kind], conf.get("model_max_length", T5_LENGTH[kind])))


def bench_family(name: str, a: argparse.Namespace, dev: torch.device, work: Path) -> dict:
    """Steps back: one family's row (see the module's recipe)."""
    f, cuda = FAMILIES[name], dev.type == "cuda"
    folder = work / name
    shutil.rmtree(folder, ignore_errors=True)
    # 1. Checkpoint and photo-like images at the native resolution (--tiny: 32 px).
    t0 = time.perf_counter()
    checkpoint, resolution = folder / "checkpoint", 32 if a.tiny else f["resolution"]
    built = write_checkpoint(name, checkpoint, a.tiny, dev, None if a.full_text_encoders else a.t5_layers)
    write_images(folder / "images", photo_like(a.images, resolution, seed=1))
    print(f"  {built} ({time.perf_counter() - t0:.0f} s)", flush=True)
    spec = dict(kind=f["kind"], checkpoint=str(checkpoint), images=str(folder / "images"), out=str(folder),
                resolution=resolution, batch=2 if a.tiny else f["batch"], steps=a.steps, skip=a.skip, rank=a.rank,
                gen_images=2 if a.tiny else f["gen_images"], inference_steps=a.inference_steps,
                guidance_scale=f["guidance_scale"], gradient_checkpointing=f["gradient_checkpointing"],
                mixed_precision="bf16" if cuda else "no", prompt=PROMPT, pipeline=f["pipeline"],
                max_sequence_length=t5_length(f["kind"], checkpoint), script=str(SCRIPTS / f["script"]),
                threads=1 if a.tiny else None)
    row = {"family": name, "resolution": resolution, "batch": spec["batch"], "steps": a.steps, "checkpoint": built}
    # 2. diffusers' official script (its adapter is what the pipeline loads); 3. augment, then the plain pipeline,
    # in one process (each peak counts only its own allocations).
    row["errors"], theirs, sides = [], None, "augment"
    if not Path(spec["script"]).exists():
        row["errors"].append(f"diffusers: {spec['script']} is missing (benchmarks/diffusers_examples/README.md)")
    else:
        spec["script_args"] = script_args(spec, f, folder / "diffusers-lora", cuda)
        spec["lora_dir"] = str(folder / "diffusers-lora")
        theirs, why = run_worker("script", spec, folder, a.timeout)
        row["errors"] += [why] if why else []
        sides = "augment,pipeline" if theirs is not None else sides
    both, why = run_worker(sides, spec, folder, a.timeout)
    row["errors"] += [why] if why else []
    both = both if both is None or "," in sides else {"augment": both}
    row["augment"] = (both or {}).get("augment")
    if theirs is not None:
        theirs.update((both or {}).get("pipeline") or {})
    row["diffusers"] = theirs
    if a.job and name == "sd":
        row["job"] = bench_job(a, checkpoint, work)
    if not a.keep:
        shutil.rmtree(checkpoint, ignore_errors=True)  # FLUX.1's is 25 GB: the disk holds one family at a time
    row["seconds"] = time.perf_counter() - t0
    return row


def bench_job(a: argparse.Namespace, checkpoint: Path, work: Path) -> dict | None:
    """The whole job on a photo-like image folder (two classes) with the SD checkpoint: stage times."""
    size = 32 if a.tiny else 512
    data = work / "job-photos"
    for k, cls in enumerate(("meadow", "harbour")):
        write_images(data / cls, photo_like(14, size, seed=10 + k))
    config = "configs/sd-tiny.yaml" if a.tiny else "configs/sd15-lora.yaml"
    overrides = [f"data.source={data}", f"base.pretrained={checkpoint}", f"publish.output_dir={work / 'job'}",
                 f"base.cache_dir={work / 'job-cache'}", "data.shots_per_class=4", "device=auto"]
    if not a.tiny:  # sized to a few minutes: fewer steps, samples and seeds than the config's
        overrides += ["lora.max_train_steps=100", "generation.num_per_class=8", "generation.num_inference_steps=20",
                      "evaluation.seeds=2", "generation.strengths=[1.0]"]
    spec = {"config": str(ROOT / config), "overrides": overrides, "run": str(work / "job")}
    result, why = run_worker("job", spec, work / "job-log", a.timeout)
    print(f"  job: {why}" if why else "  job: done", flush=True)
    return result


def fmt(x, unit: str = "") -> str:
    return "n/a" if x is None else f"{x:.3g}{unit}"


def ratio(ours: dict | None, theirs: dict | None, key: str) -> float | None:
    if not ours or not theirs or not ours.get(key) or not theirs.get(key):
        return None
    return ours[key] / theirs[key]


def report(rows: list[dict], dev: torch.device, name: str, a: argparse.Namespace) -> None:
    mem = "GB, GPU peak allocated" if dev.type == "cuda" else "GB, process peak RSS"
    header = ["family", "px", "batch", "augment steps/s", "diffusers steps/s", "ratio", "augment images/s",
              "diffusers images/s", "ratio", "train peak augment", "train peak diffusers", "gen peak augment",
              "gen peak diffusers"]
    table = []
    for r in rows:
        ours, theirs = r.get("augment") or {}, r.get("diffusers") or {}
        r["steps_ratio"], r["images_ratio"] = ratio(ours, theirs, "steps_per_s"), ratio(ours, theirs, "images_per_s")
        table.append([r["family"], r["resolution"], r["batch"], fmt(ours.get("steps_per_s")),
                      fmt(theirs.get("steps_per_s")), fmt(r["steps_ratio"]), fmt(ours.get("images_per_s")),
                      fmt(theirs.get("images_per_s")), fmt(r["images_ratio"]), fmt(ours.get("train_peak_gb")),
                      fmt(theirs.get("train_peak_gb")), fmt(ours.get("gen_peak_gb")), fmt(theirs.get("gen_peak_gb"))])
    print_table(f"augment vs diffusers' official LoRA scripts on {name} (peak memory in {mem}; ratio = augment / "
                f"diffusers; LoRA rank {a.rank}, {a.steps} steps, steps/s over steps {a.skip + 1}-{a.steps}; "
                f"{a.inference_steps} sampling steps, timed after a warm-up batch)", header, table)
    for r in rows:
        ours, theirs = r.get("augment") or {}, r.get("diffusers") or {}
        print(f"- {r['family']}: augment samples with {ours.get('sampler', 'n/a')} in {ours.get('dtype', 'n/a')}, "
              f"the pipeline with {theirs.get('sampler', 'n/a')} in {theirs.get('dtype', 'n/a')}; "
              f"{r['seconds']:.0f} s in all")
        for err in r["errors"]:
            print(f"  {err}")
        if r.get("job"):
            stages = ", ".join(f"{k} {v:.1f} s" for k, v in r["job"]["seconds"].items() if v is not None)
            print(f"  the whole job (stage times): {stages}; {r['job']['wall']:.0f} s wall")


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tiny", action="store_true", help="tiny checkpoints at 32 px, on whatever device (CPU: seconds)")
    p.add_argument("--families", nargs="+", choices=list(FAMILIES), default=list(FAMILIES))
    p.add_argument("--steps", type=int, default=None, help="LoRA steps per side (default 12; --tiny 6)")
    p.add_argument("--skip", type=int, default=2, help="first steps left out of steps/s (warm-up)")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--images", type=int, default=8, help="photo-like training images per family")
    p.add_argument("--inference-steps", type=int, default=None, help="sampling steps (default 20; --tiny 4)")
    p.add_argument("--t5-layers", type=int, default=2, help="T5-XXL layers written for SD 3.x and FLUX.1 (24 = all)")
    p.add_argument("--full-text-encoders", action="store_true", help="write T5-XXL whole (24 layers, 9.5 GB)")
    p.add_argument("--job", action="store_true", help="also the whole job on photo-like data (needs pydantic, "
                   "datasets)")
    p.add_argument("--budget-s", type=float, default=480, help="start no family expected to end past this")
    p.add_argument("--timeout", type=float, default=420, help="seconds any one side may take")
    p.add_argument("--work", type=Path, default=ROOT / "outputs" / "gpu-bench")
    p.add_argument("--keep", action="store_true", help="keep the checkpoints")
    p.add_argument("--json", type=Path, help="write the figures here")
    a = p.parse_args(argv)
    a.steps = a.steps or (6 if a.tiny else 12)
    a.inference_steps = a.inference_steps or (4 if a.tiny else 20)
    if a.steps <= a.skip + 1:
        p.error(f"--steps {a.steps} leaves no timed steps after --skip {a.skip}")
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dev.type == "cpu" and not a.tiny:
        print("warning: no GPU; the real sizes (SDXL, SD 3.5, FLUX.1) take hours on a CPU: use --tiny")
    name, t0, rows = device_name(dev), time.perf_counter(), []
    print(f"device: {name}; torch {torch.__version__}; {'tiny' if a.tiny else 'published'} sizes", flush=True)
    for family in a.families:
        spent, expected = time.perf_counter() - t0, 0 if a.tiny else ESTIMATE_S[family]
        if spent + expected > a.budget_s:
            print(f"{family}: skipped (about {expected} s more at {spent:.0f} s would pass --budget-s "
                  f"{a.budget_s:.0f}; run it alone: --families {family})", flush=True)
            continue
        print(f"{family}:", flush=True)
        rows.append(bench_family(family, a, dev, a.work))
        if a.json:  # after every family: a run stopped at its time limit keeps what it measured
            a.json.parent.mkdir(parents=True, exist_ok=True)
            a.json.write_text(json.dumps({"device": name, "torch": torch.__version__, "tiny": a.tiny, "rows": rows},
                                         indent=2, default=str))
    report(rows, dev, name, a)
    print(f"\n{time.perf_counter() - t0:.0f} s in all")
    if a.json:  # again: report() added the ratios
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps({"device": name, "torch": torch.__version__, "tiny": a.tiny, "rows": rows},
                                     indent=2, default=str))
    return rows


if __name__ == "__main__":
    main()
