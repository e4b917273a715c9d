"""The units of the downstream evaluation: an arm's training set (`arm_training_set`, an ArmSet), one training scored
on real data (`run_arm`, `train_arm`, a TrainingRun), and the runners that spread units over worker processes (one
torch thread each) or hand them to an orchestrator's task runner. A unit with the same training set and seed as one
already trained reuses its result."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, fields, replace

import numpy as np
from sklearn.metrics import confusion_matrix, f1_score

from augment.arms import Arm
from augment.config import EvaluationConfig
from augment.data import Splits
from augment.parallel import worker_state


@dataclass(frozen=True, eq=False)
class Examples:
    """Images (uint8) and their labels (int), row for row."""

    images: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.images)


@dataclass
class TrainingSets:
    """Everything an arm can be built from."""

    splits: Splits
    kept: Examples
    unfiltered: Examples
    pseudo: Examples | None = None
    ablation: dict[str, Examples] = field(default_factory=dict)


@dataclass(frozen=True, eq=False)
class ArmSet:
    """What one arm trains on: the real rows (with pseudo-labeled pool rows when it takes them), the synthetic rows
    mixed in (None: none), and whether classic augmentation applies."""

    data: Examples
    synthetic: Examples | None
    augment: bool


def _join(a: Examples, b: Examples | None) -> Examples:
    if b is None or not len(b):
        return a
    return Examples(np.concatenate([a.images, b.images]), np.concatenate([a.labels, b.labels]))


def arm_training_set(arm: str, sets: TrainingSets, recipe: str = "real") -> ArmSet:
    """What `arm` trains on. `filter:<name>` arms use `recipe`."""
    a = Arm.of(arm)
    if a.filter is not None:
        name = a.filter
        if name not in sets.ablation:
            raise ValueError(f"no filter-ablation set {name!r}")
        return replace(arm_training_set(recipe, sets), synthetic=sets.ablation[name])
    parts = a.parts
    tr = sets.splits.train
    real = Examples(tr.images, tr.labels) if "real" in parts else Examples(tr.images[:0], tr.labels[:0])
    if "pseudo" in parts:
        if sets.pseudo is None or not len(sets.pseudo):
            raise ValueError(f"arm {arm!r} needs pseudo-labeled pool images, and there are none")
        real = _join(real, sets.pseudo)
    synthetic = sets.kept if "synthetic" in parts else sets.unfiltered if "synthetic_unfiltered" in parts else None
    return ArmSet(real, synthetic, "classic" in parts)


@dataclass(frozen=True)
class TrainingRun:
    """One downstream training's result: scores on the reported split (`validation_accuracy` beside them when there
    is a validation split), or only why it was `skipped`. `same_training_as` names the arm whose training (same set,
    same seed) it is (Runner). Fields left None are absent from its JSON, as results.json has always held it."""

    seed: int | None = None
    accuracy: float | None = None
    macro_f1: float | None = None
    per_class_accuracy: list[float] | None = None
    confusion: list[list[int]] | None = None
    validation_accuracy: float | None = None
    seconds: float | None = None
    skipped: str | None = None
    same_training_as: str | None = None

    @property
    def trained(self) -> bool:
        return self.accuracy is not None

    def to_json(self) -> dict:
        """Its entry in results.json: the fields that are set, in the order above."""
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}

    @classmethod
    def from_json(cls, raw: dict) -> "TrainingRun":
        unknown = set(raw) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"a training run with unknown fields {sorted(unknown)}")
        return cls(**raw)


def _scores(clf, images: np.ndarray, y: np.ndarray, K: int) -> dict:
    pred = clf.predict_proba(images).argmax(1)
    cm = confusion_matrix(y, pred, labels=list(range(K)))
    return {"accuracy": float((pred == y).mean()),
            "macro_f1": float(f1_score(y, pred, average="macro", labels=list(range(K)), zero_division=0)),
            "per_class_accuracy": (np.diag(cm) / np.maximum(cm.sum(1), 1)).tolist(), "confusion": cm.tolist()}


def run_arm(cfg: EvaluationConfig, splits: Splits, spec: ArmSet, seed: int) -> TrainingRun:
    """Train one classifier on `spec`; scores on `cfg.split`, validation accuracy beside them."""
    from augment.classifier import train_classifier

    K = len(splits.class_names)
    synthetic = spec.synthetic if spec.synthetic is not None and len(spec.synthetic) else None
    if not len(spec.data) and synthetic is None:
        return TrainingRun(skipped="no training images (no synthetic samples were kept)")
    t0 = time.time()
    clf = train_classifier(cfg.model, spec.data.images, spec.data.labels, K, seed, augment=spec.augment,
                           synthetic=None if synthetic is None else (synthetic.images, synthetic.labels),
                           synthetic_prob=cfg.synthetic_prob[0])
    scored = getattr(splits, cfg.split)
    scores = _scores(clf, scored.images, scored.labels, K)
    val, val_accuracy = splits.validation, None
    if cfg.split == "validation":
        val_accuracy = scores["accuracy"]
    elif len(val):
        val_accuracy = float((clf.predict_proba(val.images).argmax(1) == val.labels).mean())
    return TrainingRun(seed=seed, **scores, validation_accuracy=val_accuracy, seconds=time.time() - t0)


# Worker processes ---------------------------------------------------------------------------------------------

_WORKER: dict = worker_state()  # per process: the evaluation config and training sets of the batch


def _worker_init(cfg: EvaluationConfig, sets: TrainingSets) -> None:
    _WORKER.update(cfg=cfg, sets=sets)


def _worker_run(arm: str, recipe: str, seed: int) -> TrainingRun:
    return train_arm(_WORKER["cfg"], _WORKER["sets"], arm, recipe, seed)


def training_key(spec: ArmSet) -> str:
    """A digest of everything a downstream training reads besides its seed (an arm_training_set)."""
    h = hashlib.sha256(b"augment" if spec.augment else b"plain")
    for part in (spec.data, spec.synthetic):
        for a in ((part.images, part.labels) if part is not None else ()):
            a = np.ascontiguousarray(a)
            h.update(f"{a.dtype}{a.shape}".encode())
            h.update(a.tobytes())
        h.update(b"|")
    return h.hexdigest()


class Runner:
    """Runs (arm, seed) units in this process or in a pool of spawned workers with one torch thread each.

    `key(arm, recipe)` names what an arm trains on: a unit whose key and seed equal one already trained (a filter
    that alone keeps exactly what the whole chain keeps, or every candidate) is not trained again; its result is
    the earlier one's, marked `same_training_as`. A training is a deterministic function of its
    inputs and seed, so the numbers are the ones a second training would give."""

    def __init__(self, cfg: EvaluationConfig, sets: TrainingSets, total: int, key: Callable[[str, str], str],
                 progress=None, workers: int = 0):
        self.cfg, self.sets = cfg, sets
        self._track(total, progress, key)
        from augment.parallel import worker_count

        self.workers = worker_count(workers)
        self.pool = None
        if self.workers > 1:
            from augment.parallel import spawn_pool

            self.pool = spawn_pool(self.workers, _worker_init, (cfg, sets))
        else:
            _worker_init(cfg, sets)  # one torch thread here too, so results match the pool's exactly

    def _track(self, total: int, progress, key: Callable[[str, str], str]) -> None:
        self.total, self.done, self.progress, self.key, self.trained = total, 0, progress, key, {}

    def run(self, arms: list[str], recipe: str, seeds: list[int]) -> dict[str, list[TrainingRun]]:
        keys = {a: self.key(a, recipe) for a in arms}
        units, todo = [], set()
        for a in arms:
            for s in seeds:
                if (keys[a], s) not in self.trained and (keys[a], s) not in todo:
                    units.append((a, s))
                    todo.add((keys[a], s))
        for (a, s), r in zip(units, self._map(units, recipe)):
            self.trained[(keys[a], s)] = (a, r)
        out: dict[str, list[TrainingRun]] = {a: [] for a in arms}
        for a in arms:
            for s in seeds:
                source, r = self.trained[(keys[a], s)]
                out[a].append(r if source == a else replace(r, same_training_as=source))
        for _ in range(len(arms) * len(seeds) - len(units)):
            self._tick()
        return out

    def _map(self, units: list[tuple[str, int]], recipe: str) -> list[TrainingRun]:
        if self.pool is None:
            from augment.parallel import here

            results = here(_worker_run, [(a, recipe, s) for a, s in units], self._tick)
        else:
            from augment.parallel import ordered_map

            results = ordered_map(self.pool, _worker_run, [(a, recipe, s) for a, s in units], self._tick)
        return results

    def _tick(self) -> None:
        self.done += 1
        if self.progress:
            self.progress(self.done, self.total)

    def close(self) -> None:
        if self.pool is not None:  # on an interrupt, queued trainings are dropped instead of run
            self.pool.shutdown(cancel_futures=True)


# run_units([(arm, recipe, seed), ...]) -> one result per unit, in order: how an orchestrator (the Prefect flow's
# task runner: threads, processes, Dask) runs the units instead of the local pool.
RunUnits = Callable[[list[tuple[str, str, int]]], Iterable[TrainingRun]]


class MappedRunner(Runner):
    """Hands each phase's units to `run_units` (e.g. Prefect tasks on a task runner)."""

    def __init__(self, run_units: RunUnits, total: int, key: Callable[[str, str], str], progress=None):
        self.run_units, self.pool = run_units, None
        self._track(total, progress, key)

    def _map(self, units: list[tuple[str, int]], recipe: str) -> list[TrainingRun]:
        results = []
        for r in self.run_units([(a, recipe, s) for a, s in units]):  # results in order, as they finish
            results.append(r)
            self._tick()
        return results


def train_arm(cfg: EvaluationConfig, sets: TrainingSets, arm: str, recipe: str, seed: int) -> TrainingRun:
    """One downstream training (the unit every runner distributes), on one torch thread."""
    from augment.parallel import one_thread

    with one_thread():
        return run_arm(cfg, sets.splits, arm_training_set(arm, sets, recipe), seed)
