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
the synthetic set that one filter alone keeps. Runs are independent units (augment.trainings), spread over worker
processes with one torch thread each; the results do not depend on how many. A unit with the same training set and
seed as one already trained (a filter that alone keeps what the chain keeps) reuses its result instead of training
again.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from augment.arms import Arm, adds_label, arm_plus, has_part
from augment.config import EvaluationConfig
from augment.results import Choice, EvaluationSummary, Selection, TrainSizes
from augment.stats import paired_difference, summarize
from augment.trainings import (MappedRunner, Runner, RunUnits, TrainingRun, TrainingSets, arm_training_set,
                               training_key)


@dataclass(frozen=True)
class EvaluationRuns:
    """The whole evaluation, as the evaluation folder's results file holds it: every arm's runs (arms in the
    order they ran, one run per seed the arm trained on), each arm's training-set sizes, the recipe, the product
    and the choices that made them."""

    seeds: list[int]
    runs: dict[str, list[TrainingRun]]
    train_sizes: dict[str, TrainSizes]
    recipe: str
    product_recipe: str
    product_arm: str | None  # None: no listed arm takes synthetic data
    selection: dict  # {name: a Choice's fields} as set, in that order (a Selection would reorder them)

    def to_json(self) -> dict:
        return {"seeds": self.seeds, "runs": {a: [r.to_json() for r in rs] for a, rs in self.runs.items()},
                "train_sizes": {a: n.to_json() for a, n in self.train_sizes.items()}, "recipe": self.recipe,
                "product_recipe": self.product_recipe, "product_arm": self.product_arm, "selection": self.selection}

    @classmethod
    def from_json(cls, raw: dict) -> "EvaluationRuns":
        return cls(raw["seeds"], {a: [TrainingRun.from_json(r) for r in rs] for a, rs in raw["runs"].items()},
                   {a: TrainSizes.model_validate(n) for a, n in raw["train_sizes"].items()}, raw["recipe"],
                   raw["product_recipe"], raw["product_arm"], raw["selection"])

    @classmethod
    def load(cls, path: str | Path) -> "EvaluationRuns":
        return cls.from_json(json.loads(Path(path).read_text()))


def _val_mean(runs: list[TrainingRun]) -> float:
    vals = [r.validation_accuracy for r in runs if r.validation_accuracy is not None]
    return float(np.mean(vals)) if vals else float("-inf")


def evaluate(cfg: EvaluationConfig, sets: TrainingSets, output_dir: str | Path,
             progress: Callable[[int, int], None] | None = None, log=print,
             run_units: RunUnits | None = None, decisions: Selection | None = None,
             workers: int = 0) -> EvaluationRuns:
    """Run the protocol (or the listed arms); writes the results file of `output_dir` and returns what it holds.
    `run_units` runs each phase's (arm, recipe, seed) units elsewhere (default: this process or a local pool of
    `workers` processes, runner.local_workers). `decisions`: the cross-validated choices of the pseudo stage and,
    under "synthetic", the choose stage's (augment.selection); without them, choices read validation and the
    product takes the synthetic data. Synthetic data is mixed in at the first of cfg.synthetic_prob (the caller
    passes the chosen one)."""
    decisions = decisions or Selection()
    if cfg.model.kind == "encoder":  # an encoder's features once, here, before any unit runs
        from augment.encoders import warm

        trained = [sets.splits.train, *(x for x in (sets.pseudo, sets.kept, sets.unfiltered) if x is not None),
                   *sets.ablation.values()]
        scored = [getattr(sets.splits, cfg.split), sets.splits.validation]
        # jittered views for the recipe's real+classic arms (train, pool, kept); the diagnostics' on demand
        jittered = [x for x in (sets.splits.train, sets.pseudo, sets.kept) if x is not None]
        warm(cfg.model, [x.images for x in trained + scored], [x.images for x in jittered])

    keys: dict[tuple[str, str], str] = {}

    def key(arm: str, recipe: str) -> str:
        if (arm, recipe) not in keys:
            keys[arm, recipe] = training_key(arm_training_set(arm, sets, recipe))
        return keys[arm, recipe]

    def make_runner(total: int) -> Runner:
        if run_units is None:
            return Runner(cfg, sets, total, key, progress, workers=workers)
        return MappedRunner(run_units, total, key, progress)

    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    seeds = [cfg.seed + i for i in range(cfg.seeds)]
    has_pseudo = sets.pseudo is not None and len(sets.pseudo) > 0
    has_val = len(sets.splits.validation) > 0
    results: dict[str, list[TrainingRun]] = {}
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
            recipe = _choose_recipe(cfg, results, has_val, selection, decisions.recipe)
            # 2. The pseudo-labeled pool: a baseline, and part of the recipe when it helps (out of fold, or on
            # validation).
            product_recipe = recipe
            if has_pseudo:
                results.update(runner.run([arm_plus(recipe, "pseudo")], recipe, seeds))
                if decisions.pseudo is not None:
                    helps = has_part(decisions.pseudo.chosen, "pseudo")
                    selection["pseudo"] = {**decisions.pseudo.to_json(), "in_recipe": helps}
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
        if decisions.synthetic is not None:  # cross-validated: whether the product takes the synthetic data
            selection["synthetic"] = decisions.synthetic.to_json()
            if decisions.synthetic.in_product is False:
                product = product_recipe
    else:
        arms = list(cfg.arms) + [Arm(filter=n).name for n in sets.ablation]
        recipe = "real+classic" if cfg.recipe != "none" and "real+classic" in cfg.arms else "real"
        runner = make_runner(len(cfg.arms) * len(seeds) + len(sets.ablation) * len(diag_seeds))
        try:
            results.update(runner.run([a for a in arms if Arm.of(a).filter is None], recipe, seeds))
            if cfg.recipe == "auto" and ({"real", "real+classic"} <= set(results) or decisions.recipe is not None):
                recipe = _choose_recipe(cfg, results, has_val, selection, decisions.recipe)
            results.update(runner.run([a for a in arms if Arm.of(a).filter is not None], recipe, diag_seeds))
        finally:
            runner.close()
        product_recipe = recipe
        product = next((a for a in (arm_plus(recipe, "synthetic"), *cfg.arms) if a in results and
                        Arm.of(a).has("synthetic")), None)
    for arm, runs in results.items():
        accs = [r.accuracy for r in runs if r.trained]
        log(f"evaluate: {arm}: accuracy {np.mean(accs) if accs else float('nan'):.4f} over {len(accs)} seeds")
    sizes = {}
    for arm in results:
        spec = arm_training_set(arm, sets, product_recipe)
        sizes[arm] = TrainSizes(real=len(spec.data), synthetic=len(spec.synthetic) if spec.synthetic is not None else 0)
    from augment.runfolder import EvaluationFolder, write_json

    evaluation = EvaluationRuns(seeds, results, sizes, recipe, product_recipe, product, selection)
    write_json(EvaluationFolder(out).results, evaluation.to_json(), indent=None)
    return evaluation


def _choose_recipe(cfg: EvaluationConfig, results: dict[str, list[TrainingRun]], has_val: bool, selection: dict,
                   decided: Choice | None = None) -> str:
    if decided is not None:  # made by the pseudo stage, which already applied evaluation.recipe (part of its key)
        selection["recipe"] = decided.to_json()
        return decided.chosen
    val = {a: _val_mean(results[a]) for a in ("real", "real+classic")}
    if cfg.recipe == "auto":
        recipe = "real+classic" if not has_val or val["real+classic"] >= val["real"] else "real"
    else:
        recipe = "real+classic" if cfg.recipe == "classic" else "real"
    selection["recipe"] = {"rule": cfg.recipe, "validation_accuracy": val, "chosen": recipe}
    return recipe


def summarize_results(results: EvaluationRuns) -> EvaluationSummary:
    """Per-arm statistics, per-class deltas and the paired gains that decide whether synthetic data helped."""
    runs = {a: [r for r in rs if r.trained] for a, rs in results.runs.items()}
    arms = {}
    for arm, rs in runs.items():
        if not rs:
            skipped = results.runs[arm][0].skipped
            arms[arm] = {"skipped": "no runs" if skipped is None else skipped}
            continue
        arms[arm] = {
            "accuracy": summarize([r.accuracy for r in rs]),
            "macro_f1": summarize([r.macro_f1 for r in rs]),
            "per_seed_accuracy": [r.accuracy for r in rs],
            "per_seed_macro_f1": [r.macro_f1 for r in rs],
            "per_seed_validation_accuracy": [r.validation_accuracy for r in rs],
            "per_class_accuracy": np.mean([r.per_class_accuracy for r in rs], axis=0).tolist(),
            "confusion": np.sum([r.confusion for r in rs], axis=0).tolist(),
            "train_sizes": results.train_sizes.get(arm),
        }
    product = results.product_arm
    out: dict = {"arms": arms, "seeds": results.seeds, "product_arm": product, "recipe": results.recipe,
                 "product_recipe": results.product_recipe, "selection": results.selection}

    def acc(arm):
        return [r.accuracy for r in runs[arm]]

    def paired(x, y):  # arms trained on fewer seeds (diagnostics) pair with the first seeds of the others
        n = min(len(x), len(y))
        return paired_difference(x[:n], y[:n])

    def diff(a, b):
        return {"accuracy": paired(acc(a), acc(b)),
                "macro_f1": paired([r.macro_f1 for r in runs[a]], [r.macro_f1 for r in runs[b]])}

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
    recipe = results.product_recipe or "real"
    filtered, unfiltered = arm_plus(recipe, "synthetic"), arm_plus(recipe, "synthetic_unfiltered")
    if runs.get(unfiltered) and runs.get(filtered):
        out["filter_gain"] = paired(acc(filtered), acc(unfiltered))
        out["filter_gain"].update(arm=filtered, against=unfiltered)
    return EvaluationSummary.model_validate(out)
