"""Fault injection: a run killed with SIGKILL anywhere resumes to the same published dataset, byte for byte.

Each case runs the tiny job (`augment.pipeline.run`, the flow's stages without Prefect) in a child process that
sends itself SIGKILL at one point: after a stage returns, or inside a stage (mid fine-tuning, between generation
shards, between downstream trainings, after the arrow copy of the dataset is written). Then the same job runs
again in a fresh process, and every file of the published dataset must equal an uninterrupted run's.
"""

import hashlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT

OVERRIDES = ["generation.num_per_class=8", "filter.min_confidence=0.0",
             "filter.order=[memorization, near_duplicates]", "lora.max_train_steps=12", "lora.checkpointing_steps=5",
             "base.pretrain_steps=30"]

DRIVER = r'''
import os, signal, sys
from augment import pipeline
from augment.configfile import load_config

out, cache, point, nth = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
cfg = load_config(sys.argv[5], [f"publish.output_dir={out}", f"base.cache_dir={cache}", *sys.argv[6:]])
calls = {"n": 0}

def die():
    os.kill(os.getpid(), signal.SIGKILL)

def after(real):  # die when the nth call returns (a stage boundary)
    def wrapped(*a, **k):
        r = real(*a, **k)
        calls["n"] += 1
        if calls["n"] == nth:
            die()
        return r
    return wrapped

def before(real):  # die when the nth call starts
    def wrapped(*a, **k):
        calls["n"] += 1
        if calls["n"] == nth:
            die()
        return real(*a, **k)
    return wrapped

def steps(module):  # die at the nth optimizer step of a training loop that `module` runs
    real = module.train_loop
    def loop(params, opt, step_loss, *a, **k):
        return real(params, opt, before(step_loss), *a, **k)
    module.train_loop = loop

kind, _, name = point.partition(":")
if kind == "after":  # the stage whose function has this name, its function wrapped
    import dataclasses, functools
    s = next(s for s in pipeline.STAGES if s.fn.__name__ == name)
    new = dataclasses.replace(s, fn=functools.wraps(s.fn)(after(s.fn)))
    pipeline.STAGES = tuple(new if x is s else x for x in pipeline.STAGES)
elif point == "inside:pretraining":
    from augment.backends import pixel_unet
    steps(pixel_unet)
elif point == "inside:finetune":
    from augment import finetune
    steps(finetune)
elif point == "inside:generate":
    from augment import generate
    generate.generate_shard = before(generate.generate_shard)
elif point == "inside:evaluate":
    from augment import trainings
    trainings.train_arm = before(trainings.train_arm)
elif point == "inside:publish":
    from augment import publish
    publish._write_parquet = before(publish._write_parquet)
elif point != "none":
    raise SystemExit(f"unknown point {point}")
pipeline.run(cfg, log=lambda *a: None)
'''


def _run(tmp: Path, out: Path, cache: Path, point: str = "none", nth: int = 1) -> subprocess.CompletedProcess:
    script = tmp / "driver.py"
    script.write_text(DRIVER)
    env = {**os.environ, "AUGMENT_PROGRESS": "0"}
    return subprocess.run([sys.executable, str(script), str(out), str(cache), point, str(nth),
                           str(ROOT / "configs" / "tiny.yaml"), *OVERRIDES],
                          capture_output=True, text=True, env=env, timeout=600, cwd=ROOT)


def _files(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted run: its dataset files, and its base cache (shared by the cases killed after the base)."""
    tmp = tmp_path_factory.mktemp("faults")
    done = _run(tmp, tmp / "run", tmp / "cache")
    assert done.returncode == 0, done.stderr[-3000:]
    files = _files(tmp / "run" / "dataset")
    assert any(f.endswith(".parquet") for f in files) and "README.md" in files
    return tmp, files


# (point, n): the nth call of the point is where the process dies
CASES = [
    ("after:prepare_data", 1), ("inside:pretraining", 15), ("after:base_model", 1), ("after:pseudo_stage", 1),
    ("inside:finetune", 8), ("after:finetune_stage", 1), ("inside:generate", 2), ("after:generate_stage", 1),
    ("after:filter_stage", 1), ("inside:evaluate", 5), ("after:evaluate_stage", 1), ("inside:publish", 1),
    ("after:publish_stage", 1),
]


# the four kills inside a stage run by default; every stage boundary and the kill mid-pretraining are `-m slow`
FAST = {"inside:finetune", "inside:generate", "inside:evaluate", "inside:publish"}


@pytest.mark.parametrize("point, nth", [c if c[0] in FAST else pytest.param(*c, marks=pytest.mark.slow) for c in CASES],
                         ids=[p for p, _ in CASES])
def test_killed_run_resumes_to_the_identical_dataset(reference, tmp_path, point, nth):
    ref_tmp, ref_files = reference
    own_cache = point in ("after:prepare_data", "inside:pretraining")  # killed before the base was cached
    cache = tmp_path / "cache" if own_cache else ref_tmp / "cache"
    out = tmp_path / "run"
    killed = _run(tmp_path, out, cache, point, nth)
    assert killed.returncode == -signal.SIGKILL, (killed.returncode, killed.stderr[-3000:])
    if point.startswith("inside:") and point != "inside:publish":
        assert not (out / "dataset").exists()
    if point == "inside:finetune":  # killed at step 8 of 12: it resumes from the step-5 checkpoint
        assert list(out.glob("finetune/**/state.pt"))
    resumed = _run(tmp_path, out, cache)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert _files(out / "dataset") == ref_files
    assert not list(out.glob("dataset.*")), "a temporary dataset folder was left behind"
