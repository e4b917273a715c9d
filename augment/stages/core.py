"""What a stage is, and the one way a stage is reused.

A stage is a function of the run's config that names what it takes (`base`, `adapter`: what earlier stages kept;
`log`, `progress`, `units`) and declares, with `@stage`, the config sections it reads and the stages upstream of it.
Its reuse key is derived here and nowhere else: the declared sections' fingerprint plus the identity of each upstream
stage (its key, or a content hash: the data's fingerprint, the base's, the adapter's). A stage whose folder finished
under the same key is reused, not recomputed; every stage records its identity in run.json for the stages after it.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import shutil
import time
from collections.abc import Callable
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path

from augment import run as run_folder
from augment.config import RunConfig
from augment.results import Record

# The pseudo stage also makes the run's cross-validated choices, starting from the team's recipe.
CHOICES = ("pseudo", "selection", "evaluation.recipe")


def run_dir(cfg: RunConfig) -> Path:
    return Path(cfg.publish.output_dir)


def folder(cfg: RunConfig) -> run_folder.RunFolder:
    """The run folder's layout: every file of the run by what it holds."""
    return run_folder.RunFolder(cfg.publish.output_dir)


@dataclass(frozen=True)
class Stage:
    """One step of a run, as data: both `augment.pipeline.run` and the Prefect flow walk pipeline.STAGES.

    `fn(cfg, ...)` does the work; `call` hands it what it names among `base`/`adapter` (kept by earlier stages),
    `log`, `progress` and `units` (a task runner's map of the stage's independent units; None: here). `what` and
    `unit`: how its progress reads (a bar, or log lines; unit "" = the heartbeat only). `sections`: the config
    sections its key covers; `upstream`: the stages whose outputs it reads (their identities enter its key);
    `folder`: its run-folder stage folder (None: it keeps nothing to reuse); `identity`: the field of its result
    that identifies its output (a content hash) for the stages after it, instead of its key. `keeps`: its result is
    recorded in run.json under that name and handed to the stages after it. `artifact`: the flow's progress
    artifact (key, description; "" = none). `distributed`: its units (generation shards, downstream trainings) can
    run on the flow's task runner. `retries`: safe to retry in the flow (disk I/O only). `timed`: part of the run's
    total_seconds (the report, which shows the total, is not)."""

    name: str
    what: str
    unit: str
    fn: Callable[..., object]
    sections: tuple[str, ...] = ("data",)
    upstream: tuple[str, ...] = ("data",)
    folder: str | None = None
    identity: str | None = None
    keeps: str | None = None
    artifact: tuple[str, str] = ("", "")
    distributed: bool = False
    retries: int = 0
    timed: bool = True

    def call(self, cfg: RunConfig, kept: dict, log=print, progress=None, units=None):
        """Run the stage with what its function names among `kept` and the run's callbacks."""
        from augment.cpus import share_threads

        share_threads()  # this job's share of the CPUs as the stage starts, kept to its end (augment/cpus.py)
        offered = {**kept, "log": log, "progress": progress, "units": units}
        args = {k: v for k, v in offered.items() if k in self._takes}
        try:
            try:
                return self.fn(cfg, **args)
            except BrokenProcessPool:
                # a worker was killed (the kernel's out-of-memory killer, a `kill -9`): the stage resumes from its
                # finished units on new workers, once
                log(f"{self.name}: a worker process died (killed by the system? out of memory?); running the stage "
                    "again on new workers, from what is finished")
                return self.fn(cfg, **args)
        except BrokenProcessPool:
            from augment.errors import WorkerError

            raise WorkerError(f"a worker process of the {self.what} stage died twice (the system kills processes "
                              "when memory runs out): lower evaluation.workers or free memory, then run the same "
                              "command again; it resumes from every finished unit") from None
        except OSError as err:
            from augment.errors import StorageError

            if err.errno in StorageError.DISK_ERRNOS and not isinstance(err, StorageError):
                raise StorageError.wrap(err) from None  # a full disk is the user's to fix: one line, no retry
            raise

    @property
    def _takes(self) -> set[str]:
        return set(list(inspect.signature(self.fn).parameters)[1:])


SPECS: dict[str, Stage] = {}  # every declared stage by name (filled as the stage modules are imported)


def stage(name: str, what: str, unit: str = "", **declared) -> Callable:
    """Declare a function as the stage `name` (see Stage for the fields); the function gets a `.stage`."""

    def wrap(fn):
        if name in SPECS and SPECS[name].fn.__qualname__ != fn.__qualname__:
            raise ValueError(f"stage {name!r} is declared twice")
        fn.stage = SPECS[name] = Stage(name, what, unit, fn, **declared)
        return fn

    return wrap


def to_json(result):
    """A stage result as run.json records it."""
    return result.to_json() if isinstance(result, Record) else result


def identity(cfg: RunConfig, name: str) -> str:
    """The identity of a stage's output as it last finished in this run folder ("" when it has not)."""
    run = run_folder.read_json(folder(cfg).info, {})
    stages = run.get("stages") if isinstance(run, dict) else None
    entry = stages.get(name) if isinstance(stages, dict) else None
    return str(entry.get("key", "")) if isinstance(entry, dict) else ""  # an edited entry: the stage runs again


def _identity_of(result, field: str) -> str:
    return str(result.get(field) if isinstance(result, dict) else getattr(result, field))


def record(cfg: RunConfig, stage: str | None, **facts) -> None:
    """Add facts to run.json: under stages.<stage>, or at the top level when stage is None."""
    path = folder(cfg).info
    path.parent.mkdir(parents=True, exist_ok=True)
    run = run_folder.read_json(path, {})
    if not isinstance(run, dict) or not isinstance(run.get("stages"), dict):  # torn or foreign: start over
        run = {"stages": {}}
    if stage is not None and not isinstance(run["stages"].get(stage), dict):  # an edited entry: start it over
        run["stages"][stage] = {}
    (run if stage is None else run["stages"][stage]).update(facts)
    run_folder.write_json(path, run)


class StageRun:
    """One run of a declared stage: its key (config sections + upstream identities), whether its folder already
    holds its result under that key, its folder made fresh, its time and identity recorded in run.json."""

    def __init__(self, cfg: RunConfig, name: str, consumed: dict | None = None):
        """`consumed`: upstream results handed to the stage (the base, the adapter), by stage name; their identity
        is read from them, the other upstream stages' from run.json."""
        self.cfg, self.spec = cfg, SPECS[name]
        self.name = name
        upstream = {u: identity(cfg, u) for u in self.spec.upstream}
        for u, result in (consumed or {}).items():
            upstream[u] = _identity_of(result, SPECS[u].identity)
        self.key = hashlib.sha256(json.dumps({"config": cfg.fingerprint(*self.spec.sections), "upstream": upstream},
                                             sort_keys=True).encode()).hexdigest()[:16]
        self.stage_folder = folder(cfg).stage(self.spec.folder) if self.spec.folder else None

    @property
    def folder(self) -> Path | None:
        return self.stage_folder.path if self.stage_folder is not None else None

    def reused(self, log=print, damage: Callable[[], str | None] | None = None) -> bool:
        """True (logged, and its identity recorded) when the folder holds this stage's result under the same key.
        `damage()` says what of that result no longer reads (a flipped byte, a truncated file), or None: a damaged
        result is made again (its folder keeps what is intact, for the stage to resume from)."""
        if self.stage_folder is not None and (run_folder.read_json(self.stage_folder.stage) or {}).get("key") == self.key:
            problem = damage() if damage is not None else None
            if problem is not None:
                log(f"{self.name}: {problem}; running it again")
                return False
            log(f"{self.name}: reusing {self.folder}")
            if self.spec.identity is None:
                record(self.cfg, self.name, key=self.key)
            return True
        return False

    def fresh(self) -> "StageRun":
        """Clear a folder made with another key; keep one made with this key (it may hold resumable checkpoints or
        finished shards of an interrupted run). Only ever inside a run folder augment created."""
        owner = self.stage_folder.owner
        if self.folder.exists() and (run_folder.read_json(owner) or {}).get("key") != self.key:
            run_folder.require_ours(run_dir(self.cfg))
            shutil.rmtree(self.folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        run_folder.write_json(owner, {"key": self.key})
        return self

    def identify(self, result) -> None:
        """Record the identity of a stage's output that is a content hash (`Stage.identity`) of its result."""
        record(self.cfg, self.name, key=_identity_of(result, self.spec.identity))

    def __enter__(self):
        self.t0 = time.time()
        return self

    def __exit__(self, exc_type, *_):
        if exc_type is None:
            if self.folder is not None:
                run_folder.write_json(self.stage_folder.stage, {"key": self.key})
            facts = {"seconds": round(time.time() - self.t0, 2)}
            if self.spec.identity is None:
                facts["key"] = self.key
            record(self.cfg, self.name, **facts)
        return False
