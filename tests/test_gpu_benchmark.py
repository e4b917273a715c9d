"""benchmarks/gpu.py --tiny: the GPU benchmark's code paths (checkpoint writer, augment's fine-tuning and
sampling, diffusers' official script and pipeline, the table) at tiny sizes on the CPU."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "diffusers_examples" / "train_dreambooth_lora.py"
NUMBER = r"[0-9][0-9.e+-]*"


def diffusers_side_missing() -> str | None:
    """Why diffusers' side cannot run here (None when it can): its script, or torchvision, which it imports."""
    if not SCRIPT.exists():
        return f"{SCRIPT.relative_to(ROOT)} is not here (benchmarks/diffusers_examples/README.md)"
    probe = subprocess.run([sys.executable, "-c", "import torchvision"], capture_output=True)
    if probe.returncode:
        return "torchvision does not import here (diffusers' scripts need it)"
    return None


@pytest.fixture(scope="module")
def tiny_benchmark(tmp_path_factory):
    """`python benchmarks/gpu.py --tiny --families sd`: its table row (column -> cell) and its JSON figures."""
    tmp = tmp_path_factory.mktemp("gpu-benchmark")
    out = tmp / "gpu.json"
    run = subprocess.run([sys.executable, "benchmarks/gpu.py", "--tiny", "--families", "sd", "--work",
                          str(tmp / "work"), "--json", str(out)], cwd=ROOT, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    header = next(line for line in run.stdout.splitlines() if line.startswith("| family"))
    row = next(line for line in run.stdout.splitlines() if line.startswith("| sd |"))
    cells = dict(zip([c.strip() for c in header.strip("|").split("|")], [c.strip() for c in row.strip("|").split("|")]))
    return run.stdout, cells, json.loads(out.read_text())["rows"][0]


def test_the_tiny_benchmark_measures_augment(tiny_benchmark):
    stdout, cells, figures = tiny_benchmark
    assert "device: CPU" in stdout
    for column in ("augment steps/s", "augment images/s", "train peak augment", "gen peak augment"):
        assert re.fullmatch(NUMBER, cells[column]), (column, cells)
    assert figures["augment"]["steps_per_s"] > 0 and figures["augment"]["images_per_s"] > 0


def test_the_tiny_benchmark_measures_diffusers_script_beside_it(tiny_benchmark):
    """diffusers' official script and pipeline, and the ratios (the headline): where the script and torchvision
    are at hand (not in CI: benchmarks/diffusers_examples/README.md)."""
    why = diffusers_side_missing()
    if why:
        pytest.skip(f"diffusers' side not checked: {why}")
    stdout, cells, figures = tiny_benchmark
    for column in ("diffusers steps/s", "diffusers images/s", "train peak diffusers", "gen peak diffusers"):
        assert re.fullmatch(NUMBER, cells[column]), (column, cells, stdout[-2000:])
    assert figures["steps_ratio"] > 0 and figures["images_ratio"] > 0
    assert figures["diffusers"]["steps"] == 6  # the script ran every step the benchmark asked for
