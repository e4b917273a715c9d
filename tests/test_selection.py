"""Choices made by cross-validation over every labeled image: the folds, the decision rule, the class-balanced
pseudo rule, and that test never enters."""

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from augment.config import ClassifierConfig, EvaluationConfig, PseudoConfig, SelectionConfig
from augment.data import DataConfig, load_images, split
from augment.results import Selection
from augment.selection import (OOF, choose_synthetic, class_balanced, decide, generator_holdout, out_of_fold,
                               stratified_folds)

TINY_CNN = ClassifierConfig(width=8, steps=25, batch_size=16, augment=False)


def test_every_labeled_image_is_held_out_once_per_repeat_in_stratified_folds():
    labels = np.repeat(np.arange(4), [10, 10, 7, 12])
    folds = stratified_folds(labels, k=5, repeats=2, seed=3)
    assert len(folds) == 10
    for r in (0, 1):
        held = np.concatenate([f.held for f in folds if f.repeat == r])
        assert sorted(held) == list(range(len(labels)))  # each image exactly once
        for f in (f for f in folds if f.repeat == r):
            assert not set(f.train) & set(f.held) and len(f.train) + len(f.held) == len(labels)
            assert set(np.bincount(labels[f.held], minlength=4)) <= {1, 2, 3}  # every class in every fold
    assert not all(np.array_equal(a.held, b.held) for a, b in zip(folds[:5], folds[5:]))  # repeats differ
    again = stratified_folds(labels, k=5, repeats=2, seed=3)
    assert all(np.array_equal(a.held, b.held) for a, b in zip(folds, again))  # seeded
    assert len(stratified_folds(np.repeat(np.arange(3), 3), k=5, repeats=1, seed=0)) == 3  # k <= smallest class
    with pytest.raises(ValueError, match="at least 2 labeled images in every class"):
        stratified_folds(np.array([0, 0, 1]), k=5, repeats=1, seed=0)


def _oof(p: np.ndarray) -> OOF:
    return OOF(p, (p > 0.5).astype(float))


def test_the_richer_option_wins_only_when_its_interval_is_above_zero():
    rng = np.random.default_rng(0)
    base = rng.uniform(0.3, 1.0, (1, 200))
    clear = np.minimum(base + 0.1, 1.0)  # more sure of every true class
    d = decide("recipe", {"real": _oof(base), "real+classic": _oof(clear)}, n_folds=5)
    assert d.chosen == "real+classic" and d.decided and d.difference["ci_low"] > 0 and d.images == 200
    noisy = base + rng.normal(0, 0.05, base.shape)  # no real difference: noise around the same scores
    d = decide("recipe", {"real": _oof(base), "real+classic": _oof(noisy)}, n_folds=5, confidence=0.95)
    assert d.chosen == "real" and not d.decided
    if d.best == "real+classic":
        assert d.difference["ci_low"] <= 0 and "cannot decide" in d.reason
    tie = decide("recipe", {"real": _oof(base), "real+classic": _oof(base.copy())}, n_folds=5)
    assert tie.chosen == tie.best == "real" and tie.difference is None


def test_out_of_fold_scores_are_the_true_class_probability_and_correctness():
    labels = np.array([0, 1, 0, 1])
    folds = stratified_folds(labels, k=2, repeats=1, seed=0)
    probas = [np.tile([[0.8, 0.2]], (len(f.held), 1)) for f in folds]  # always says class 0, 80% sure
    s = out_of_fold(folds, 4, probas, labels)
    assert s.p_true.tolist() == [[0.8, 0.2, 0.8, 0.2]] and s.correct.tolist() == [[1, 0, 1, 0]]


def test_class_balanced_takes_each_class_top_confident_predictions():
    proba = np.array([[0.9, 0.1], [0.6, 0.4], [0.8, 0.2], [0.3, 0.7], [0.45, 0.55], [0.7, 0.3]])
    assert class_balanced(proba, 2).tolist() == [0, 2, 3, 4]  # class 0: rows 0 (0.9), 2 (0.8); class 1: 3, 4
    assert class_balanced(proba, 1).tolist() == [0, 3]
    assert class_balanced(proba, 10).tolist() == list(range(6))  # fewer predicted than asked: all of them


@pytest.fixture(scope="module")
def few_shot():
    cfg = DataConfig(shots_per_class=6, test_fraction=0.3, max_pool_size=400)
    return split(load_images(cfg), cfg)


def test_the_cross_validated_pseudo_rule_labels_pool_images_with_a_weak_labeler(few_shot):
    """A labeler far below the old rule's 98% validation precision (there it labeled nothing) still labels the
    pool, every class alike, and the amount is one of the candidates, chosen out of fold."""
    from augment.pseudo import select_and_label

    weak = ClassifierConfig(width=8, steps=40, batch_size=16, augment=False)
    cfg = PseudoConfig(classifier=weak, per_class=[5, 15])
    sel = SelectionConfig(folds=3, model=TINY_CNN, bootstrap=200)
    labels, decisions = select_and_label(cfg, sel, few_shot.train, few_shot.pool, workers=1, log=lambda m: None)
    s = labels.summary
    assert s.labeler_oof_accuracy < 0.98 and s.per_class_amount in (5, 15)
    assert len(labels) > 0 and set(s.per_class) <= {s.per_class_amount} | set(range(s.per_class_amount))
    assert max(s.per_class) == s.per_class_amount  # no class above the shared amount
    assert decisions.recipe.images == decisions.pseudo.images == len(few_shot.train) == 60
    assert set(decisions.pseudo.per_class_oof_accuracy) == {"5", "15"}
    # every labeled row names its pool image
    assert labels.ids == [few_shot.pool.ids[i] for i in labels.index]


def test_the_folds_never_see_test_and_shuffled_test_labels_change_no_choice(tiny_cfg, monkeypatch):
    """Every image any fold classifier trains on or is scored on comes from the labeled train split or the pool;
    test images shuffled against their labels leave every choice as it was."""
    import augment.classifier as classifier
    from augment.stages import choices, core, generator, outputs
    from augment.data import ImageSet, Splits

    seen: list[np.ndarray] = []
    real_train = classifier.train_classifier

    def spy(cfg, images, labels, *a, **k):
        seen.append(images)
        clf = real_train(cfg, images, labels, *a, **k)
        predict = clf.predict_proba
        clf.predict_proba = lambda x, *a2, **k2: (seen.append(x), predict(x, *a2, **k2))[1]
        return clf

    monkeypatch.setattr(classifier, "train_classifier", spy)
    cfg = tiny_cfg.model_copy(update={"runner": tiny_cfg.runner.model_copy(update={"local_workers": 1})})
    generator.prepare_data(cfg)
    choices.pseudo_stage(cfg, log=lambda m: None)
    first = json.loads((core.output_dir(cfg) / "pseudo" / "selection.json").read_text())
    splits = outputs.load_splits(cfg)
    digest = lambda im: hashlib.sha256(im.tobytes()).hexdigest()  # noqa: E731
    test = {digest(im) for im in splits.test.images}
    allowed = {digest(im) for part in (splits.train, splits.pool) for im in part.images}
    seen_rows = {digest(im) for batch in seen for im in batch}
    assert seen and not seen_rows & test and seen_rows <= allowed
    # the same run with test labels shuffled
    t = splits.test
    rng = np.random.default_rng(5)
    scrambled = Splits(splits.train, splits.validation, ImageSet(t.images, rng.permutation(t.labels), t.class_names,
                                                                 t.ids), splits.pool)
    other = cfg.model_copy(update={"publish": cfg.publish.model_copy(
        update={"output_dir": str(core.output_dir(cfg)) + "-scrambled"})})
    generator.prepare_data(other)
    scrambled.save(core.output_dir(other) / "data" / "splits.npz")
    choices.pseudo_stage(other, log=lambda m: None)
    assert json.loads((core.output_dir(other) / "pseudo" / "selection.json").read_text()) == first
    assert (core.output_dir(other) / "pseudo" / "labels.parquet").read_bytes() == \
        (core.output_dir(cfg) / "pseudo" / "labels.parquet").read_bytes()


def test_the_evaluation_follows_the_cross_validated_choices(few_shot, tmp_path):
    from augment.evaluate import evaluate
    from augment.trainings import Examples, TrainingSets

    p = few_shot.pool
    sets = TrainingSets(few_shot, Examples(few_shot.train.images[:20], few_shot.train.labels[:20]),
                        Examples(few_shot.train.images[:30], few_shot.train.labels[:30]),
                        Examples(p.images[:30], np.arange(30) % 10))
    cfg = EvaluationConfig(seeds=1, model=TINY_CNN, diagnostic_arms=False, filter_ablation=False)
    base = {"options": ["real", "real+classic"], "oof_accuracy": {"real": 0.5, "real+classic": 0.6}, "images": 60,
            "folds": 5, "repeats": 1, "difference": {"mean": 0.1, "ci_low": 0.02, "ci_high": 0.2},
            "rule": "cross_validation"}  # as select_and_label writes them
    decisions = {"recipe": {**base, "name": "recipe", "best": "real+classic", "chosen": "real+classic",
                            "decided": True, "reason": "r"},
                 "pseudo": {**base, "name": "pseudo", "options": ["real+classic", "real+classic+pseudo"],
                            "best": "real+classic+pseudo", "chosen": "real+classic+pseudo", "decided": True,
                            "reason": "p", "per_class": 3, "per_class_oof_accuracy": {"3": 0.7}}}
    res = evaluate(cfg, sets, tmp_path, log=lambda m: None, workers=1,
                   decisions=Selection.model_validate(decisions))
    assert res.recipe == "real+classic" and res.product_recipe == "real+classic+pseudo"
    assert res.product_arm == "real+classic+pseudo+synthetic"
    assert res.selection["recipe"]["rule"] == "cross_validation" and res.selection["pseudo"]["in_recipe"]
    decisions["pseudo"]["chosen"] = "real+classic"
    res = evaluate(cfg, sets, tmp_path / "b", log=lambda m: None, workers=1,
                   decisions=Selection.model_validate(decisions))
    assert res.product_recipe == "real+classic" and not res.selection["pseudo"]["in_recipe"]
    # the synthetic choice left the samples out: the product is the recipe, the synthetic arms stay beside it
    decisions["synthetic"] = {"in_product": False, "synthetic_prob": 0.25, "chosen": "real+classic"}
    res = evaluate(cfg, sets, tmp_path / "c", log=lambda m: None, workers=1,
                   decisions=Selection.model_validate(decisions))
    assert res.product_arm == "real+classic" and res.selection["synthetic"]["synthetic_prob"] == 0.25
    assert "real+classic+synthetic" in res.runs


def test_the_report_says_how_many_images_each_choice_rests_on():
    from augment.report.schema import (Choice, DataFacts, Evaluation, Metrics, Pseudo, Selection)
    from augment.report.sections import _choice_rows, _pseudo_table

    d = {"options": ["real", "real+classic"], "oof_accuracy": {"real": 0.71, "real+classic": 0.74},
         "oof_score": {"real": 0.65, "real+classic": 0.7}, "images": 120,
         "folds": 5, "repeats": 2, "difference": {"mean": 0.03, "ci_low": -0.01, "ci_high": 0.07}, "best":
         "real+classic", "chosen": "real", "decided": False, "rule": "cross_validation", "name": "recipe"}
    pseudo = {"rule": "cross_validation", "per_class_amount": 50, "count": 500, "pool_size": 900, "folds": 5,
              "labeled_images": 120, "labeler_oof_accuracy": 0.7, "per_class": [50] * 10}
    # only the parts these two tables read, each validated (a difference without `confidence` reads as 95%)
    m = Metrics.model_construct(data=DataFacts.model_construct(validation_size=0),
                                evaluation=Evaluation.model_construct(selection=Selection(recipe=Choice(**d))),
                                pseudo=Pseudo(**dict.fromkeys(Pseudo.model_fields) | pseudo))
    rows, text = _choice_rows(m), _pseudo_table(m)[2]
    assert rows == [["classic augmentation", "cross-validation", "real 71.0 / 65.0, real+classic 74.0 / 70.0",
                     "+3.0 [-1.0, +7.0] (95%)",
                     "120 images, 5 folds x 2", "real (the data cannot decide: simpler)"]]
    assert "50 per class" in text and "500 of 900" in text and "70.0%" in text


def test_the_choices_stage_key_follows_the_recipe_but_not_the_rest_of_evaluation(tiny_cfg):
    from augment.pipeline import STAGE

    key = lambda c: c.fingerprint(*STAGE["pseudo"].sections)  # noqa: E731
    ev = tiny_cfg.evaluation
    assert key(tiny_cfg.model_copy(update={"evaluation": ev.model_copy(update={"seeds": 7})})) == key(tiny_cfg)
    assert key(tiny_cfg.model_copy(update={"evaluation": ev.model_copy(update={"recipe": "none"})})) != key(tiny_cfg)
    sel = tiny_cfg.selection
    assert key(tiny_cfg.model_copy(update={"selection": sel.model_copy(update={"folds": 4})})) != key(tiny_cfg)


def test_the_generator_holdout_is_stratified_seeded_and_leaves_every_class_an_image():
    labels = np.repeat(np.arange(4), [10, 5, 2, 1])
    held = generator_holdout(labels, 0.2, seed=0)
    assert np.bincount(labels[held], minlength=4).tolist() == [2, 1, 0, 0]  # round(0.2 n), one left to the generator
    assert np.array_equal(held, generator_holdout(labels, 0.2, seed=0)) and np.all(np.diff(held) > 0)
    assert not np.array_equal(held, generator_holdout(labels, 0.2, seed=1))
    assert np.bincount(labels[generator_holdout(labels, 0.5, seed=0)], minlength=4).tolist() == [5, 2, 1, 0]
    assert len(generator_holdout(labels, 0.0, seed=0)) == 0


def test_the_synthetic_choice_takes_samples_that_help_on_the_holdout_and_leaves_out_ones_that_do_not(few_shot):
    """Scored on the held-out labeled images only: samples that carry them with their true labels win; the same
    samples with wrong labels lose, and the product keeps the recipe alone. Nothing else is scored."""
    tr = few_shot.train
    held = generator_holdout(tr.labels, 0.2, seed=0)
    assert len(held) == 10
    copies = (np.repeat(tr.images[held], 20, axis=0), np.repeat(tr.labels[held], 20))
    wrong = (copies[0], (copies[1] + 1) % 10)
    sel = SelectionConfig(model=TINY_CNN, bootstrap=200, synthetic_seeds=2)
    args = (sel, [0.25, 0.5], "real+classic", tr.images, tr.labels, 10, held, None)
    good = choose_synthetic(*args, copies, workers=1, log=lambda m: None)
    assert good.in_product and good.decided
    assert good.chosen == f"real+classic+synthetic at p={good.synthetic_prob:g}"
    assert good.images == 10 and good.repeats == 2 and good.holdout == 10 and good.generator_images == 50
    bad = choose_synthetic(*args, wrong, workers=1, log=lambda m: None)
    assert not bad.in_product and bad.chosen == "real+classic"
    assert bad.oof_score["real+classic"] > max(v for o, v in bad.oof_score.items() if o != "real+classic")
    assert bad.synthetic_prob in (0.25, 0.5)  # the synthetic arms still run, at the best of the candidates
    assert good.oof_score["real+classic"] == bad.oof_score["real+classic"]  # the same paired baseline
    few = choose_synthetic(sel, [0.5], "real+classic", tr.images, tr.labels, 10, held[:6], None,
                           (np.repeat(tr.images[held[:6]], 20, axis=0), np.repeat(tr.labels[held[:6]], 20)),
                           workers=1, log=lambda m: None)
    assert not few.in_product and "6 images are too few to decide" in few.reason


def test_nothing_the_generator_learns_from_sees_the_synthetic_holdout(tiny_cfg, monkeypatch):
    """Base pretraining, fine-tuning and img2img sources use the labeled images minus the holdout; the choose
    stage scores on exactly those held-out images; the filter and the evaluation still see every labeled image."""
    import pandas as pd

    import augment.finetune as finetune
    from augment.stages import choices, core, generator, outcome, outputs

    cfg = tiny_cfg.model_copy(update={
        "runner": tiny_cfg.runner.model_copy(update={"local_workers": 1}),
        "generation": tiny_cfg.generation.model_copy(update={"strengths": [0.5]}),
        "filter": tiny_cfg.filter.model_copy(update={"order": ["near_duplicates"]})})  # keeps the tiny samples
    generator.prepare_data(cfg)
    splits = outputs.load_splits(cfg)
    held = outputs.synthetic_holdout(cfg, splits)
    held_ids = {splits.train.ids[i] for i in held}
    assert len(held) == 10  # one of the five per class
    base = generator.base_model(cfg, log=lambda m: None)
    meta = json.loads((Path(base.path) / "base.json").read_text())
    assert meta["num_images"] == len(splits.pool) + len(splits.train) - len(held)
    choices.pseudo_stage(cfg, log=lambda m: None)
    seen = {}
    real = finetune.finetune

    def spy(lora, backend, info, train, *a, **k):
        seen["ids"] = set(train.ids)
        return real(lora, backend, info, train, *a, **k)

    monkeypatch.setattr(finetune, "finetune", spy)
    adapter = generator.finetune_stage(cfg, base, log=lambda m: None)
    assert seen["ids"] == set(splits.train.ids) - held_ids
    generator.generate_stage(cfg, base, adapter, log=lambda m: None)
    plan = pd.read_parquet(core.folder(cfg).candidates.plan)
    assert set(plan["source_id"]) and not set(plan["source_id"]) & held_ids
    outcome.filter_stage(cfg, log=lambda m: None)
    decision = choices.choose_stage(cfg, log=lambda m: None)
    assert decision.images == decision.holdout == 10 and decision.generator_images == len(splits.train) - 10
    # without the choice nothing is held out
    off = cfg.model_copy(update={"selection": cfg.selection.model_copy(update={"synthetic_holdout": 0.0})})
    assert len(outputs.synthetic_holdout(off, splits)) == 0
    assert outputs.generator_splits(off).train.ids == splits.train.ids
