"""The report's sections as data: (title, text, tables, figure names), which both renderers walk; the verdict
line (`headline`) and what to do next."""

from __future__ import annotations

from typing import NamedTuple

from augment.arms import Arm, Verdict, adds_label, arm_plus, has_part
from augment.report.schema import ArmResult, Difference, Evaluation, Metrics, Summary, TrainSizes
from augment.runfolder import RunFolder


def _choice_rows(m: Metrics) -> list[list]:
    """The choice table (recipe, pseudo, synthetic), for either selection rule."""
    sel, n_val = m.evaluation.selection, m.data.validation_size
    rows = []
    for name, what in (("recipe", "classic augmentation"), ("pseudo", "pseudo-labeled pool"),
                       ("synthetic", "synthetic data")):
        d = getattr(sel, name)
        if d is None:
            continue
        if d.skipped is not None:
            rows.append([what, "cross-validation", "—", "—", "—", f"skipped: {d.skipped}"])
        elif d.cross_validated:
            diff, score = d.difference, d.oof_score or {}
            scores = ", ".join(f"{o} {_pct(v)}" + (f" / {_pct(score[o])}" if o in score else "")
                               for o, v in d.oof_accuracy.items())
            interval = "—" if diff is None else (f"{100 * diff.mean:+.1f} [{100 * diff.ci_low:+.1f}, "
                                                 f"{100 * diff.ci_high:+.1f}] "
                                                 f"({100 * diff.confidence:.0f}%)")
            outcome = (d.chosen if name == "recipe" else
                       ("in the recipe" if d.in_recipe else "left out") if name == "pseudo" else
                       f"in the product at p={d.synthetic_prob:g}" if d.in_product else "left out")
            if d.rule not in ("cross_validation",):
                outcome += " (set)"
            elif diff is not None:
                outcome += " (decided by the data)" if d.decided else " (the data cannot decide: simpler)"
            rests = (f"{d.images} labeled images the generator never saw x {d.repeats} seeds"
                     if name == "synthetic" else f"{d.images} images, {d.folds} folds x {d.repeats}")
            rule = ("held-out labeled images" if name == "synthetic" else "cross-validation"
                    ) if d.rule == "cross_validation" else f"set: {d.rule}"
            rows.append([what, rule, scores, interval, rests, outcome])
        elif name == "recipe":
            va = d.validation_accuracy or {}
            rows.append([what, f"validation: {d.rule}", f"real {_pct(va.get('real'))}, real+classic "
                         f"{_pct(va.get('real+classic'))}", "—", f"{n_val} validation images", d.chosen])
        else:
            rows.append([what, "validation: kept if it raises accuracy",
                         f"without {_pct(d.validation_accuracy_without)}, with "
                         f"{_pct(d.validation_accuracy_with)}", "—", f"{n_val} validation images",
                         "in the recipe" if d.in_recipe else "left out"])
    return rows


def _pseudo_table(m: Metrics) -> tuple[list, list, str]:
    """The pseudo-label table (rows, header) and text, for either selection rule."""
    choice, ps = m.evaluation.selection.pseudo, m.pseudo
    if ps is None:
        return [], [], "No pseudo-labeling stage in this run."
    if ps.rule == "cross_validation":
        chosen = ps.per_class_amount
        oof = (choice.per_class_oof_accuracy if choice else None) or {}
        p_true = (choice.per_class_oof_score if choice else None) or {}
        head = ["pool images per class", "out-of-fold accuracy (%)", "out-of-fold true-class p (%)", ""]
        table = [[k, _pct(v), _pct(p_true.get(k)), "chosen" if str(chosen) == k else ""] for k, v in oof.items()]
        text = ("No pseudo-labels: " + ps.reason + "." if ps.reason else
                f"On each of {ps.folds} folds a pseudo-labeler trained without the held-out images labeled "
                f"the pool, and the downstream classifier trained on the fold plus each class's most confident pool "
                f"images (the same number for every class) scored the held-out images (the probability it gave "
                f"their true class decides). The best number, "
                f"{chosen} per class, labels {ps.count} of {ps.pool_size} pool images (per class: "
                f"{ps.per_class}), with the labeler trained on all {ps.labeled_images} labeled "
                f"images, whose own out-of-fold accuracy is {_pct(ps.labeler_oof_accuracy)}%. These images "
                "also trained the generator when lora.use_pseudo_labeled is on.")
        return table, head, text
    head = ["threshold", "validation images above", "precision (%)", "coverage (%)", "meets rule", ""]
    table = [[t.threshold, t.validation_support, _pct(t.validation_precision),
              _pct(t.validation_coverage), "✓" if t.meets_rule else "",
              "chosen" if t.threshold == ps.threshold else ""] for t in ps.thresholds or []]
    text = ("No pseudo-labels: " + ps.reason + "." if ps.reason else
            f"A classifier trained on the labeled train split only labeled the unlabeled pool; the threshold is "
            f"the lowest whose confident validation predictions are at least {_pct(ps.min_precision)}% "
            f"accurate: {ps.threshold}, which labels {ps.count} of {ps.pool_size} pool "
            f"images (per class: {ps.per_class}). These images also trained the generator when "
            "lora.use_pseudo_labeled is on.")
    return table, head, text


def _pct(x) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}"


def _ci(s: Summary) -> str:
    if s.ci_low is None:
        return f"{_pct(s.mean)}"
    return f"{_pct(s.mean)} ± {_pct(s.std)} [{_pct(s.ci_low)}, {_pct(s.ci_high)}]"


def headline(m: Metrics) -> str:
    g, ev = m.gain_over_best_baseline, m.evaluation
    arms, product = ev.arms, ev.product_arm
    if g is None or product not in arms or not arms[product].ran:
        return "No comparison of synthetic data against a baseline was run."
    b = g.baseline
    interval = ("" if g.ci_low is None else
                f", 95% CI [{100 * g.ci_low:+.1f}, {100 * g.ci_high:+.1f}]")
    recipe = ev.product_recipe or "real"
    rule = ev.selection.recipe.rule if ev.selection.recipe else None
    how = ("chosen on labeled data by cross-validation" if rule == "cross_validation" else
           f"set by evaluation.recipe={rule}" if rule in ("classic", "none") else "chosen on validation")
    if not Arm.of(product).synthetic:  # the choose stage left the synthetic data out
        syn = ev.selection.synthetic
        gain = ev.synthetic_adds.get(adds_label(recipe))
        adds = gain.accuracy if gain else None
        without = (f"On the {syn.images if syn else None} labeled images the generator never saw, the synthetic "
                   f"data could not show that it helps, so the product is your recipe alone ({recipe}; {how})")
        against = ("it is the best baseline" if b == product else
                   f"against {_pct(arms[b].accuracy.mean)}% for the best baseline ({b}): a paired difference "
                   f"of {100 * g.mean:+.1f} points over {g.n} seeds{interval}: **{g.verdict}**")
        diag = "" if not adds else (
            f" With the synthetic data ({arm_plus(recipe, 'synthetic')}, a diagnostic): {100 * adds.mean:+.1f} "
            f"points" + ("" if adds.ci_low is None else
                         f", 95% CI [{100 * adds.ci_low:+.1f}, {100 * adds.ci_high:+.1f}]") +
            f": {adds.verdict}.")
        return f"{without}: {_pct(arms[product].accuracy.mean)}% {ev.split} accuracy; {against}.{diag}"
    return (f"Your recipe plus synthetic data ({product}; recipe {recipe} {how}) reached "
            f"{_pct(arms[product].accuracy.mean)}% {ev.split} accuracy against "
            f"{_pct(arms[b].accuracy.mean)}% for the best baseline ({b}): a paired difference of "
            f"{100 * g.mean:+.1f} points over {g.n} seeds{interval}: **{g.verdict}**.")


def key_arms(ev: Evaluation) -> list[str]:
    """The arms shown per class: real, real+classic, the best baseline and the product (each once, if run)."""
    names = dict.fromkeys(("real", "real+classic", ev.best_baseline, ev.product_arm))
    return [a for a in names if a and a in ev.arms and ev.arms[a].ran]


def next_step(m: Metrics) -> str:
    """One line under the verdict: what a team should do with this result."""
    g = m.gain_over_best_baseline
    if g is None:
        return ""
    ds = m.dataset.path
    if not Arm.of(g.product_arm or "synthetic").synthetic:
        rows = m.dataset.splits["train"]
        with_pool = has_part(g.product_arm, "pseudo") and rows.pseudo_labeled
        keep = "the real and pseudo-labeled rows" if with_pool else "the real rows"
        return (f"Next: train on {keep} of `{ds}` (is_synthetic false) with your recipe. The synthetic rows are "
                "published beside them (is_synthetic true) for inspection; the tables below show what they did.")
    if g.verdict == Verdict.GAIN:
        return f"Next: train on `{ds}` (train split) with your usual recipe; the gain above is what to expect."
    if g.verdict == Verdict.LOSS:
        rows = m.dataset.splits["train"]
        keep = ("the rows with is_synthetic false (real and pseudo-labeled)" if has_part(g.baseline, "pseudo") and
                rows.pseudo_labeled else "the rows with is_synthetic false")
        return (f"Next: train on {g.baseline}: from `{ds}`, take {keep}. Look at the per-class table and the "
                "rejected samples below to see where the generator falls short.")
    return ("Next: the difference is within noise. Raise evaluation.seeds for a tighter interval, or keep "
            f"{g.baseline}, which costs less.")


class Section(NamedTuple):
    """One section of the report: both renderers walk the list that `sections` returns."""

    title: str
    text: str
    tables: list[tuple[list[str], list[list]]]
    figures: list[str]


def _verdict(m: Metrics) -> Section:
    ev = m.evaluation
    product, n_seeds = ev.product_arm, len(m.run.evaluation_seeds)

    def gain_row(label: str, d: Difference, f1: Difference | None) -> list:
        n = len(d.differences)
        if 0 < n < n_seeds:  # a diagnostic arm, trained on the first evaluation.diagnostic_seeds seeds
            label += f" [diagnostic: {n} of {n_seeds} seeds]"
        return [label, f"{100 * d.mean:+.1f}",
                "n/a" if d.ci_low is None else f"[{100 * d.ci_low:+.1f}, {100 * d.ci_high:+.1f}]",
                "n/a" if d.p_value is None else f"{d.p_value:.3g}", d.verdict,
                "" if f1 is None else f"{100 * f1.mean:+.1f}"]

    rows = [gain_row(f"{product} − {b}" + (" (best baseline)" if b == ev.best_baseline else ""),
                     d.accuracy, d.macro_f1) for b, d in (ev.gains or {}).items()]
    adds = ev.synthetic_adds
    for b in ev.baselines:
        label = adds_label(b)
        if label in adds and arm_plus(b, "synthetic") != product:  # the product's own pair is a row above
            rows.append(gain_row(f"{label} (what synthetic data adds)", adds[label].accuracy,
                                 adds[label].macro_f1))
    if ev.filter_gain:
        fg = ev.filter_gain
        rows.append(gain_row(f"{fg.arm} − {fg.against} (what the filter is worth)", fg, None))
    verdict = headline(m) + (" " + next_step(m) if next_step(m) else "")
    return Section("Verdict", verdict, [(["comparison", "Δ accuracy (pts)", "95% CI", "p", "verdict",
                                          "Δ macro-F1 (pts)"], rows)], [])


def _choices(m: Metrics) -> Section:
    return Section(
        "How the recipe was chosen (labeled data only)",
        f"The product arm is your recipe plus the synthetic data, when it helps on labeled images the generator "
        f"never saw: "
        f"{m.evaluation.product_arm}. Every choice below "
        "reads labeled data only: out-of-fold scores of every labeled train image (cross-validation; the richer "
        "option wins only when its paired advantage over the simpler one, in the probability the fold's classifier "
        "gives each image's true class, has an interval above 0, at the level shown: a choice needs a lean, a "
        "claim needs the report's 95%), or the validation split. The synthetic data is judged the same way on the "
        "labeled images kept from the generator (its samples carry what the images it learned from look like). "
        "The test split is read once, for the tables of this report.",
        [(["choice", "rule", "scores (%): accuracy / true-class p", "richer − simpler, true-class p (pts) [CI]",
           "rests on", "outcome"], _choice_rows(m))], [])


def _adaptations(m: Metrics) -> Section | None:
    """The adaptation candidates (lora.adaptations) side by side, when the choose stage compared several."""
    d = m.evaluation.selection.synthetic
    if d is None or not d.samples_by_adaptation:
        return None
    acc, score = d.oof_accuracy or {}, d.oof_score or {}
    rows = []
    for a, kept in d.samples_by_adaptation.items():
        mine = [o for o in acc if o.endswith(f" ({a})")]
        best = max(mine, key=lambda o: score.get(o, acc[o])) if mine else None
        cost = m.run.adapter.train_seconds if a == "lora" else 0.0 if a == "none" else \
            m.run.adaptation_seconds.get(a)
        rows.append([a, "—" if cost is None else f"{cost:.1f}", kept,
                     "—" if best is None else f"{_pct(acc[best])} / {_pct(score.get(best))}",
                     "—" if best is None else best.split(" (")[0],
                     ("the product's" if d.in_product else "the synthetic arms' (left out of the product)")
                     if a == d.adaptation else ""])
    return Section(
        "How the generator was adapted (labeled data only)",
        "Every listed adaptation generated the same seeds, went through the same filter, and was scored as the "
        "synthetic share is: classifiers trained on the labeled images the generator saw plus its kept samples, "
        f"scored on the {d.holdout} labeled images it never saw, {d.repeats} seeds each. `lora` fine-tunes the "
        "base on the labeled images; `textual_inversion` learns a token per class in the text encoders; `lora+ti` "
        "both at once; `none` samples the pretrained base from the class prompts alone. The best "
        f"one, {d.adaptation}, makes the synthetic arms' samples, and the product's when the synthetic data goes "
        f"in: {'it does' if d.in_product else 'it does not'} ({(d.reason or '').rstrip('.')}).",
        [(["adaptation", "fine-tuning (s)", "kept samples", "best held-out accuracy / true-class p (%)",
           "at", "taken by"], rows)], [])


def _pseudo(m: Metrics) -> Section:
    rows, head, text = _pseudo_table(m)
    return Section("Pseudo-labels", text, [(head, rows)], [])


def _arms(m: Metrics) -> Section:
    ev = m.evaluation
    rows = []
    for a, v in ev.arms.items():
        if not v.ran:
            rows.append([a, "skipped: " + (v.skipped or ""), "", "", ""])
            continue
        sizes = v.train_sizes or TrainSizes(real=0, synthetic=0)
        rows.append([a, _ci(v.accuracy), _ci(v.macro_f1), f"{sizes.real} / {sizes.synthetic}",
                     " ".join(_pct(x) for x in v.per_seed_accuracy)])
    return Section(
        "Downstream accuracy by arm",
        f"The same {model_words(m)} recipe trained on each arm, {len(m.run.evaluation_seeds)} seeds "
        f"each (paired across arms), scored on the real {ev.split} split. Accuracy and macro-F1 in %: mean ± std "
        "[95% CI].",
        [(["arm", "accuracy", "macro-F1", "train real / synthetic", "per-seed accuracy"], rows)],
        ["arms_accuracy", "arms_macro_f1"])


def _per_class(m: Metrics) -> Section:
    ev, arms = m.evaluation, m.evaluation.arms
    shown, deltas = key_arms(ev), ev.per_class_delta or {}
    rows = [[c] + [_pct(arms[a].per_class_accuracy[k]) for a in shown] +
            [f"{100 * deltas[b][k]:+.1f}" for b in deltas] for k, c in enumerate(m.data.class_names)]
    header = ["class"] + shown + [f"Δ vs {b}" for b in deltas]
    return Section("Per class", "Test accuracy per class (mean over seeds) and the change that synthetic data made.",
                   [(header, rows)], ["per_class", "confusion"])


def _generator(m: Metrics) -> Section:
    gen, flt = m.generation, m.filter
    reasons = sorted({r for pc in gen.per_class for r in pc.rejected})
    rows = [[pc.class_, pc.generated, pc.kept] + [pc.rejected.get(r, 0) for r in reasons]
            for pc in gen.per_class]
    rows.append(["all", gen.generated, gen.kept] +
                [sum(pc.rejected.get(r, 0) for pc in gen.per_class) for r in reasons])
    qc = flt.quality_classifier
    return Section(
        "What the generator and filter did",
        f"Quality classifier ({qc.kind}, trained on the real labeled train split only): validation accuracy "
        f"{_pct(qc.validation_accuracy)}% on {qc.validation_size} real images; a weak judge makes a weak "
        f"filter. Filter order: {' → '.join(flt.order)}. ALIA out-of-fold accuracy on train: "
        f"{_pct(flt.alia_oof_accuracy)}%.",
        [(["class", "generated", "kept"] + [f"rejected: {r}" for r in reasons], rows)],
        ["quality_hist", "grid_real", "grid_kept", "grid_rejected"])


def _ablation(m: Metrics) -> Section:
    ev, arms = m.evaluation, m.evaluation.arms
    product = ev.product_arm
    rows = [[name, _ci(v.accuracy), v.train_sizes.synthetic if v.train_sizes else ""]
            for name, v in ev.filter_ablation.items() if v.ran]
    unfiltered = ev.filter_gain.against if ev.filter_gain else "real+synthetic_unfiltered"
    filtered = ev.filter_gain.arm if ev.filter_gain else product
    for a, label in ((unfiltered, "no filter"), (filtered, "all, in order: " + " → ".join(m.filter.order))):
        if a and a in arms and arms[a].ran:
            rows.append([label, _ci(arms[a].accuracy), arms[a].train_sizes.synthetic])
    return Section("Filter ablation", "Downstream accuracy (%) when only one filter is applied, none, or all. "
                   + _ablation_seeds(ev, arms, product), [(["filters", "accuracy", "synthetic kept"], rows)], [])


def _memorization(m: Metrics) -> Section:
    rows = [[space, v.threshold_rule, f"{v.threshold:.4f}", _pct(v.kept_fraction_above),
             _pct(v.train_to_train_fraction_above),
             "n/a" if v.kept_median is None else f"{v.kept_median:.3f}",
             "n/a" if v.train_to_train_median is None else f"{v.train_to_train_median:.3f}"]
            for space, v in m.filter.memorization.items()]
    return Section(
        "Memorization",
        "Similarity of every kept synthetic image to its nearest real training image, against the same statistic "
        "between real training images (leave-one-out). Fractions in %.",
        [(["space", "threshold rule", "threshold", "kept above", "train-to-train above", "kept median",
           "train-to-train median"], rows)], ["memorization_hist", "nn_pairs"])


def _data(m: Metrics) -> Section:
    data = m.data
    test_rows = [[c, data.train_class_counts[k], data.validation_class_counts[k], data.test_class_counts[k]]
                 for k, c in enumerate(data.class_names)]
    ds_rows = [[s, v.rows, v.synthetic, v.pseudo_labeled, v.rows - v.synthetic - v.pseudo_labeled]
               for s, v in m.dataset.splits.items()]
    dup = data.duplicates_across_splits
    dup_rows = [[d.split, d.id, d.copy_of] for d in dup.examples]
    dup_text = ""
    if dup.count:
        dup_text = (f" **{dup.count} image(s) in a less protected split are identical to one in test or "
                    "validation** (your own split folders; the first are listed below): " +
                    ("they were removed from it (data.cross_split_duplicates: drop)." if dup.action == "drop" else
                     "they were left in place, so every arm's test accuracy may be inflated; set "
                     "data.cross_split_duplicates: drop to remove them."))
    skipped = data.skipped
    skip_text = "" if not skipped.count else (
        f" {skipped.count} entries of the data source were skipped (" +
        ", ".join(f"{why}: {n}" for why, n in skipped.reasons.items()) + "), e.g. " +
        ", ".join(skipped.examples[:5]) + f"; {RunFolder('').data.summary.as_posix()} lists the first 20.")
    return Section(
        "Data and test split",
        f"Test split: {data.test_size} real images, held out from fine-tuning, filtering and model selection. "
        f"Labeled train: {data.train_size}, validation: {data.validation_size}, unlabeled pool: "
        f"{data.pool_size}." + dup_text + skip_text,
        [(["class", "train", "validation", "test"], test_rows),
         (["published split", "rows", "synthetic", "pseudo-labeled", "real labeled"], ds_rows)]
        + ([(["split", "image", "identical to"], dup_rows)] if dup_rows else []), [])


def model_words(m: Metrics) -> str:
    """The downstream model in words: a CNN trained from scratch, or the pretrained encoder and its head."""
    c = m.run.classifiers.get("evaluation.model")
    if c is None or c.backbone is None:
        return m.evaluation.model + (" (trained from scratch)" if m.evaluation.model == "cnn" else "")
    if c.backbone == "base":
        return f"{c.head} head on the base model's own denoising features"
    return f"{c.backbone} encoder with a {c.head} head"


def backbone_words(backbone: str) -> str:
    """An encoder's backbone as the report names it (`base`: the run's own base, read as an encoder)."""
    return "the run's own base" if backbone == "base" else backbone


# What the run found, in the report's order (augment/report/facts.py adds what it cost and what it was).
CONTENT = (_verdict, _choices, _adaptations, _pseudo, _arms, _per_class, _generator, _ablation, _memorization, _data)


def _ablation_seeds(ev: Evaluation, arms: dict[str, ArmResult], product: str | None) -> str:
    n_diag = {len(v.per_seed_accuracy) for v in ev.filter_ablation.values() if v.ran}
    n_all = len(arms[product].per_seed_accuracy) if product in arms else 0
    if not n_diag or n_diag == {n_all}:
        return "Same seeds throughout."
    return (f"Single filters and no filter: the first {max(n_diag)} seeds (evaluation.diagnostic_seeds); all "
            f"filters: all {n_all} seeds, so compare intervals, not the last digit.")
