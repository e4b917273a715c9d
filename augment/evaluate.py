"""Downstream evaluation: the same classifier recipe trained on several arms, several seeds, scored on real data.

The protocol (DESIGN.md, evidence rules):
- The product arm is what a team would train: its own recipe plus the synthetic data. The recipe is real data with
  or without classic augmentation (`evaluation.recipe`; `auto` chooses), plus the pseudo-labeled pool when the job
  has one and it helps. Both choices are made on labeled data only: out of fold over every labeled image by the
  pseudo stage (augment.selection; passed in as `decisions`), or on validation (selection.rule=validation).
  Classic augmentation then applies to the synthetic images too. Whether the product takes the synthetic data
  at all, and at which mixing probability, is a choice too (the choose stage, on labeled images the generator
  never saw): when they cannot show that it helps, the product is the recipe alone and the synthetic arms stay as
  diagnostics.
- Beside it stand the cheap alternatives that use the same information: real, real+classic and the recipe plus
  the pseudo-labeled pool. Both plain pairs (real+synthetic vs real, real+classic+synthetic vs real+classic) are
  always run: the recipe's own pair with every seed, the other one (which decides nothing) as a diagnostic.
- Every run is scored on the reported split (and on validation, when there is one); no choice reads test. Seeds
  are shared across arms (seed s initializes and orders every arm's run the same way), so differences between
  arms are paired by seed.

Arms are names joined with `+` (`real+classic+pseudo+synthetic`); `filter:<name>` arms train the product recipe on
the synthetic set that one filter alone keeps. Runs are independent units, spread over worker processes with one
torch thread each; the results do not depend on how many. A unit with the same training set and seed as one already
trained (a filter that alone keeps what the chain keeps) reuses its result instead of training again.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from sklearn.metrics import confusion_matrix, f1_score

from augment.arms import Arm, adds_label, arm_plus, has_part
from augment.config import EvaluationConfig
from augment.data import Splits
from augment.stats import paired_difference, summarize

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


class _Runner:
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


class _MappedRunner(_Runner):
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


def _val_mean(runs: list[dict]) -> float:
    vals = [r["validation_accuracy"] for r in runs if "validation_accuracy" in r]
    return float(np.mean(vals)) if vals else float("-inf")


def evaluate(cfg: EvaluationConfig, sets: TrainingSets, output_dir: str | Path,
             progress: Callable[[int, int], None] | None = None, log=print,
             run_units: RunUnits | None = None, decisions: dict | None = None) -> Path:
    """Run the protocol (or the listed arms); writes the results file of `output_dir`. `run_units` runs each phase's
    (arm, recipe, seed) units elsewhere (default: this process or a local pool of `cfg.workers`). `decisions`: the
    cross-validated choices of the pseudo stage and, under "synthetic", the choose stage's (augment.selection);
    without them, choices read validation and the product takes the synthetic data. Synthetic data is mixed in
    at the first of cfg.synthetic_prob (the caller passes the chosen one)."""
    decisions = decisions or {}

    keys: dict[tuple[str, str], str] = {}

    def key(arm: str, recipe: str) -> str:
        if (arm, recipe) not in keys:
            keys[arm, recipe] = training_key(arm_training_set(arm, sets, recipe))
        return keys[arm, recipe]

    def make_runner(total: int) -> _Runner:
        if run_units is None:
            return _Runner(cfg, sets, total, key, progress)
        return _MappedRunner(run_units, total, key, progress)

    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    seeds = [cfg.seed + i for i in range(cfg.seeds)]
    has_pseudo = sets.pseudo is not None and len(sets.pseudo[0]) > 0
    has_val = len(sets.splits.validation) > 0
    results: dict[str, list[dict]] = {}
    selection: dict = {}

    # Diagnostic arms explain the result (what the filter is worth, CAS, each filter alone) but decide nothing:
    # they train on the first `diagnostic_seeds` seeds only.
    diag_seeds = seeds[:cfg.diagnostic_seeds] if cfg.diagnostic_seeds else seeds
    if cfg.arms == "auto":
        n_main, n_diag = 3 + 2 * has_pseudo, 3 * cfg.diagnostic_arms + len(sets.ablation)
        runner = make_runner(n_main * len(seeds) + n_diag * len(diag_seeds))
        try:
            # 1. The team's recipe: classic augmentation or not (cross-validated, or on validation).
            results.update(runner.run(["real", "real+classic"], "real", seeds))
            recipe = _choose_recipe(cfg, results, has_val, selection, decisions.get("recipe"))
            # 2. The pseudo-labeled pool: a baseline, and part of the recipe when it helps (out of fold, or on
            # validation).
            product_recipe = recipe
            if has_pseudo:
                results.update(runner.run([arm_plus(recipe, "pseudo")], recipe, seeds))
                if "pseudo" in decisions:
                    d = decisions["pseudo"]
                    helps = has_part(d["chosen"], "pseudo")
                    selection["pseudo"] = {**d, "in_recipe": helps}
                else:
                    helps = has_val and _val_mean(results[arm_plus(recipe, "pseudo")]) > _val_mean(results[recipe])
                    selection["pseudo"] = {"rule": "validation",
                                           "validation_accuracy_without": _val_mean(results[recipe]),
                                           "validation_accuracy_with": _val_mean(results[arm_plus(recipe, "pseudo")]),
                                           "in_recipe": bool(helps)}
                if helps:
                    product_recipe = arm_plus(recipe, "pseudo")
            # 3. Synthetic data on top of the recipe, with and without the pool; as diagnostics the other plain
            # pair, unfiltered synthetic, synthetic only and each filter alone.
            arms = [arm_plus(recipe, "synthetic")]
            if has_pseudo:
                arms.append(arm_plus(arm_plus(recipe, "pseudo"), "synthetic"))
            results.update(runner.run(arms, product_recipe, seeds))
            other = "real+synthetic" if recipe == "real+classic" else "real+classic+synthetic"
            diagnostic = ([other, arm_plus(product_recipe, "synthetic_unfiltered"), "synthetic"]
                          if cfg.diagnostic_arms else [])
            results.update(runner.run(diagnostic + [Arm(filter=n).name for n in sets.ablation], product_recipe,
                                      diag_seeds))
        finally:
            runner.close()
        product = arm_plus(product_recipe, "synthetic")
        if "synthetic" in decisions:  # cross-validated: whether the product takes the synthetic data
            selection["synthetic"] = dict(decisions["synthetic"])
            if decisions["synthetic"].get("in_product") is False:
                product = product_recipe
    else:
        arms = list(cfg.arms) + [Arm(filter=n).name for n in sets.ablation]
        recipe = "real+classic" if cfg.recipe != "none" and "real+classic" in cfg.arms else "real"
        runner = make_runner(len(cfg.arms) * len(seeds) + len(sets.ablation) * len(diag_seeds))
        try:
            results.update(runner.run([a for a in arms if Arm.of(a).filter is None], recipe, seeds))
            if cfg.recipe == "auto" and ({"real", "real+classic"} <= set(results) or "recipe" in decisions):
                recipe = _choose_recipe(cfg, results, has_val, selection, decisions.get("recipe"))
            results.update(runner.run([a for a in arms if Arm.of(a).filter is not None], recipe, diag_seeds))
        finally:
            runner.close()
        product_recipe = recipe
        product = next((a for a in (arm_plus(recipe, "synthetic"), *cfg.arms) if a in results and
                        Arm.of(a).has("synthetic")), None)
    for arm, runs in results.items():
        accs = [r["accuracy"] for r in runs if "accuracy" in r]
        log(f"evaluate: {arm}: accuracy {np.mean(accs) if accs else float('nan'):.4f} over {len(accs)} seeds")
    sizes = {}
    for arm in results:
        spec = arm_training_set(arm, sets, product_recipe)
        sizes[arm] = {"real": int(len(spec["data"][0])),
                      "synthetic": int(len(spec["synthetic"][0])) if spec["synthetic"] is not None else 0}
    from augment.run import EvaluationFolder, write_json

    write_json(EvaluationFolder(out).results, {"seeds": seeds, "runs": results, "train_sizes": sizes, "recipe": recipe,
                                      "product_recipe": product_recipe, "product_arm": product,
                                      "selection": selection}, indent=None)
    return EvaluationFolder(out).results


def _choose_recipe(cfg: EvaluationConfig, results: dict, has_val: bool, selection: dict,
                   decided: dict | None = None) -> str:
    if decided is not None:  # made by the pseudo stage, which already applied evaluation.recipe (part of its key)
        selection["recipe"] = dict(decided)
        return decided["chosen"]
    val = {a: _val_mean(results[a]) for a in ("real", "real+classic")}
    if cfg.recipe == "auto":
        recipe = "real+classic" if not has_val or val["real+classic"] >= val["real"] else "real"
    else:
        recipe = "real+classic" if cfg.recipe == "classic" else "real"
    selection["recipe"] = {"rule": cfg.recipe, "validation_accuracy": val, "chosen": recipe}
    return recipe


def summarize_results(results: dict) -> dict:
    """Per-arm statistics, per-class deltas and the paired gains that decide whether synthetic data helped."""
    runs = {a: [r for r in rs if "accuracy" in r] for a, rs in results["runs"].items()}
    arms = {}
    for arm, rs in runs.items():
        if not rs:
            arms[arm] = {"skipped": results["runs"][arm][0].get("skipped", "no runs")}
            continue
        arms[arm] = {
            "accuracy": summarize([r["accuracy"] for r in rs]),
            "macro_f1": summarize([r["macro_f1"] for r in rs]),
            "per_seed_accuracy": [r["accuracy"] for r in rs],
            "per_seed_macro_f1": [r["macro_f1"] for r in rs],
            "per_seed_validation_accuracy": [r.get("validation_accuracy") for r in rs],
            "per_class_accuracy": np.mean([r["per_class_accuracy"] for r in rs], axis=0).tolist(),
            "confusion": np.sum([r["confusion"] for r in rs], axis=0).tolist(),
            "train_sizes": results["train_sizes"].get(arm),
        }
    product = results.get("product_arm")
    out: dict = {"arms": arms, "seeds": results["seeds"], "product_arm": product,
                 "recipe": results.get("recipe"), "product_recipe": results.get("product_recipe"),
                 "selection": results.get("selection", {})}

    def acc(arm):
        return [r["accuracy"] for r in runs[arm]]

    def paired(x, y):  # arms trained on fewer seeds (diagnostics) pair with the first seeds of the others
        n = min(len(x), len(y))
        return paired_difference(x[:n], y[:n])

    def diff(a, b):
        return {"accuracy": paired(acc(a), acc(b)),
                "macro_f1": paired([r["macro_f1"] for r in runs[a]], [r["macro_f1"] for r in runs[b]])}

    baselines = [b for b in runs if runs[b] and not Arm.of(b).synthetic]
    if product and runs.get(product) and baselines:
        # The best baseline by its mean accuracy on the reported split: the conservative choice for our claim.
        best = max(baselines, key=lambda b: np.mean(acc(b)))
        out["best_baseline"] = best
        out["baselines"] = baselines
        out["gain_over_best_baseline"] = paired_difference(acc(product), acc(best))
        out["gains"] = {b: diff(product, b) for b in baselines if b != product}
        out["per_class_delta"] = {
            b: (np.array(arms[product]["per_class_accuracy"]) - np.array(arms[b]["per_class_accuracy"])).tolist()
            for b in baselines if b != product}
    # What synthetic data adds to each training set that has a "+synthetic" counterpart.
    out["synthetic_adds"] = {adds_label(a): diff(arm_plus(a, "synthetic"), a)
                             for a in baselines if runs.get(arm_plus(a, "synthetic"))}
    # What the filter is worth, on the recipe (the product's own arm when it takes the synthetic data).
    recipe = results.get("product_recipe") or "real"
    filtered, unfiltered = arm_plus(recipe, "synthetic"), arm_plus(recipe, "synthetic_unfiltered")
    if runs.get(unfiltered) and runs.get(filtered):
        out["filter_gain"] = paired(acc(filtered), acc(unfiltered))
        out["filter_gain"].update(arm=filtered, against=unfiltered)
    return out
