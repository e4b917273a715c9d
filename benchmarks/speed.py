"""Speed and memory of the default job, stage by stage, and of generation against a plain diffusers loop.

    python benchmarks/speed.py                    # the default job (8 px), cold: empty cache and run folder
    python benchmarks/speed.py --sizes 8 16 28    # also the 16 and 28 px variants (about 35 minutes in all)
    python benchmarks/speed.py --stream-n 50000   # peak RSS of generating 50,000 samples at 8 px

Stages run in this process through `augment.pipeline.run` (the flow's order, without Prefect's server, which
`augment run` adds: its start is measured separately). Peak RSS is sampled every 0.1 s over this process and its
children (the evaluation's worker processes). Prints Markdown tables.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT, print_table  # noqa: E402


class RSSMonitor:
    """Peak resident memory of this process tree, per phase."""

    def __init__(self):
        import psutil

        self.proc, self.phase, self.peaks, self.stop = psutil.Process(), None, {}, False
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def _rss(self) -> int:
        total = 0
        for p in [self.proc] + self.proc.children(recursive=True):
            try:
                total += p.memory_info().rss
            except Exception:  # a worker that just exited
                pass
        return total

    def _loop(self):
        while not self.stop:
            if self.phase:
                self.peaks[self.phase] = max(self.peaks.get(self.phase, 0), self._rss())
            time.sleep(0.1)

    def mark(self, phase):
        if self.phase:  # one last sample for the phase that ends
            self.peaks[self.phase] = max(self.peaks.get(self.phase, 0), self._rss())
        self.phase = phase


def job(config: str, size: int, out: Path) -> dict:
    from augment import pipeline
    from augment.configfile import load_config

    run, cache = out / f"job-{size}px", out / f"cache-{size}px"
    shutil.rmtree(run, ignore_errors=True)
    shutil.rmtree(cache, ignore_errors=True)  # cold: the builtin base is pretrained again
    cfg = load_config(config, [f"data.image_size={size}", f"publish.output_dir={run}", f"base.cache_dir={cache}"])
    mon = RSSMonitor()
    t0 = time.time()
    metrics = pipeline.run(cfg, log=lambda m: None, on_stage=mon.mark).to_json()
    wall = time.time() - t0
    mon.stop = True
    seconds = {k: v.get("seconds") for k, v in pipeline.runfolder.read_json(run / "run.json")["stages"].items()}
    seconds["report"] = round(wall - sum(v or 0 for v in seconds.values()), 2)
    return {"cfg": cfg, "run": run, "metrics": metrics, "wall": wall, "seconds": seconds, "rss": mon.peaks}


def cli_start() -> float:
    t0 = time.time()
    subprocess.run([sys.executable, "-m", "flows.cli", "--help"], check=True, capture_output=True)
    return time.time() - t0


def frechet(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (FID's formula, on our judge's features)."""
    from scipy import linalg

    mu = a.mean(0) - b.mean(0)
    ca, cb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = linalg.sqrtm(ca @ cb).real
    return float(mu @ mu + np.trace(ca + cb - 2 * root))


def generation_vs_plain(res: dict, n_per_class: int, repeats: int = 2) -> list[list]:
    """Our sampler (DPM-Solver++, guidance halves batched) at several step counts and precisions against a plain
    fp32 diffusers DDIM-50 loop (one UNet call per guidance half, batch 64), on the run's fine-tuned model. Quality:
    class consistency (a classifier trained on the real labeled images agrees with the intended class) and a
    Fréchet distance between that classifier's features of the samples and of the held-out real validation images
    (FID's formula on a small judge; lower is closer). Two reference rows give its noise floor: the pool's real
    images, and the default sampler on other seeds."""
    import torch
    from diffusers import DDIMScheduler

    from augment import runfolder
    from augment.backends import BaseModelInfo
    from augment.classifier import train_classifier
    from augment.diffusion import sample_noise, to_uint8
    from augment.diffusion.tensors import resolve_precision
    from augment.stages import generator, outputs

    cfg, run = res["cfg"], res["run"]
    splits = outputs.load_splits(cfg)
    backend = generator.backend_for(cfg, splits)
    info = runfolder.read_json(run / "run.json")
    model = backend.load(BaseModelInfo(**info["base"]), adapter=info["adapter"]["path"])
    K = len(splits.class_names)
    labels = np.repeat(np.arange(K), n_per_class)
    seeds = list(range(len(labels)))
    judge = train_classifier(cfg.filter.quality_classifier, splits.train.images, splits.train.labels, K, seed=0)
    held_out = judge.features(splits.validation.images)

    def ours(gen_cfg, seed_offset=0):
        out = []
        for i in range(0, len(labels), gen_cfg.batch_size):
            out.append(backend.sample(model, labels[i:i + gen_cfg.batch_size],
                                      [seed_offset + s for s in seeds[i:i + gen_cfg.batch_size]], gen_cfg))
        return np.concatenate(out)

    @torch.no_grad()
    def plain():
        # clip_sample off: clipping the guided x_0 prediction (the base's DDPM config asks for it) ruins samples
        sched = DDIMScheduler.from_config(backend.scheduler.config, clip_sample=False)
        out, w = [], cfg.generation.guidance_scale
        for i in range(0, len(labels), 64):
            y = torch.tensor(labels[i:i + 64])
            x = sample_noise(seeds[i:i + 64], backend.latent_shape)
            sched.set_timesteps(50)
            for t in sched.timesteps:
                cond = model(x, t, class_labels=y).sample
                uncond = model(x, t, class_labels=torch.full_like(y, K)).sample
                x = sched.step(uncond + w * (cond - uncond), t, x).prev_sample
            out.append(to_uint8(x))
        return np.concatenate(out)

    g = cfg.generation
    variants = [("plain diffusers DDIM-50, fp32, two UNet calls per step", plain)]
    for steps in sorted({20, 15, 12, 10, g.num_inference_steps}, reverse=True):
        for mp in ("no", "bf16"):
            gc = g.model_copy(update={"num_inference_steps": steps, "mixed_precision": mp})
            default = steps == g.num_inference_steps and mp == resolve_precision(backend.device, g.mixed_precision)
            name = (f"augment: {g.scheduler}-{steps}, {'bf16 autocast' if mp == 'bf16' else 'fp32'}, batched "
                    f"guidance, batch {g.batch_size}" + (" **(the default)**" if default else ""))
            variants.append((name, lambda gc=gc: ours(gc)))
    variants.append(("the default on other seeds (noise floor)",
                     lambda: ours(g, len(labels))))
    # Every sampler runs `repeats` times, round-robin, and keeps its fastest time: this shared machine's speed
    # drifts between minutes, and a speed-up from two timings taken minutes apart measures the drift too.
    best, images = {}, {}
    for _ in range(repeats):
        for name, fn in variants:
            t0 = time.time()
            images[name] = fn()
            best[name] = min(best.get(name, float("inf")), time.time() - t0)
    rows, plain_rate = [], None
    for name, _ in variants:
        dt = best[name]
        rate = len(labels) / dt
        plain_rate = plain_rate or rate
        consistency = float((judge.predict_proba(images[name]).argmax(1) == labels).mean())
        rows.append([name, len(labels), f"{dt:.1f}", f"{rate:.0f}", f"{rate / plain_rate:.1f}x",
                     f"{100 * consistency:.1f}", f"{frechet(judge.features(images[name]), held_out):.2f}"])
    rows.append([f"real: the unlabeled pool ({len(splits.pool)} images)", "", "", "", "", "",
                 f"{frechet(judge.features(splits.pool.images), held_out):.2f}"])
    return rows


def stream(config: str, n: int, out: Path) -> list:
    """Generate n samples at 8 px with the 8 px job's fine-tuned model in a child process; its peak RSS."""
    code = f"""
import resource, time, numpy as np, torch
from pathlib import Path
from augment import runfolder
from augment.configfile import load_config
from augment.generate import generate
from augment.stages import generator, outputs
cfg = load_config({config!r}, ["publish.output_dir={out / 'job-8px'}",
                  "base.cache_dir={out / 'cache-8px'}", "generation.num_per_class={n // 10}"])
splits = outputs.load_splits(cfg)
backend = generator.backend_for(cfg, splits)
info = runfolder.read_json(Path(cfg.publish.output_dir) / "run.json")
from augment.backends import BaseModelInfo
model = backend.load(BaseModelInfo(**info["base"]), adapter=info["adapter"]["path"])
t0 = time.time()
generate(cfg.generation, backend, model, splits.train, {str(out / 'stream')!r}, log=lambda m: None)
print(time.time() - t0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
"""
    shutil.rmtree(out / "stream", ignore_errors=True)
    res = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    seconds, rss = (float(v) for v in res.stdout.split()[-2:])
    shutil.rmtree(out / "stream", ignore_errors=True)
    return [n, f"{seconds:.0f}", f"{n / seconds:.0f}", f"{rss:.0f}"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(ROOT / "configs" / "digits.yaml"))
    p.add_argument("--sizes", type=int, nargs="+", default=[8])
    p.add_argument("--generation-per-class", type=int, default=100)
    p.add_argument("--generation-repeats", type=int, default=2,
                   help="time each sampler this many times, round-robin, and keep the fastest")
    p.add_argument("--stream-n", type=int, default=0, help="also generate this many 8 px samples (peak RSS)")
    p.add_argument("--out", default="outputs/benchmark/speed")
    p.add_argument("--generation-only", action="store_true",
                   help="only the generation tables, on the 8 px job a previous run of this script left in --out")
    a = p.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    import torch

    from augment.diffusion.tensors import cpu_kind

    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, {torch.get_num_threads()} threads")
    print(f"CPU: {cpu_kind()}")  # the figures below hold for this kind of CPU only
    print_table("Start", ["command", "seconds"], [["augment --help", f"{cli_start():.2f}"]])
    results = {}
    if a.generation_only:
        from augment.configfile import load_config

        run = out / "job-8px"
        results[8] = {"run": run, "cfg": load_config(a.config, [f"publish.output_dir={run}",
                                                                f"base.cache_dir={out / 'cache-8px'}"])}
    for size in ([] if a.generation_only else a.sizes):
        res = results[size] = job(a.config, size, out)
        cfg = res["cfg"]
        rows = [[k, f"{v:.1f}" if v is not None else "", f"{res['rss'].get(k, 0) / 2**20:.0f}"]
                for k, v in res["seconds"].items()]
        rows.append(["**total (no Prefect server)**", f"{res['wall']:.1f}",
                     f"{max(res['rss'].values()) / 2**20:.0f}"])
        print_table(f"Default job at {size}x{size}, cold ({a.config})", ["stage", "seconds", "peak RSS (MB)"], rows)
        s = res["seconds"]
        thr = [["base pretraining", cfg.base.pretrain_steps, cfg.base.pretrain_batch_size,
                f"{cfg.base.pretrain_steps * cfg.base.pretrain_batch_size / s['base']:.0f}" if s.get("base") else ""],
               ["LoRA fine-tuning", cfg.lora.max_train_steps, cfg.lora.train_batch_size,
                f"{cfg.lora.max_train_steps * cfg.lora.train_batch_size / s['finetune']:.0f}"]]
        print_table(f"Training throughput at {size}x{size}", ["loop", "steps", "batch", "images/s"], thr)
        g = res["metrics"]["evaluation"]
        print(f"\nverdict at {size}px: product {g.get('product_arm')}, gain over best baseline "
              f"{res['metrics'].get('gain_over_best_baseline', {}).get('mean')}")
    if 8 in results:
        print_table(f"Generation at 8x8 (same fine-tuned model and seeds; fastest of {a.generation_repeats} runs each)",
                    ["sampler", "samples", "seconds", "samples/s", "speed-up", "class consistency (%)",
                     "Fréchet distance to validation images"],
                    generation_vs_plain(results[8], a.generation_per_class, a.generation_repeats))
    if a.stream_n and 8 in results:
        print_table("Streaming generation at 8x8", ["samples", "seconds", "samples/s", "peak RSS (MB)"],
                    [stream(a.config, a.stream_n, out)])


if __name__ == "__main__":
    main()
