"""The evaluation protocol: the arms' training sets, the pseudo-labeling rule, choices made on validation only,
and results that do not depend on the number of worker processes."""

import json
import pickle
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from augment.arms import Arm, Verdict, adds_label, arm_plus, has_part, parse_arm
from augment.config import ClassifierConfig, EvaluationConfig, PseudoConfig
from augment.data import DataConfig, ImageSet, Splits, load_images, split
from augment.evaluate import EvaluationRuns, evaluate, summarize_results
from augment.trainings import Examples, TrainingRun, TrainingSets, arm_training_set
from augment.pseudo import choose_threshold, pseudo_label


@pytest.fixture(scope="module")
def splits():
    cfg = DataConfig(shots_per_class=5, test_fraction=0.3, val_fraction=0.1, max_pool_size=300)
    return split(load_images(cfg), cfg)


def _sets(splits: Splits) -> TrainingSets:
    v = splits.validation  # stand-ins: labeled images from validation play "synthetic" and "pseudo" rows
    kept = Examples(v.images[:40], v.labels[:40])
    unfiltered = Examples(v.images[:60], v.labels[:60])
    pseudo = Examples(splits.pool.images[:30], np.arange(30) % 10)
    return TrainingSets(splits, kept, unfiltered, pseudo, {"class_consistency": Examples(v.images[:20], v.labels[:20])})


def test_arm_names_parse_and_bad_ones_are_named():
    assert parse_arm("real+classic+pseudo+synthetic") == {"real", "classic", "pseudo", "synthetic"}
    for bad, why in [("real+jitter", "parts must be"), ("classic", "no training images"),
                     ("real+synthetic+synthetic_unfiltered", "exclude each other"), ("pseudo+synthetic", "needs real"),
                     ("real+real", "distinct")]:
        with pytest.raises(ValueError, match=why):
            parse_arm(bad)
    with pytest.raises(ValueError, match="real\\+jitter"):
        EvaluationConfig(arms=["real", "real+jitter"])


def test_arms_are_values_with_one_name_each():
    """An arm is asked what it holds; its name is canonical, so the same training set never has two names."""
    a = Arm.of("synthetic+classic+real")
    assert a.name == "real+classic+synthetic" and a.has("classic") and not a.has("pseudo") and a.synthetic
    assert EvaluationConfig(arms=["classic+real", "real"]).arms == ["real+classic", "real"]
    assert arm_plus("real+classic", "pseudo") == "real+classic+pseudo"
    assert arm_plus("real+classic+pseudo", "synthetic_unfiltered") == "real+classic+pseudo+synthetic_unfiltered"
    assert adds_label("real+classic") == "real+classic+synthetic vs real+classic"
    f = Arm.of("filter:alia")
    assert f.filter == "alia" and f.synthetic and f.name == "filter:alia" and not f.has("real")
    assert has_part("real+classic+pseudo", "pseudo") and not has_part(None, "pseudo") and not has_part("", "pseudo")
    assert not Arm.of("real+classic+pseudo").synthetic  # a baseline
    assert Verdict("significant gain") is Verdict.GAIN and f"{Verdict.LOSS}" == "significant loss"


def test_each_arm_trains_on_what_its_name_says(splits):
    sets = _sets(splits)
    n = len(splits.train)
    expect = {  # arm: (real rows, synthetic rows, classic augmentation)
        "real": (n, None, False), "real+classic": (n, None, True), "real+classic+pseudo": (n + 30, None, True),
        "real+synthetic": (n, 40, False), "real+classic+synthetic": (n, 40, True),
        "real+classic+pseudo+synthetic": (n + 30, 40, True), "real+synthetic_unfiltered": (n, 60, False),
        "synthetic": (0, 40, False),
    }
    for arm, (n_real, n_syn, classic) in expect.items():
        spec = arm_training_set(arm, sets)
        assert len(spec.data) == len(spec.data.labels) == n_real, arm
        assert (spec.synthetic is None if n_syn is None else len(spec.synthetic) == n_syn), arm
        assert spec.augment is classic, arm
    pseudo_rows = arm_training_set("real+pseudo", sets).data
    assert (pseudo_rows.images[:n] == splits.train.images).all()
    assert (pseudo_rows.labels[n:] == sets.pseudo.labels).all()
    ablation = arm_training_set("filter:class_consistency", sets, recipe="real+classic+pseudo")
    assert len(ablation.data) == n + 30 and ablation.augment and len(ablation.synthetic) == 20
    with pytest.raises(ValueError, match="needs pseudo-labeled"):
        arm_training_set("real+pseudo", TrainingSets(splits, sets.kept, sets.unfiltered, None))


def test_threshold_is_the_lowest_that_meets_the_precision_rule():
    cfg = PseudoConfig(thresholds=[0.5, 0.7, 0.9], min_precision=0.9, min_support=3)
    conf = np.array([0.55, 0.6, 0.65, 0.75, 0.8, 0.85, 0.95, 0.96, 0.97])
    correct = np.array([0, 0, 1, 1, 1, 1, 1, 1, 1], bool)
    chosen, table = choose_threshold(cfg, conf, correct)
    assert chosen == 0.7 and [t["validation_support"] for t in table] == [9, 6, 3]
    assert table[0]["validation_precision"] == pytest.approx(7 / 9) and not table[0]["meets_rule"]
    # too few validation images above a threshold: it does not count
    assert choose_threshold(cfg.model_copy(update={"min_support": 7}), conf, correct)[0] is None


def test_pseudo_labels_come_from_train_and_validation_only(splits):
    cfg = PseudoConfig(classifier=ClassifierConfig(width=8, steps=150), thresholds=[0.3, 0.5, 0.7], min_precision=0.8,
                       min_support=5)
    p = pseudo_label(cfg, splits.train, splits.validation, splits.pool, log=lambda m: None)
    assert p.summary.threshold is not None and len(p) > 0
    assert (p.confidence > p.summary.threshold).all()
    assert set(p.ids) <= set(splits.pool.ids)
    # the pool's true labels (kept aside here) agree with most pseudo-labels
    cfg_d = DataConfig(shots_per_class=5, test_fraction=0.3, val_fraction=0.1, max_pool_size=300)
    truth = dict(zip(load_images(cfg_d).ids, load_images(cfg_d).labels))
    assert np.mean([truth[i] == y for i, y in zip(p.ids, p.labels)]) > 0.7
    assert pseudo_label(cfg.model_copy(update={"enabled": False}), splits.train, splits.validation,
                        splits.pool).summary.reason == "pseudo.enabled is false"


def _scrambled_test(splits: Splits) -> Splits:
    t = splits.test
    rng = np.random.default_rng(1)
    return Splits(splits.train, splits.validation,
                  ImageSet(t.images[rng.permutation(len(t))], t.labels, t.class_names, t.ids), splits.pool)


def test_protocol_chooses_on_validation_and_never_on_test(splits, tmp_path):
    cfg = EvaluationConfig(seeds=2, model=ClassifierConfig(width=8, steps=40, augment=False))
    a = evaluate(cfg, _sets(splits), tmp_path / "a", log=lambda m: None, workers=1)
    b = evaluate(cfg, _sets(_scrambled_test(splits)), tmp_path / "b", log=lambda m: None, workers=1)
    # test images shuffled against their labels: every test score changes, no choice does
    assert a.selection == b.selection and a.product_arm == b.product_arm
    for arm in a.runs:
        assert [r.validation_accuracy for r in a.runs[arm]] == [r.validation_accuracy for r in b.runs[arm]]
    assert any(r.accuracy != s.accuracy for arm in a.runs for r, s in zip(a.runs[arm], b.runs[arm]))
    recipe = a.selection["recipe"]["chosen"]
    assert a.product_arm == a.product_recipe + "+synthetic"
    assert set(a.runs) == {"real", "real+classic", f"{recipe}+pseudo", "real+synthetic", "real+classic+synthetic",
                           f"{recipe}+pseudo+synthetic", f"{a.product_recipe}+synthetic_unfiltered",
                           "synthetic", "filter:class_consistency"}
    s = summarize_results(a)
    assert set(s.baselines) == {"real", "real+classic", f"{recipe}+pseudo"}
    assert s.best_baseline == max(s.baselines, key=lambda x: s.arms[x].accuracy.mean)


def test_results_do_not_depend_on_the_number_of_workers(splits, tmp_path):
    cfg = EvaluationConfig(arms=["real", "real+classic+synthetic"], seeds=2, filter_ablation=False,
                           model=ClassifierConfig(width=8, steps=30, augment=False))
    one = evaluate(cfg, _sets(splits), tmp_path / "1", log=lambda m: None, workers=1)
    two = evaluate(cfg, _sets(splits), tmp_path / "2", log=lambda m: None, workers=2)
    strip = lambda res: {a: [replace(r, seconds=None) for r in rs] for a, rs in res.runs.items()}  # noqa: E731
    assert strip(one) == strip(two)


def test_trainings_in_this_process_leave_its_thread_count_alone(splits, tmp_path):
    """workers=1 trains here on one thread, as a pool worker would, and then gives the process its threads back
    (it kept one thread before: every later stage of the run, fine-tuning included, ran at half speed)."""
    import torch

    cfg = EvaluationConfig(arms=["real"], seeds=1, filter_ablation=False,
                           model=ClassifierConfig(width=8, steps=5, augment=False))
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        evaluate(cfg, _sets(splits), tmp_path, log=lambda m: None, workers=1)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)


def test_diagnostic_arms_train_on_the_first_seeds_only(splits, tmp_path):
    cfg = EvaluationConfig(seeds=3, diagnostic_seeds=2, model=ClassifierConfig(width=8, steps=20, augment=False))
    res = evaluate(cfg, _sets(splits), tmp_path, log=lambda m: None, workers=1)
    other = "real+synthetic" if res.recipe == "real+classic" else "real+classic+synthetic"  # not the recipe's pair
    diagnostic = {a for a in res.runs if a.startswith("filter:") or a in ("synthetic", other) or "unfiltered" in a}
    assert other in diagnostic
    assert diagnostic and all(len(res.runs[a]) == 2 for a in diagnostic)
    assert all(len(rs) == 3 for a, rs in res.runs.items() if a not in diagnostic)
    s = summarize_results(res)
    assert len(s.filter_gain.differences) == 2 and len(s.gain_over_best_baseline.differences) == 3


def test_a_training_repeated_under_another_arm_name_runs_once(splits, tmp_path, monkeypatch):
    import augment.trainings as ev

    sets = _sets(splits)
    # one filter alone keeps what the chain keeps, another keeps every candidate, a third keeps its own subset
    sets.ablation = {"class_consistency": sets.kept, "memorization": sets.unfiltered,
                     "alia": Examples(sets.kept.images[:25], sets.kept.labels[:25])}
    trained = []
    real_train_arm = ev.train_arm
    monkeypatch.setattr(ev, "train_arm", lambda *a: trained.append(a[2:]) or real_train_arm(*a))
    cfg = EvaluationConfig(seeds=3, diagnostic_seeds=2, model=ClassifierConfig(width=8, steps=20, augment=False))
    res = evaluate(cfg, sets, tmp_path, log=lambda m: None, workers=1)
    runs, product = res.runs, res.product_arm
    unfiltered = f"{res.product_recipe}+synthetic_unfiltered"
    # the same numbers as the arm that trained on the same set with the same seeds, and said so
    assert [r.accuracy for r in runs["filter:class_consistency"]] == [r.accuracy for r in runs[product][:2]]
    assert [r.accuracy for r in runs["filter:memorization"]] == [r.accuracy for r in runs[unfiltered]]
    assert {r.same_training_as for r in runs["filter:class_consistency"]} == {product}
    assert {r.same_training_as for r in runs["filter:memorization"]} == {unfiltered}
    assert all(r.same_training_as is None for a in runs if a not in ("filter:class_consistency",
                                                                    "filter:memorization") for r in runs[a])
    # every other unit trained once: the two repeated arms' 2 seeds each were not trained again
    assert len(trained) == sum(len(rs) for rs in runs.values()) - 4
    assert len({(arm, recipe, seed) for arm, recipe, seed in trained}) == len(trained)
    # what evaluate returns is what its results file holds, and reads back the same
    assert json.loads((tmp_path / "results.json").read_text()) == res.to_json()
    assert EvaluationRuns.load(tmp_path / "results.json") == res


def test_a_training_run_keeps_the_keys_and_order_of_its_results_file_entry():
    """Each run in results.json: the scores in one order, validation accuracy and `same_training_as` only when
    there are any, a skipped run only why. A run crosses processes (worker pools, task runners) pickled."""
    raw = {"seed": 1, "accuracy": 0.5, "macro_f1": 0.4, "per_class_accuracy": [0.5, 0.5],
           "confusion": [[1, 1], [1, 1]], "validation_accuracy": 0.6, "seconds": 0.1, "same_training_as": "real"}
    plain = {k: v for k, v in raw.items() if k not in ("validation_accuracy", "same_training_as")}
    for entry in (raw, plain, {"skipped": "no training images"}):
        run = TrainingRun.from_json(entry)
        assert list(run.to_json().items()) == list(entry.items())
        assert pickle.loads(pickle.dumps(run)) == run
        assert run.trained is ("accuracy" in entry)
    with pytest.raises(ValueError, match="unknown fields"):
        TrainingRun.from_json({"seed": 1, "acc": 0.5})


def test_a_product_without_synthetic_data_is_compared_and_explained_as_the_recipe_alone():
    """When the synthetic choice leaves the samples out, the product is the recipe: no gain row against itself,
    what the synthetic data would have added stays a row, the filter is judged on the recipe's synthetic arm, and
    the verdict line says so instead of claiming synthetic data."""
    from augment.report.schema import validate_metrics
    from augment.report.sections import headline, next_step

    def runs(accs):
        return [{"seed": s, "accuracy": a, "macro_f1": a, "per_class_accuracy": [a, a], "confusion": [[1, 0], [0, 1]]}
                for s, a in enumerate(accs)]

    results = {"seeds": [0, 1, 2], "product_arm": "real+classic", "recipe": "real+classic",
               "product_recipe": "real+classic", "train_sizes": {},
               "selection": {"synthetic": {"in_product": False, "images": 20, "synthetic_prob": 0.25}},
               "runs": {"real": runs([0.90, 0.91, 0.92]), "real+classic": runs([0.95, 0.96, 0.95]),
                        "real+classic+synthetic": runs([0.94, 0.95, 0.93]),
                        "real+classic+synthetic_unfiltered": runs([0.93, 0.94, 0.92])}}
    s = summarize_results(EvaluationRuns.from_json(results)).to_json()  # as evaluation/summary.json holds it
    assert s["best_baseline"] == "real+classic" and s["gain_over_best_baseline"]["mean"] == 0
    assert set(s["gains"]) == {"real"}  # never the product against itself
    assert s["synthetic_adds"]["real+classic+synthetic vs real+classic"]["accuracy"]["mean"] == pytest.approx(-0.0133,
                                                                                                             abs=1e-3)
    assert s["filter_gain"]["arm"] == "real+classic+synthetic" and s["filter_gain"]["mean"] == pytest.approx(0.01)
    m = json.loads((Path(__file__).parent / "data" / "tiny_run_golden.json").read_text())["metrics"]  # a real one
    m["run"].update(stage_seconds={}, total_seconds=None, versions={}, cpu=None, output_dir="out")
    m["gain_over_best_baseline"] = {k: s["gain_over_best_baseline"][k] for k in m["gain_over_best_baseline"]
                                    if k in s["gain_over_best_baseline"]} | {"baseline": s["best_baseline"],
                                                                             "product_arm": "real+classic"}
    m["evaluation"].update(arms=s["arms"], product_arm="real+classic", product_recipe="real+classic",
                           selection=results["selection"], synthetic_adds=s["synthetic_adds"])
    m["dataset"] = {"path": "out/dataset", "splits": {"train": {"rows": 9, "synthetic": 4, "pseudo_labeled": 0}}}
    m = validate_metrics(m)
    line = headline(m)
    assert line.startswith("On the 20 labeled images the generator never saw") and "recipe alone (real+classic" in line
    assert "it is the best baseline" in line and "real+classic+synthetic, a diagnostic): -1.3 points" in line
    assert "Your recipe plus synthetic data" not in line
    assert next_step(m).startswith("Next: train on the real rows of `out/dataset` (is_synthetic false)")
