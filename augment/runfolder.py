"""The run folder: the one place that decides whether a folder is ours, writes its state files, and locks it.

Guarantees (docs/run-folder.md tells users):
- A run folder is ours only if augment created it: `claim` writes a marker file (`.augment-run.json`) into a new or
  empty folder and refuses, before anything is written, a non-empty folder without the marker, a path that is a
  file, and any folder that holds or lies inside the data source. Nothing is ever deleted from a folder that does
  not carry the marker (`require_ours` is checked before every removal).
- One run per folder: `lock` takes an exclusive `fcntl` lock on `.augment-run.lock` for the whole run. The kernel
  drops it when the holding process dies (even on kill -9), so there are no stale locks to clean up.
- State files are written atomically (`write_json`): a temporary file in the same folder, then a rename.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from pathlib import Path

from augment.errors import UserError

MARKER = ".augment-run.json"
LOCK = ".augment-run.lock"


# The layout ------------------------------------------------------------------------------------------------------
# Every file a run reads or writes is named here and nowhere else: a module takes a folder object below and asks it
# for the path (RunFolder(out).filter.scores), so moving a file is one edit and a reader can see the whole layout.


class StageFolder:
    """A stage's folder: its finished-under-key mark and the key of the config that owns its partial contents."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    @property
    def stage(self) -> Path:
        """{"key": ...}, written when the stage finished: an unchanged re-run reuses the folder."""
        return self.path / "stage.json"

    @property
    def owner(self) -> Path:
        """{"key": ...} of the config that wrote the folder's partial contents (checkpoints, finished shards)."""
        return self.path / "owner.json"

    def __fspath__(self) -> str:
        return str(self.path)


class DataFolder(StageFolder):
    splits = property(lambda self: self.path / "splits.npz")
    summary = property(lambda self: self.path / "summary.json")


class PseudoFolder(StageFolder):
    labels = property(lambda self: self.path / "labels.parquet")
    summary = property(lambda self: self.path / "summary.json")
    selection = property(lambda self: self.path / "selection.json")


class ChoiceFolder(StageFolder):
    decision = property(lambda self: self.path / "decision.json")


class AdapterFolder(StageFolder):
    """The fine-tuned adapter in peft's format, plus our two files; a pixel-space adapter also carries a copy of
    its base (a diffusers UNet2DModel folder and its scheduler), so a copied run folder samples without the cache."""

    info = property(lambda self: self.path / "info.json")
    training_config = property(lambda self: self.path / "training_config.json")
    base = property(lambda self: self.path / "base")
    base_config = property(lambda self: self.base / "config.json")
    base_scheduler = property(lambda self: self.base / "scheduler")


class CheckpointFolder(StageFolder):
    """Where the training loop keeps its resumable state (augment.diffusion.training): fine-tuning's in the run
    folder, base pretraining's in the base cache."""

    state = property(lambda self: self.path / "state.pt")


class FinetuneFolder(StageFolder):
    adapter = property(lambda self: AdapterFolder(self.path / "adapter"))
    adapter_tmp = property(lambda self: AdapterFolder(self.path / "adapter.tmp"))  # renamed to adapter when complete
    checkpoint = property(lambda self: CheckpointFolder(self.path / "finetune-checkpoint"))


class CandidatesFolder(StageFolder):
    plan = property(lambda self: self.path / "plan.parquet")
    done = property(lambda self: self.path / "done.json")

    def shard(self, i: int) -> Path:
        return self.path / f"shard-{i:05d}.npz"

    def shard_tmp(self, i: int) -> Path:
        return self.path / f"shard-{i:05d}.tmp.npz"


class FilterFolder(StageFolder):
    scores = property(lambda self: self.path / "scores.parquet")
    features = property(lambda self: self.path / "features.npy")  # the judge's features of every candidate
    summary = property(lambda self: self.path / "summary.json")
    decisions = property(lambda self: self.path / "decisions.json")

    def rejected(self, reason: str) -> Path:
        """Sample images of one rejection reason, for a person to look at."""
        return self.path / "rejected" / reason


class EvaluationFolder(StageFolder):
    results = property(lambda self: self.path / "results.json")
    summary = property(lambda self: self.path / "summary.json")


class DatasetFolder(StageFolder):
    """The published dataset: `datasets.save_to_disk` splits, their parquet copies and card, and our record. The
    card and the parquet folder keep the Hub's names: `augment push` sends them as they are."""

    CARD, PARQUET = "README.md", "data"
    record = property(lambda self: self.path / "augment_publish.json")
    card = property(lambda self: self.path / self.CARD)
    parquet = property(lambda self: self.path / self.PARQUET)


class RunFolder:
    """A run folder's layout: each file's path by what it holds.

        data/splits.npz, data/summary.json      the split (test included; only evaluation reads test)
        pseudo/labels.parquet, summary.json     pool images labeled confidently; selection.json: the run's choices
        finetune/adapter/                       the LoRA adapter (safetensors + configs)
        candidates/shard-*.npz, plan.parquet    every generated candidate
        filter/scores.parquet, rejected/<why>/  scores and decisions, rejected images for inspection
        choice/decision.json                    whether (and how much) synthetic data goes into the product
        dataset/                                the published DatasetDict (load_from_disk / load_dataset)
        evaluation/results.json                 every downstream run
        report.html, report.md, metrics.json    the report
        run.json                                stage timings, keys and versions
        .augment-run.json, .augment-run.lock    the marker that makes the folder ours, and the run lock
    """

    def __init__(self, root: str | Path):
        self.root = Path(root)

    marker = property(lambda self: self.root / MARKER)
    lock = property(lambda self: self.root / LOCK)
    config = property(lambda self: self.root / "config.yaml")
    info = property(lambda self: self.root / "run.json")  # stage times, base and adapter, finished key
    metrics = property(lambda self: self.root / "metrics.json")
    report_html = property(lambda self: self.root / "report.html")
    report_md = property(lambda self: self.root / "report.md")
    report_assets = property(lambda self: self.root / "report_assets")
    figures = property(lambda self: self.report_assets / "figures.json")  # which figures, drawn for what
    data = property(lambda self: DataFolder(self.root / "data"))
    pseudo = property(lambda self: PseudoFolder(self.root / "pseudo"))
    finetune = property(lambda self: FinetuneFolder(self.root / "finetune"))
    candidates = property(lambda self: CandidatesFolder(self.root / "candidates"))
    filter = property(lambda self: FilterFolder(self.root / "filter"))
    choice = property(lambda self: ChoiceFolder(self.root / "choice"))
    evaluation = property(lambda self: EvaluationFolder(self.root / "evaluation"))
    dataset = property(lambda self: DatasetFolder(self.root / "dataset"))

    def figure(self, name: str) -> Path:
        """One of the report's figures (PNG), linked from report.md by its path relative to the run folder."""
        return self.report_assets / f"{name}.png"

    def stage(self, name: str) -> StageFolder:
        """A stage folder by its name (data, pseudo, finetune, candidates, filter, evaluation, dataset)."""
        found = getattr(self, name, None) if not name.startswith("_") else None
        if not isinstance(found, StageFolder):
            raise KeyError(f"no stage folder {name!r}")
        return found


class RunFolderError(UserError, ValueError):
    """An output folder augment must not write to, or one that another run is using."""


def write_text(path: str | Path, text: str) -> None:
    """Write a file atomically: readers see the old file or the new one, never a torn one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def write_json(path: str | Path, obj, indent: int | None = 2) -> None:
    """Write JSON atomically (`write_text`)."""
    write_text(path, json.dumps(obj, indent=indent))


def read_json(path: str | Path, default=None):
    """Read a state file (always a JSON object); a missing, unreadable or edited one (a crash of an older version,
    `[1]` typed over it) gives `default`, and the state it held is rebuilt."""
    try:
        value = json.loads(Path(path).read_text())
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError, json.JSONDecodeError, UnicodeDecodeError):
        return default
    return value if isinstance(value, dict) else default


def _local_source(source: str) -> Path | None:
    """The data source as a resolved local path, or None for a built-in or hub source."""
    if not source or source == "sklearn-digits":
        return None
    p = Path(source).expanduser()
    return p.resolve() if p.exists() else None


def _within(child: Path, parent: Path) -> bool:
    return child == parent or parent in child.parents


def is_ours(folder: str | Path) -> bool:
    return RunFolder(folder).marker.is_file()


def check_writable_dir(path: str | Path, key: str, data_source: str = "") -> Path:
    """Raise RunFolderError unless `path` (the config's `key`) is a folder, or can be made one, that this process
    may write, outside the data source; write nothing. Checked before a run starts: a cache folder that is a file
    would otherwise fail an hour in, when the first model is saved."""
    out = Path(path).expanduser().resolve()
    if out.exists() and not out.is_dir():
        raise RunFolderError(f"{key} {path} is a file, not a folder")
    parent = next(p for p in (out, *out.parents) if p.exists())
    if not parent.is_dir():
        raise RunFolderError(f"{key} {path} cannot be created: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise RunFolderError(f"{key} {path} is not writable: no permission to write in {parent} (or it is on a "
                             "read-only file system)")
    src = _local_source(data_source)
    if src is not None and _within(out, src):
        raise RunFolderError(f"{key} {path} lies inside data.source {data_source}: choose a folder outside your data")
    return out


def check_output_dir(output_dir: str | Path, data_source: str = "") -> Path:
    """Raise RunFolderError if augment may not use `output_dir` as a run folder; write nothing."""
    out = check_writable_dir(output_dir, "publish.output_dir", data_source)
    src = _local_source(data_source)
    if src is not None:
        if _within(src, out):
            raise RunFolderError(f"publish.output_dir {output_dir} contains data.source {data_source}: "
                                 "choose an output folder outside your data")
    if out.is_dir() and not is_ours(out) and any(out.iterdir()):
        raise RunFolderError(f"publish.output_dir {output_dir} is not empty and was not created by augment "
                             f"(no {MARKER}): choose a new or empty folder")
    return out


def claim(output_dir: str | Path, data_source: str = "", job: str = "") -> Path:
    """Make `output_dir` our run folder (created if needed), or raise RunFolderError without writing anything."""
    out = check_output_dir(output_dir, data_source)
    if not is_ours(out):
        try:
            out.mkdir(parents=True, exist_ok=True)
            write_json(RunFolder(out).marker, {"created_by": "augment", "job": job, "created": time.time()})
        except OSError as err:
            raise RunFolderError(f"cannot create run folder {output_dir}: {err.strerror or err}") from None
    return out


def require_ours(folder: str | Path) -> None:
    """Our own invariant, checked before deleting anything inside a run folder."""
    if not is_ours(folder):
        raise RunFolderError(f"refusing to delete anything in {folder}: it has no {MARKER}, so augment did not "
                             "create it")


_HELD: dict[Path, int] = {}  # lock files this process holds, and how many nested `lock` blocks hold each


@contextlib.contextmanager
def lock(output_dir: str | Path, wait: bool = False):
    """Hold the run folder's exclusive lock; another process gets RunFolderError (or waits, with wait=True).
    Re-entrant within a process: `augment run` takes it before Prefect starts, and the flow's own `started`
    block then holds it too."""
    import fcntl

    path = RunFolder(output_dir).lock.resolve()
    if path in _HELD:
        _HELD[path] += 1
        try:
            yield
        finally:
            _HELD[path] -= 1
        return
    with open(path, "a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "another process"
            raise RunFolderError(f"run folder {output_dir} is in use by {holder}; wait for it to finish "
                                 "or choose another publish.output_dir") from None
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()} on {socket.gethostname()}")
        fh.flush()
        _HELD[path] = 1
        try:
            yield
        finally:
            del _HELD[path]
            fh.seek(0)
            fh.truncate()
            fcntl.flock(fh, fcntl.LOCK_UN)


@contextlib.contextmanager
def using(run_dir: str | Path, wait: bool = False, read_only: bool = False):
    """Hold a finished run folder's lock while reading or rewriting it (`augment report`, `generate`, `export`):
    never while a run is writing it. A folder augment did not create is refused, and no lock file is left in it.

    `read_only` (a command that only reads the folder): on a folder that cannot be written (a read-only mount, an
    archive), no run can be writing it either, so it is read without the lock instead of failing on the lock
    file."""
    if not is_ours(run_dir):
        raise RunFolderError(f"{run_dir} is not an augment run folder (no {MARKER}); give the publish.output_dir "
                             "of a run")
    if read_only and not os.access(run_dir, os.W_OK):  # as check_writable_dir asks: EROFS even for root
        yield Path(run_dir)
        return
    with lock(run_dir, wait=wait):
        yield Path(run_dir)


def save_config(cfg, run_dir: str | Path) -> None:
    """The run's config (a RunConfig), every default filled in, as config.yaml in the run folder."""
    import yaml

    Path(run_dir).mkdir(parents=True, exist_ok=True)
    write_text(RunFolder(run_dir).config, yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))


def load_state(path: str | Path, map_location=None, log=print) -> dict | None:
    """Load a resume checkpoint with `torch.load(weights_only=True)`: tensors and plain Python values only, never
    arbitrary pickled objects (a planted file in a run folder or cache must not run code). A checkpoint that is
    unreadable or holds anything else is reported and ignored: training starts over, which is always safe."""
    import pickle

    import torch

    path = Path(path)
    if not path.exists():
        return None
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError) as err:
        log(f"ignoring checkpoint {path}: not a plain tensor checkpoint ({str(err).splitlines()[0][:120]})")
        return None
    if not isinstance(state, dict) or "step" not in state:
        log(f"ignoring checkpoint {path}: unexpected contents")
        return None
    return state
