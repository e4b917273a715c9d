"""What a stage is, and the one way a stage is reused.

A stage is a function of the run's config that declares, with `@stage`, what it reads (`reads`: outputs of earlier
stages by name, each registered once with the stage that writes it and its loader: `output` here, the loaders in
augment/stages/outputs.py) and the config sections that are its own. Its upstream stages are the writers of what it
reads; its key covers its own sections and, through them, every upstream stage's. The key is derived here and
nowhere else: the fingerprint of those sections plus the identity of each upstream stage (its key, or a content
hash: the data's fingerprint, the base's, the adapter's). A stage whose folder finished under the same key is
reused, not recomputed; every stage records its identity in run.json for the stages after it.
"""

from __future__ import annotations

import functools
import hashlib
import json
import shutil
import time
from collections.abc import Callable
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Generic, TypeVar

from augment import runfolder
from augment.config import RunConfig
from augment.results import Record

# The pseudo stage also makes the run's cross-validated choices, starting from the team's recipe.
CHOICES = ("pseudo", "selection", "evaluation.recipe")


def output_dir(cfg: RunConfig) -> Path:
    return Path(cfg.publish.output_dir)


def folder(cfg: RunConfig) -> runfolder.RunFolder:
    """The run folder's layout: every file of the run by what it holds."""
    return runfolder.RunFolder(cfg.publish.output_dir)


T = TypeVar("T")


@dataclass(frozen=True)
class Output:
    """Something a stage writes that later stages read, by name: the stage that writes it, and its loader
    (`load(cfg, *needs)` from the run folder, given the outputs named in `needs`, each loaded once per stage run;
    None: the stage's result, handed over in memory: `Stage.keeps`)."""

    name: str
    stage: str
    load: Callable[..., object] | None = None
    needs: tuple[str, ...] = ()


OUTPUTS: dict[str, Output] = {}  # every readable output by name (filled as augment.stages.outputs is imported)


def output(name: str, stage: str, needs: tuple[str, ...] = ()) -> Callable:
    """Register `load(cfg, *needs)` as the loader of the output `name`, which `stage` writes; `needs`: outputs it is
    built from (the splits, which the stage may read itself: loaded once for both)."""

    def wrap(load):
        OUTPUTS[name] = Output(name, stage, load, needs)
        return load

    return wrap


class Read(Generic[T]):
    """An output a stage declared it reads, loaded when the stage first asks (`read()`), then kept: a stage reused
    from its folder loads nothing."""

    def __init__(self, load: Callable[[], T]):
        self._load, self._value, self._loaded = load, None, False

    def __call__(self) -> T:
        if not self._loaded:
            self._value, self._loaded = self._load(), True
        return self._value


@dataclass(frozen=True)
class Stage:
    """One step of a run, as data: both `augment.pipeline.run` and the Prefect flow walk pipeline.STAGES.

    `fn(cfg, <reads>, log=, progress=[, units=])` does the work: `call` passes each output named in `reads` by its
    name (a result kept in memory, `base`/`adapter`, as it is; a run-folder output as a `Read`), then the run's
    callbacks (`units`, a task runner's map of the stage's independent units, only to a `distributed` stage; None:
    here). `what` and `unit`: how its progress reads (a bar, or log lines; unit "" = the heartbeat only).
    `sections`: the config sections that are its own (the key also covers its upstream stages' sections: `covers`);
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
    sections: tuple[str, ...] = ()
    reads: tuple[str, ...] = ()
    folder: str | None = None
    identity: str | None = None
    keeps: str | None = None
    artifact: tuple[str, str] = ("", "")
    distributed: bool = False
    retries: int = 0
    timed: bool = True

    @property
    def upstream(self) -> tuple[str, ...]:
        """The stages that write what this one reads (their identities enter its key), in the order it reads them."""
        return tuple(dict.fromkeys(source(r).stage for r in self.reads))

    @property
    def covers(self) -> tuple[str, ...]:
        """Every config section its key covers: its own and, through their keys, its upstream stages' (a section
        whole drops the fields of it named apart, `evaluation.arms` under `evaluation`)."""
        if self.sections == ALL:
            return ALL
        names = set(self.sections).union(*(SPECS[u].covers for u in self.upstream))
        return tuple(sorted(n for n in names if n.split(".")[0] == n or n.split(".")[0] not in names))

    def inputs(self, cfg: RunConfig, kept: dict) -> dict:
        """What the stage reads, by name: a result handed over in memory as it is, a run-folder output as a Read
        (one per output, shared with the outputs built from it)."""
        reads: dict[str, Read] = {}

        def read(name: str) -> Read:
            if name not in reads:
                out = OUTPUTS[name]
                reads[name] = Read(lambda: out.load(cfg, *(read(n)() for n in out.needs)))
            return reads[name]

        return {r: kept[r] if source(r).load is None else read(r) for r in self.reads}

    def call(self, cfg: RunConfig, kept: dict, log=print, progress=None, units=None):
        """Run the stage with what it reads (`inputs`) and the run's callbacks, each passed by its declared name."""
        from augment.cpus import share_threads

        share_threads()  # this job's share of the CPUs as the stage starts, kept to its end (augment/cpus.py)
        cfg = with_base(cfg)
        args = {**self.inputs(cfg, kept), "log": log, "progress": progress}
        if self.distributed:
            args["units"] = units
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
                              "when memory runs out): lower runner.local_workers or free memory, then run the same "
                              "command again; it resumes from every finished unit") from None
        except OSError as err:
            from augment.errors import StorageError

            if err.errno in StorageError.DISK_ERRNOS and not isinstance(err, StorageError):
                raise StorageError.wrap(err) from None  # a full disk is the user's to fix: one line, no retry
            raise


# `sections` of a stage whose key covers the whole config (the published dataset depends on all of it)
ALL: tuple[str, ...] = ("*",)

SPECS: dict[str, Stage] = {}  # every declared stage by name (filled as the stage modules are imported)


def source(name: str) -> Output:
    """The output `name`: a registered loader (OUTPUTS), or the result a stage keeps under that name."""
    if name in OUTPUTS:
        return OUTPUTS[name]
    for s in SPECS.values():
        if s.keeps == name:
            return Output(name, s.name)
    raise KeyError(f"no stage writes an output named {name!r} (augment.stages.outputs registers the loaders)")


def stage(name: str, what: str, unit: str = "", **declared) -> Callable:
    """Declare a function as the stage `name` (see Stage for the fields). What the module keeps under the function's
    name runs it as `Stage.call` does, from a notebook or a test: `finetune_stage(cfg, base)`, the results it reads
    in memory (`base`, `adapter`) in the order it declares them, every other output read from the run folder. It
    carries the declaration as `.stage`."""

    def wrap(fn):
        if name in SPECS and SPECS[name].fn.__qualname__ != fn.__qualname__:
            raise ValueError(f"stage {name!r} is declared twice")
        spec = SPECS[name] = Stage(name, what, unit, fn, **declared)

        @functools.wraps(fn)
        def run(cfg: RunConfig, *handed, log=print, progress=None, units=None):
            kept = [r for r in spec.reads if source(r).load is None]
            if len(handed) != len(kept):
                raise TypeError(f"stage {name} takes {', '.join(kept) or 'no result'} of earlier stages, "
                                f"got {len(handed)}")
            return spec.call(cfg, dict(zip(kept, handed)), log=log, progress=progress, units=units)

        run.stage = spec
        return run

    return wrap


def reads_base(cfg: RunConfig, covers: tuple[str, ...] | None = None) -> bool:
    """Whether a classifier section reads the run's own base (`backbone: base`): any, or one of the sections a
    stage's key `covers` (Stage.covers)."""
    from augment.config import CLASSIFIER_SECTIONS

    return any(getattr(getattr(cfg, s), k).backbone == "base" and
               (covers is None or covers == ALL or s in covers or f"{s}.{k}" in covers) for s, k in CLASSIFIER_SECTIONS)


def with_base(cfg: RunConfig) -> RunConfig:
    """The config with the run's base (as run.json records it, once the base stage ran) handed to each classifier
    section that reads its features; the config itself when none does. Each stage and each unit calls it."""
    if not isinstance(cfg, RunConfig) or not reads_base(cfg):  # (a stage probed without a config: nothing to hand)
        return cfg
    info = runfolder.read_json(folder(cfg).info, {})
    base = info.get("base") if isinstance(info, dict) else None
    if not isinstance(base, dict):
        return cfg  # before the base stage: a classifier that reads it says so
    from augment.config import CLASSIFIER_SECTIONS

    cfg = cfg.model_copy()  # every classifier section a copy of its own (RunConfig._hand_down)
    for s, k in CLASSIFIER_SECTIONS:
        getattr(getattr(cfg, s), k)._base = base
    return cfg


def to_json(result):
    """A stage result as run.json records it."""
    return result.to_json() if isinstance(result, Record) else result


def identity(cfg: RunConfig, name: str) -> str:
    """The identity of a stage's output as it last finished in this run folder ("" when it has not)."""
    info = runfolder.read_json(folder(cfg).info, {})
    stages = info.get("stages") if isinstance(info, dict) else None
    entry = stages.get(name) if isinstance(stages, dict) else None
    return str(entry.get("key", "")) if isinstance(entry, dict) else ""  # an edited entry: the stage runs again


def _identity_of(result, field: str) -> str:
    return str(result.get(field) if isinstance(result, dict) else getattr(result, field))


def record(cfg: RunConfig, stage: str | None, **facts) -> None:
    """Add facts to run.json: under stages.<stage>, or at the top level when stage is None."""
    path = folder(cfg).info
    path.parent.mkdir(parents=True, exist_ok=True)
    info = runfolder.read_json(path, {})
    if not isinstance(info, dict) or not isinstance(info.get("stages"), dict):  # torn or foreign: start over
        info = {"stages": {}}
    if stage is not None and not isinstance(info["stages"].get(stage), dict):  # an edited entry: start it over
        info["stages"][stage] = {}
    (info if stage is None else info["stages"][stage]).update(facts)
    runfolder.write_json(path, info)


class StageRun:
    """One run of a declared stage: its key (config sections + upstream identities), whether its folder already
    holds its result under that key, its folder made fresh, its time and identity recorded in run.json."""

    def __init__(self, cfg: RunConfig, name: str, consumed: dict | None = None):
        """`consumed`: upstream results handed to the stage (the base, the adapter), by stage name; their identity
        is read from them, the other upstream stages' from run.json."""
        self.cfg, self.spec = cfg, SPECS[name]
        self.name = name
        upstream = {u: identity(cfg, u) for u in self.spec.upstream}
        if name not in ("data", "base") and reads_base(cfg, self.spec.covers):  # its classifiers read the base's
            from augment.base_encoder import RECIPE  # features: that base's, computed this way

            upstream.setdefault("base", f"{identity(cfg, 'base')}:features {RECIPE}")
        for u, result in (consumed or {}).items():
            upstream[u] = _identity_of(result, SPECS[u].identity)
        sections = () if self.spec.covers == ALL else self.spec.covers  # fingerprint(): the whole config
        self.key = hashlib.sha256(json.dumps({"config": cfg.fingerprint(*sections), "upstream": upstream},
                                             sort_keys=True).encode()).hexdigest()[:16]
        self.stage_folder = folder(cfg).stage(self.spec.folder) if self.spec.folder else None

    @property
    def folder(self) -> Path | None:
        return self.stage_folder.path if self.stage_folder is not None else None

    def reused(self, log=print, damage: Callable[[], str | None] | None = None) -> bool:
        """True (logged, and its identity recorded) when the folder holds this stage's result under the same key.
        `damage()` says what of that result no longer reads (a flipped byte, a truncated file), or None: a damaged
        result is made again (its folder keeps what is intact, for the stage to resume from)."""
        done = runfolder.read_json(self.stage_folder.stage) if self.stage_folder is not None else None
        if (done or {}).get("key") == self.key:
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
        if self.folder.exists() and (runfolder.read_json(owner) or {}).get("key") != self.key:
            runfolder.require_ours(output_dir(self.cfg))
            shutil.rmtree(self.folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        runfolder.write_json(owner, {"key": self.key})
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
                runfolder.write_json(self.stage_folder.stage, {"key": self.key})
            facts = {"seconds": round(time.time() - self.t0, 2)}
            if self.spec.identity is None:
                facts["key"] = self.key
            record(self.cfg, self.name, **facts)
        return False
