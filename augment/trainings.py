"""The units of the downstream evaluation: an arm's training set (`arm_training_set`), one training scored on real
data (`run_arm`, `train_unit`), and the runners that spread units over worker processes (one torch thread each) or
hand them to an orchestrator's task runner. A unit with the same training set and seed as one already trained
reuses its result."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np
from sklearn.metrics import confusion_matrix, f1_score

from augment.arms import Arm
from augment.config import EvaluationConfig
from augment.data import Splits

Pair = tuple[np.ndarray, np.ndarray]  # (uint8 images, int labels)


@dataclass
class TrainingSets:
    """Everything an arm can be built from."""

    splits: Splits
    kept: Pair
    unfiltered: Pair
    pseudo: Pair | None = None
    ablation: dict[str, Pair] = field(default_factory=dict)


def _join(a: Pair, b: Pair | None) -> Pair:
    return a if b is None or not len(b[0]) else (np.concatenate([a[0], b[0]]), np.concatenate([a[1], b[1]]))


def arm_training_set(arm: str, sets: TrainingSets, recipe: str = "real") -> dict:
    """Keyword arguments for train_classifier that define an arm. `filter:<name>` arms use `recipe`."""
    a = Arm.of(arm)
    if a.filter is not None:
        name = a.filter
        if name not in sets.ablation:
            raise ValueError(f"no filter-ablation set {name!r}")
        spec = arm_training_set(recipe, sets)
        return {**spec, "synthetic": sets.ablation[name]}
    parts = a.parts
    tr = sets.splits.train
    real = (tr.images, tr.labels) if "real" in parts else (tr.images[:0], tr.labels[:0])
    if "pseudo" in parts:
        if sets.pseudo is None or not len(sets.pseudo[0]):
            raise ValueError(f"arm {arm!r} needs pseudo-labeled pool images, and there are none")
        real = _join(real, sets.pseudo)
    synthetic = sets.kept if "synthetic" in parts else sets.unfiltered if "synthetic_unfiltered" in parts else None
    return {"data": real, "synthetic": synthetic, "augment": "classic" in parts}


def _scores(clf, images: np.ndarray, y: np.ndarray, K: int) -> dict:
    pred = clf.predict_proba(images).argmax(1)
    cm = confusion_matrix(y, pred, labels=list(range(K)))
    return {"accuracy": float((pred == y).mean()),
            "macro_f1": float(f1_score(y, pred, average="macro", labels=list(range(K)), zero_division=0)),
            "per_class_accuracy": (np.diag(cm) / np.maximum(cm.sum(1), 1)).tolist(), "confusion": cm.tolist()}


def run_arm(cfg: EvaluationConfig, splits: Splits, data: Pair, synthetic: Pair | None, augment: bool,
            seed: int) -> dict:
    """Train one classifier; scores on `cfg.split` at the top level, validation accuracy beside them."""
    from augment.classifier import train_classifier

    K = len(splits.class_names)
    if synthetic is not None and not len(synthetic[0]):
        synthetic = None
    if not len(data[0]) and synthetic is None:
        return {"skipped": "no training images (no synthetic samples were kept)"}
    t0 = time.time()
    clf = train_classifier(cfg.model, data[0], data[1], K, seed, augment=augment, synthetic=synthetic,
                           synthetic_prob=cfg.synthetic_prob[0])
    scored = getattr(splits, cfg.split)
    out = {"seed": seed, **_scores(clf, scored.images, scored.labels, K)}
    val = splits.validation
    if cfg.split == "validation":
        out["validation_accuracy"] = out["accuracy"]
    elif len(val):
        out["validation_accuracy"] = float((clf.predict_proba(val.images).argmax(1) == val.labels).mean())
    out["seconds"] = time.time() - t0
    return out


# Worker processes ---------------------------------------------------------------------------------------------

_WORKER: dict = {}


def _worker_init(cfg: EvaluationConfig, sets: TrainingSets) -> None:
    _WORKER.update(cfg=cfg, sets=sets)


def _worker_run(arm: str, recipe: str, seed: int) -> dict:
    return train_unit(_WORKER["cfg"], _WORKER["sets"], arm, recipe, seed)


def training_key(spec: dict) -> str:
    """A digest of everything a downstream training reads besides its seed (the arm_training_set spec)."""
    h = hashlib.sha256(b"augment" if spec["augment"] else b"plain")
    for part in (spec["data"], spec["synthetic"]):
        for a in (part if part is not None else ()):
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
                 progress=None):
        self.cfg, self.sets = cfg, sets
        self._track(total, progress, key)
        from augment.parallel import worker_count

        self.workers = worker_count(cfg.workers)
        self.pool = None
        if self.workers > 1:
            from augment.parallel import spawn_pool

            self.pool = spawn_pool(self.workers, _worker_init, (cfg, sets))
        else:
            _worker_init(cfg, sets)  # one torch thread here too, so results match the pool's exactly

    def _track(self, total: int, progress, key: Callable[[str, str], str]) -> None:
        self.total, self.done, self.progress, self.key, self.trained = total, 0, progress, key, {}

    def run(self, arms: list[str], recipe: str, seeds: list[int]) -> dict[str, list[dict]]:
        keys = {a: self.key(a, recipe) for a in arms}
        units, todo = [], set()
        for a in arms:
            for s in seeds:
                if (keys[a], s) not in self.trained and (keys[a], s) not in todo:
                    units.append((a, s))
                    todo.add((keys[a], s))
        for (a, s), r in zip(units, self._map(units, recipe)):
            self.trained[(keys[a], s)] = (a, r)
        out: dict[str, list[dict]] = {a: [] for a in arms}
        for a in arms:
            for s in seeds:
                source, r = self.trained[(keys[a], s)]
                out[a].append(r if source == a else {**r, "same_training_as": source})
        for _ in range(len(arms) * len(seeds) - len(units)):
            self._tick()
        return out

    def _map(self, units: list[tuple[str, int]], recipe: str) -> list[dict]:
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
RunUnits = Callable[[list[tuple[str, str, int]]], Iterable[dict]]


class MappedRunner(Runner):
    """Hands each phase's units to `run_units` (e.g. Prefect tasks on a task runner)."""

    def __init__(self, run_units: RunUnits, total: int, key: Callable[[str, str], str], progress=None):
        self.run_units, self.pool = run_units, None
        self._track(total, progress, key)

    def _map(self, units: list[tuple[str, int]], recipe: str) -> list[dict]:
        results = []
        for r in self.run_units([(a, recipe, s) for a, s in units]):  # results in order, as they finish
            results.append(r)
            self._tick()
        return results


def train_unit(cfg: EvaluationConfig, sets: TrainingSets, arm: str, recipe: str, seed: int) -> dict:
    """One downstream training (the unit every runner distributes), on one torch thread."""
    from augment.parallel import one_thread

    with one_thread():
        spec = arm_training_set(arm, sets, recipe)
        return run_arm(cfg, sets.splits, spec["data"], spec["synthetic"], spec["augment"], seed)
