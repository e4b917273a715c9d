import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def tiny_cfg(tmp_path):
    """configs/tiny.yaml with every output under tmp_path."""
    from augment.configfile import load_config

    return load_config(ROOT / "configs" / "tiny.yaml",
                       [f"publish.output_dir={tmp_path / 'run'}", f"base.cache_dir={tmp_path / 'cache'}"])


def write_imagefolder(root: Path, classes=("cat", "dog", "fox"), per_class=8, size=10, mode="RGB", seed=0):
    """A few real PNG files in <root>/<class>/; each class has its own brightness pattern."""
    rng = np.random.default_rng(seed)
    for k, c in enumerate(classes):
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            arr = rng.integers(0, 60, (size, size, 3), dtype=np.uint8)
            arr[:, k * 3:(k + 1) * 3] = 220
            Image.fromarray(arr).convert(mode).save(root / c / f"{i}.png")
    return root


def crash_at(call: int, real):
    """`real`, except that call number `call` raises KeyboardInterrupt: a run killed in the middle of training."""
    calls = {"n": 0}

    def wrapped(*a, **k):
        calls["n"] += 1
        if calls["n"] == call:
            raise KeyboardInterrupt
        return real(*a, **k)

    return wrapped


@pytest.fixture(scope="session")
def prefect_harness():
    """A throwaway Prefect database and server for flow tests."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


NO_CANDIDATES_PROVENANCE = {"base_model": "b", "adapter_hash": "a", "config_hash": "c"}


def no_candidates():
    """An empty kept-candidates table with the columns publish reads (a run that kept no synthetic samples)."""
    import pandas as pd

    return pd.DataFrame(columns=["sample_id", "label", "seed", "strength", "source_id", "guidance_scale",
                                 "num_inference_steps", "scheduler", "p_intended", "nn_similarity"])


def scores_summary(alia_thresholds):
    """The filter's summary (augment.results.FilterScores) of a hand-made scored table: what the filters read."""
    from augment.results import FilterScores, QualityClassifier

    return FilterScores(quality_classifier=QualityClassifier(kind="cnn", validation_accuracy=None, validation_size=0),
                        alia_thresholds=alia_thresholds, alia_oof_accuracy=None, train_nn_similarity_pixels=[],
                        train_nn_similarity_features=[], memorization_space="pixels")


def processes() -> dict[int, tuple[str, int]]:
    """Every process /proc lists: pid -> (state letter, parent pid)."""
    found = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    state, ppid = f.read().rsplit(")", 1)[1].split()[:2]
            except OSError:
                continue
            found[int(entry)] = (state, int(ppid))
    return found


def alive(pids) -> set[int]:
    """Those of `pids` still running (a zombie, exited but not yet reaped, counts as gone)."""
    table = processes()
    return {p for p in pids if p in table and table[p][0] != "Z"}


def descendants(pid: int) -> set[int]:
    """Every running process below `pid`."""
    children: dict[int, list[int]] = {}
    for child, (state, parent) in processes().items():
        if state != "Z":
            children.setdefault(parent, []).append(child)
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def still_alive_after(pids, seconds: float) -> set[int]:
    """Wait up to `seconds` for `pids` to end; those still running then."""
    import time

    deadline = time.time() + seconds
    while alive(pids) and time.time() < deadline:
        time.sleep(0.2)
    return alive(pids)
