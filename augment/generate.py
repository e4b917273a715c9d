"""Class-conditional generation of candidate samples, planned up front and written to disk in shards.

Every sample gets its own seed (derived from the generation seed, its class and its index), which fixes its
noise, its image-to-image strength and its source image; so any shard, or any single sample, can be regenerated
exactly, and a killed run resumes from the shards already on disk.
"""

from __future__ import annotations

import time
import zipfile
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch

from augment import results
from augment.config import GenerationConfig
from augment.data import ImageSet
from augment.diffusion.tensors import resolve_precision
from augment.results import GenerationRecord
from augment.runfolder import CandidatesFolder

if TYPE_CHECKING:  # pragma: no cover
    from augment.backends import Backend


@dataclass
class Candidates:
    images: np.ndarray  # uint8 (N, H, W, C)
    meta: pd.DataFrame  # one row per image: sample_id, label, seed, strength, source_id, guidance_scale, ...

    def __len__(self) -> int:
        return len(self.meta)

    @property
    def labels(self) -> np.ndarray:
        return self.meta["label"].to_numpy(np.int64)


def per_class_counts(cfg: GenerationConfig, train_counts: list[int]) -> list[int]:
    if cfg.balance == "none":
        return [cfg.num_per_class] * len(train_counts)
    target = max(train_counts) if cfg.balance == "max" else cfg.balance_target
    return [max(0, target - c) for c in train_counts]


def sample_seed(seed: int, label: int, index: int) -> int:
    return int(np.random.SeedSequence([seed, label, index]).generate_state(1)[0])


def plan(cfg: GenerationConfig, train: ImageSet,
         prompts: list[tuple[str, str]] | dict[str, list[tuple[str, str]]] | None = None,
         sampler: str | None = None, adaptations: Sequence[str] = ("lora",),
         row_prompt: Callable[[str, int, int], tuple[tuple[str, str], int]] | None = None) -> pd.DataFrame:
    """One row per sample to generate, fully determined by the config, the train split and the class prompts
    (the backend's (prompt, negative prompt) per class, or per adaptation when they differ; empty for a backend
    without text). `sampler`: the sampler
    the backend uses (default generation.scheduler), for the provenance column `scheduler`. `adaptations`
    (lora.adaptations): every one samples the same seeds, strengths and sources, so that they compare paired; the
    first one's rows keep the ids `syn-<class>-<j>`, another's are `syn-<adaptation>-<class>-<j>`. `row_prompt`
    (backend.row_prompt): per sample, its prompt and the conditioning row it samples with (prompt variants, column
    `condition`; the class index otherwise)."""
    rows = []
    for a, adaptation in enumerate(adaptations):
        for k, n in enumerate(per_class_counts(cfg, train.class_counts())):
            mine = prompts.get(adaptation) if isinstance(prompts, dict) else prompts
            prompt, negative = mine[k] if mine else ("", "")
            sources = np.flatnonzero(train.labels == k)
            for j in range(n):
                if row_prompt is not None:
                    (prompt, negative), condition = row_prompt(adaptation, k, j)
                else:
                    condition = k
                s = sample_seed(cfg.seed, k, j)
                r = np.random.default_rng(s)
                strength = float(cfg.strengths[r.integers(len(cfg.strengths))])
                src = int(sources[r.integers(len(sources))]) if strength < 1.0 else -1
                rows.append({"sample_id": f"syn-{k}-{j}" if a == 0 else f"syn-{adaptation}-{k}-{j}", "label": k,
                             "seed": s, "strength": strength, "source_index": src,
                             "source_id": train.ids[src] if src >= 0 else "", "guidance_scale": cfg.guidance_scale,
                             "num_inference_steps": cfg.num_inference_steps, "scheduler": sampler or cfg.scheduler,
                             "eta": cfg.eta, "prompt": prompt, "negative_prompt": negative,
                             "adaptation": adaptation, "condition": condition, "_j": j})
    columns = ["sample_id", "label", "seed", "strength", "source_index", "source_id", "guidance_scale",
               "num_inference_steps", "scheduler", "eta", "prompt", "negative_prompt", "adaptation", "condition", "_j"]
    df = pd.DataFrame(rows, columns=columns).astype({"label": "int64", "seed": "int64", "source_index": "int64",
                                                     "condition": "int64"})
    df["shard"] = np.zeros(len(df), np.int64)
    if len(df):
        # Interleave classes so that every shard holds all classes (partial runs stay balanced), and the
        # adaptations' samples of one seed sit side by side.
        df = df.sort_values(["_j", "label"], kind="stable").reset_index(drop=True)
        df["shard"] = np.arange(len(df)) // cfg.shard_size
    return df.drop(columns="_j")


def write_plan(cfg: GenerationConfig, backend: "Backend", train: ImageSet, output_dir: str | Path,
               adaptations: Sequence[str] = ("lora",)) -> pd.DataFrame:
    """Plan every sample (plan.parquet) and return the plan; the shards are the units of work."""
    out = CandidatesFolder(output_dir)
    out.path.mkdir(parents=True, exist_ok=True)
    prompts = {a: backend.adaptation_prompts(a) for a in adaptations}
    df = plan(cfg, train, prompts, backend.sampler_name(cfg), adaptations, backend.row_prompt)
    df.to_parquet(out.plan)
    return df


def damaged_shards(output_dir: str | Path) -> list[Path]:
    """The finished shards that no longer read whole (a flipped byte fails the zip's CRC, a truncated file its
    directory): removed, so that the generate stage makes them again."""
    bad = []
    for path in sorted(Path(output_dir).glob("shard-*.npz")):
        if path.name.endswith(".tmp.npz"):
            continue
        try:
            with np.load(path, allow_pickle=False) as z:
                for name in z.files:
                    z[name]
        except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, zlib.error):
            path.unlink()
            bad.append(path)
    return bad


def shard_done(output_dir: str | Path, df: pd.DataFrame, shard: int) -> bool:
    """True when the shard's file exists and was written for this plan (by this or an earlier, killed run)."""
    path = CandidatesFolder(output_dir).shard(shard)
    return path.exists() and _shard_plan(path) == _plan_hash(df)


def generate_shard(cfg: GenerationConfig, backend: "Backend", model: "torch.nn.Module | Mapping[str, torch.nn.Module]",
                   train: ImageSet, output_dir: str | Path, df: pd.DataFrame, shard: int,
                   on_batch: Callable[[int], None] | None = None, feedback: torch.nn.Module | None = None) -> int:
    """Generate one shard of the plan into its file in `output_dir` (atomically); returns its size. `model`: the
    denoiser, or one per adaptation (the plan's `adaptation` column). Any process that sees the folder can do it:
    every sample's noise comes from its own seed, and it samples on one torch thread wherever it runs
    (augment.parallel), so a shard is the same from any runner."""
    from augment.parallel import one_thread

    out = CandidatesFolder(output_dir)
    rows = df[df["shard"] == shard]
    _, h, w, c = train.images.shape
    images = np.zeros((len(rows), h, w, c), np.uint8)
    # Same-strength samples share a trajectory length, so they batch together.
    with one_thread():
        for (adaptation, strength), group in rows.groupby(["adaptation", "strength"], sort=True):
            pos = rows.index.get_indexer(group.index)
            denoiser = model[adaptation] if isinstance(model, Mapping) else model
            backend.use_adaptation(adaptation)  # its conditioning (a textual-inversion adaptation's tokens)
            for i in range(0, len(group), cfg.batch_size):
                g, p = group.iloc[i:i + cfg.batch_size], pos[i:i + cfg.batch_size]
                init = train.images[g["source_index"].to_numpy()] if strength < 1.0 else None
                rows_of = g["condition"] if "condition" in g else g["label"]  # the conditioning rows (prompt variants)
                images[p] = backend.sample(denoiser, rows_of.to_numpy(), g["seed"].tolist(), cfg,
                                           strength=float(strength), init_images=init, feedback=feedback)
                if on_batch:
                    on_batch(len(g))
    backend.use_adaptation("base")
    tmp = out.shard_tmp(shard)
    np.savez(tmp, images=images, sample_id=rows["sample_id"].to_numpy().astype(str), plan=np.array(_plan_hash(df)))
    tmp.replace(out.shard(shard))
    return len(rows)


def generate(
    cfg: GenerationConfig,
    backend: "Backend",
    model: "torch.nn.Module | Mapping[str, torch.nn.Module]",
    train: ImageSet,
    output_dir: str | Path,
    progress: Callable[[int, int], None] | None = None,
    log=print,
    feedback: torch.nn.Module | None = None,
) -> Path:
    """Generate every planned sample into the shard files of `output_dir`, here; returns `output_dir`. `model`: the
    denoiser, or a mapping of lora.adaptations to theirs. `feedback`: the classifier of feedback-guided sampling
    (generation.feedback_scale)."""
    out = Path(output_dir)
    df = write_plan(cfg, backend, train, out, list(model) if isinstance(model, Mapping) else ("lora",))
    total, done, t0 = len(df), [0], time.time()

    def tick(n: int) -> None:
        done[0] += n
        if progress:
            progress(done[0], total)

    for shard in (sorted(df["shard"].unique()) if total else []):
        if shard_done(out, df, shard):  # finished by an earlier (possibly killed) run
            done[0] += int((df["shard"] == shard).sum())
            continue
        generate_shard(cfg, backend, model, train, out, df, shard, on_batch=tick, feedback=feedback)
        log(f"generate: shard {shard} written ({done[0]}/{total}, {time.time() - t0:.0f}s)")
    finish(out, total, time.time() - t0, sampled_in(backend, cfg))
    return out


def sampled_in(backend: "Backend", cfg: GenerationConfig) -> str:
    """The precision `backend` samples in under `cfg`: its weights' when they are in half precision
    (base.weights_dtype: "bf16", "fp16"), else generation.mixed_precision resolved on its device ("no" = fp32,
    "bf16")."""
    dtype = getattr(backend, "dtype", torch.float32)
    if dtype != torch.float32:
        return "fp16" if dtype == torch.float16 else "bf16"
    return resolve_precision(backend.device, cfg.mixed_precision)


def finish(output_dir: str | Path, samples: int, seconds: float, precision: str) -> None:
    """Mark the candidates complete, with the precision they were sampled in (`sampled_in`): reproducing a sample
    exactly needs it."""
    results.save(CandidatesFolder(output_dir).done, GenerationRecord(samples=samples, seconds=seconds,
                                                                     precision=precision))


def _plan_hash(df: pd.DataFrame) -> str:
    """Identity of a plan: every sample's id, class, seed, strength and source. A shard written for another plan
    (another config, or another run in the same folder) is never taken as finished. Computed once per plan
    table (kept in its attrs): every shard asks for it, and a 50,000-row plan takes a while to serialise."""
    import hashlib

    if "plan_hash" not in df.attrs:
        cols = ["sample_id", "label", "seed", "strength", "source_index", "guidance_scale", "num_inference_steps",
                "scheduler", "shard"] + [c for c in ("prompt", "negative_prompt", "eta") if c in df and df[c].any()]
        if "adaptation" in df and df["adaptation"].nunique() > 1:  # one adaptation: the plans before the column
            cols.append("adaptation")
        if "condition" in df and (df["condition"] != df["label"]).any():  # prompt variants
            cols.append("condition")
        df.attrs["plan_hash"] = hashlib.sha256(df[cols].to_csv(index=False).encode()).hexdigest()[:16]
    return df.attrs["plan_hash"]


def _shard_plan(path: Path) -> str | None:
    try:
        with np.load(path, allow_pickle=False) as z:
            return str(z["plan"]) if "plan" in z.files else None
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, zlib.error):  # torn or foreign: regenerate
        return None


def sampler_of(run_dir: str | Path, cfg) -> str:
    """The sampler the run folder's candidates were planned with (the plan's `scheduler` column: the backend's,
    `flow_match_euler` for SD 3.x and FLUX.1), else generation.scheduler."""
    from augment.runfolder import RunFolder

    plan = RunFolder(run_dir).candidates.plan
    try:
        column = pd.read_parquet(plan, columns=["scheduler"])["scheduler"]
    except (OSError, ValueError, KeyError):
        return cfg.generation.scheduler
    return str(column.iloc[0]) if len(column) else cfg.generation.scheduler


def sampling_precision(run_dir: str | Path, cfg) -> str:
    """The precision the candidates of the run folder `run_dir` were sampled in, as its generate stage recorded
    it: "fp32", "bf16" or "fp16" (`generation.mixed_precision: auto` resolves per machine, and half-precision
    weights sample in their own dtype; runs from before the record sampled in fp32 unless bf16 was asked for)."""
    from augment.runfolder import RunFolder

    done = results.load(RunFolder(run_dir).candidates.done, GenerationRecord)
    recorded = done.precision if done is not None else None
    precision = recorded or cfg.generation.mixed_precision
    return precision if precision in ("bf16", "fp16") else "fp32"


def load_candidates(output_dir: str | Path) -> Candidates:
    out = CandidatesFolder(output_dir)
    df = pd.read_parquet(out.plan)
    if not len(df):
        return Candidates(np.zeros((0, 1, 1, 1), np.uint8), df)
    parts = []
    for shard in sorted(df["shard"].unique()):
        with np.load(out.shard(shard), allow_pickle=False) as z:
            if "plan" in z.files and str(z["plan"]) != _plan_hash(df):
                raise RuntimeError(f"{out.shard(shard)} belongs to another generation plan")
            parts.append(z["images"])
            assert list(z["sample_id"]) == df.loc[df["shard"] == shard, "sample_id"].tolist()
    return Candidates(np.concatenate(parts), df)
