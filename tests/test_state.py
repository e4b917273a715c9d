"""A finished run folder that was copied, moved, edited, damaged, mounted read-only or filled to the last byte: each
either works, is rebuilt to the same dataset, or is one `error:` line (exit 2) with nothing else changed."""

import errno
import hashlib
import json
import shutil
from pathlib import Path

import pytest

from augment import pipeline
from flows.cli import main
from augment.configfile import load_config
from conftest import ROOT

TINY = ROOT / "configs" / "tiny.yaml"


def _cfg(run: Path, cache: Path, *more: str):
    return load_config(TINY, [f"publish.output_dir={run}", f"base.cache_dir={cache}", *more])


def _dataset_bytes(run: Path) -> dict[str, str]:
    folder = run / "dataset"
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module", autouse=True)
def _fixed_threads():
    """Trainings round by their thread count, which follows the jobs running on the machine (augment/cpus.py): the
    comparisons below hold it fixed."""
    import os

    from augment.cpus import THREADS_ENV

    before = os.environ.get(THREADS_ENV)
    os.environ[THREADS_ENV] = "1"
    yield
    if before is None:
        os.environ.pop(THREADS_ENV)
    else:
        os.environ[THREADS_ENV] = before


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("state")
    pipeline.run(_cfg(tmp / "run", tmp / "cache"), log=lambda m: None)
    return tmp / "run", tmp / "cache", _dataset_bytes(tmp / "run")


def _copy(finished, tmp_path: Path) -> Path:
    run, _, _ = finished
    copy = tmp_path / "copy"
    shutil.copytree(run, copy, symlinks=True)
    return copy


@pytest.mark.parametrize("edit", ["[1]", '{"stages": [1]}', '{"stages": {"finetune": [1], "data": "x"}}'],
                         ids=["a-list", "stages-a-list", "stage-entries-not-objects"])
def test_an_edited_run_json_is_rebuilt_and_the_dataset_is_the_same(finished, tmp_path, edit):
    """run.json replaced by `[1]` (or a stage entry that is not an object) was an AttributeError traceback."""
    _, cache, before = finished
    copy = _copy(finished, tmp_path)
    (copy / "run.json").write_text(edit)
    cfg = _cfg(copy, cache)
    assert pipeline.finished(cfg) is None  # not taken for finished
    pipeline.run(cfg, log=lambda m: None)
    assert _dataset_bytes(copy) == before and isinstance(json.loads((copy / "run.json").read_text()), dict)


def _flip_a_byte_of_a_shard(copy: Path) -> str:
    """A flipped byte in a generation shard was a BadZipFile traceback in the next stage that read it."""
    shard = sorted((copy / "candidates").glob("shard-*.npz"))[0]
    data = bytearray(shard.read_bytes())
    data[len(data) // 3] ^= 0xFF
    shard.write_bytes(bytes(data))
    (copy / "dataset").rename(copy / "dataset-away")  # the stages that read the candidates run again
    shutil.rmtree(copy / "filter")
    return "generate: 1 shard(s) cannot be read"


def _truncate_the_adapter(copy: Path) -> str:
    """A truncated adapter_model.safetensors was a SafetensorError traceback in generation."""
    weights = copy / "finetune" / "adapter" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    shutil.rmtree(copy / "candidates")
    return "finetune: the adapter's weights"


@pytest.mark.parametrize("damage", [_flip_a_byte_of_a_shard, _truncate_the_adapter], ids=["shard", "adapter"])
def test_a_damaged_stage_output_is_made_again_to_the_same_dataset(finished, tmp_path, damage):
    _, cache, before = finished
    copy = _copy(finished, tmp_path)
    expected = damage(copy)
    said = []
    pipeline.run(_cfg(copy, cache), log=said.append)
    assert any(s.startswith(expected) and s.endswith("running it again") for s in said), said
    assert _dataset_bytes(copy) == before


def test_a_copied_run_folder_generates_with_its_own_adapter(finished, tmp_path):
    """`cp -a` of a run folder generated with the original folder's adapter (the path run.json recorded)."""
    _, cache, _ = finished
    copy = _copy(finished, tmp_path)
    weights = copy / "finetune" / "adapter" / "adapter_model.safetensors"
    original = finished[0] / "finetune" / "adapter" / "adapter_model.safetensors"
    away = tmp_path / "original-weights"
    shutil.move(original, away)  # the original folder's adapter is gone: reading it would fail
    try:
        pipeline.run(_cfg(copy, cache, "generation.seed=5"), log=lambda m: None)
    finally:
        shutil.move(away, original)
    assert weights.exists() and (copy / "dataset").exists()


def test_a_relative_output_dir_reruns_from_another_working_directory(finished, tmp_path, monkeypatch):
    """A run made with a relative --output-dir failed with "Can't find 'adapter_config.json'" when re-run from
    another directory after a generation change."""
    _, cache, _ = finished
    (tmp_path / "a").mkdir()
    shutil.copytree(finished[0], tmp_path / "a" / "run", symlinks=True)
    monkeypatch.chdir(tmp_path / "a")
    pipeline.run(_cfg(Path("run"), cache, "generation.seed=6"), log=lambda m: None)
    monkeypatch.chdir(tmp_path)
    pipeline.run(_cfg(Path("a/run"), cache, "generation.seed=7"), log=lambda m: None)
    assert (tmp_path / "a" / "run" / "dataset").exists()


def _read_only(monkeypatch, folder: Path):
    """Writes under `folder` fail as on a read-only mount (tests may run as root, whom chmod does not stop)."""
    import builtins
    import os

    real_open, real_os_open = builtins.open, os.open
    root = str(folder.resolve())

    def inside(path) -> bool:
        try:
            return str(Path(path).resolve()).startswith(root)
        except (TypeError, ValueError):
            return False

    def fake_open(file, mode="r", *a, **k):
        if any(c in mode for c in "wax+") and inside(file):
            raise OSError(errno.EROFS, "Read-only file system", str(file))
        return real_open(file, mode, *a, **k)

    def fake_os_open(path, flags, *a, **k):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT) and inside(path):
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real_os_open(path, flags, *a, **k)

    real_access = os.access

    def fake_access(path, mode, *a, **k):  # access(2) answers EROFS for W_OK on a read-only mount, root or not
        return False if mode & os.W_OK and inside(path) else real_access(path, mode, *a, **k)

    monkeypatch.setattr(builtins, "open", fake_open)
    monkeypatch.setattr(os, "open", fake_os_open)
    monkeypatch.setattr(os, "access", fake_access)


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_commands_that_only_read_work_on_a_read_only_run_folder(finished, tmp_path, monkeypatch, capsys):
    """`generate` and `export` failed with an OSError traceback on the lock file although they only read; `report`,
    which writes into the folder, is one line."""
    copy = _copy(finished, tmp_path)
    before = _snapshot(copy)
    _read_only(monkeypatch, copy)
    assert main(["generate", str(copy), "--class", "3", "-n", "2", "--out", str(tmp_path / "more")]) == 0
    assert main(["export", str(copy), str(tmp_path / "exported")]) == 0
    capsys.readouterr()
    assert main(["report", str(copy)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: Read-only file system") and str(copy) in err[0], err
    monkeypatch.undo()
    assert _snapshot(copy) == before and (tmp_path / "more" / "provenance.parquet").exists()


def test_a_full_disk_is_one_line_leaves_no_partial_base_and_the_rerun_finishes(tmp_path, capsys, monkeypatch):
    """A full disk while the base was saved ended in a 200-line traceback and left base-*.tmp behind."""
    from diffusers import UNet2DModel

    real = UNet2DModel.save_pretrained

    def full(self, folder, *a, **k):
        Path(folder).mkdir(parents=True, exist_ok=True)
        (Path(folder) / "diffusion_pytorch_model.safetensors").write_bytes(b"half")
        raise OSError(errno.ENOSPC, "No space left on device", str(Path(folder) / "config.json"))

    monkeypatch.setattr(UNet2DModel, "save_pretrained", full)
    args = ["run", str(TINY), "--output-dir", str(tmp_path / "run"), "--set", f"base.cache_dir={tmp_path / 'cache'}",
            "--quiet"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: No space left on device writing "), err
    assert "run the same command again" in err[0]
    assert not list((tmp_path / "cache").glob("base-*.tmp"))
    monkeypatch.setattr(UNet2DModel, "save_pretrained", real)
    assert main(args) == 0


@pytest.mark.parametrize("content", [b"torn", b"PK\x03\x04" + b"\x00" * 40], ids=["not-a-zip", "cut-zip"])
def test_a_shard_file_that_is_not_whole_is_not_taken_as_done(tmp_path, content):
    """shard_done reads the shard's plan hash: a torn or foreign file is regenerated, never an exception."""
    import pandas as pd

    from augment.generate import damaged_shards, shard_done

    (tmp_path / "shard-00000.npz").write_bytes(content)
    plan = pd.DataFrame({"sample_id": ["s0"], "label": [0], "seed": [1], "strength": [1.0], "source_index": [-1],
                         "guidance_scale": [2.0], "num_inference_steps": [2], "scheduler": ["ddim"], "shard": [0]})
    assert not shard_done(tmp_path, plan, 0)
    assert [p.name for p in damaged_shards(tmp_path)] == ["shard-00000.npz"]
    assert not (tmp_path / "shard-00000.npz").exists()
