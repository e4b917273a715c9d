"""The report: metrics.json (stable schema), report.md and a self-contained report.html, built from a run folder.

`build_report(run_dir)` reads only what the stages wrote, so `augment report RUN_DIR` rebuilds it without
recomputing anything. Every number comes from the run's files.
"""

from __future__ import annotations

import base64
import hashlib
import html
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from augment.arms import Arm, Verdict, adds_label, arm_plus, has_part
from augment.configfile import parse_config
from augment.data import Splits
from augment.generate import load_candidates
from augment import plots
from augment.run import RunFolder, read_json, write_json, write_text

SCHEMA_VERSION = 1


def _read(p: Path):
    if not p.exists():
        raise FileNotFoundError(f"{p} is missing: is {p.parent} part of a finished augment run folder?")
    return json.loads(p.read_text())


def _finite(x):
    """JSON has no NaN: intervals that cannot be computed (one seed) become null."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_finite(v) for v in x]
    return x


def memorization_stats(sims: np.ndarray, reference: np.ndarray, threshold: float) -> dict:
    sims, reference = np.asarray(sims, float), np.asarray(reference, float)
    return {
        "threshold": float(threshold),
        "kept_fraction_above": float((sims > threshold).mean()) if len(sims) else None,
        "kept_median": float(np.median(sims)) if len(sims) else None,
        "train_to_train_median": float(np.median(reference)) if len(reference) else None,
        "train_to_train_fraction_above": float((reference > threshold).mean()) if len(reference) else None,
    }


def collect_metrics(run: Path) -> dict:
    """Assemble metrics.json from the run folder."""
    from augment.generate import sampling_precision

    rf = RunFolder(run)
    cfg = parse_config(yaml.safe_load(rf.config.read_text()), str(rf.config))
    data = _read(rf.data.summary)
    decisions = _read(rf.filter.decisions)
    fsum = _read(rf.filter.summary)
    evaluation = _read(rf.evaluation.summary)
    runinfo = _read(rf.info)
    publish_info = _read(rf.dataset.record)
    table = pd.read_parquet(rf.filter.scores)
    kept = table[table["kept"]]
    space = fsum["memorization_space"]
    other = "features" if space == "pixels" else "pixels"
    ref_other = np.asarray(fsum[f"train_nn_similarity_{other}"])
    mem = {
        space: memorization_stats(kept[f"nn_similarity_{space}"], fsum[f"train_nn_similarity_{space}"],
                                  cfg.filter.max_similarity),
        other: memorization_stats(kept[f"nn_similarity_{other}"], ref_other,
                                  float(np.quantile(ref_other, 0.95)) if len(ref_other) else 1.0),
    }
    mem[other]["threshold_rule"] = "95th percentile of train-to-train nearest-neighbour similarity"
    mem[space]["threshold_rule"] = "filter.max_similarity (the memorization gate)"
    ablation = {f: v for k, v in evaluation["arms"].items() if (f := Arm.of(k).filter) is not None}
    pseudo = _read(rf.pseudo.summary) if rf.pseudo.summary.exists() else None
    gain = evaluation.get("gain_over_best_baseline")
    return _finite({
        "schema_version": SCHEMA_VERSION,
        "run": {"name": cfg.name, "output_dir": str(run), "config_hash": cfg.fingerprint(),
                "stage_seconds": {k: v.get("seconds") for k, v in runinfo["stages"].items()},
                "total_seconds": runinfo.get("total_seconds"), "versions": runinfo.get("versions", {}),
                "cpu": runinfo.get("cpu"),
                "base_model": runinfo.get("base", {}), "adapter": runinfo.get("adapter", {}),
                "evaluation_seeds": evaluation["seeds"]},
        "data": data,
        "generation": {"generated": decisions["generated"], "kept": decisions["kept"],
                       "per_class": decisions["per_class"], "scheduler": cfg.generation.scheduler,
                       "num_inference_steps": cfg.generation.num_inference_steps,
                       "precision": sampling_precision(run, cfg),
                       "guidance_scale": cfg.generation.guidance_scale, "strengths": cfg.generation.strengths},
        "filter": {"order": decisions["order"], "quality_classifier": fsum["quality_classifier"],
                   "alia_thresholds": fsum["alia_thresholds"], "alia_oof_accuracy": fsum["alia_oof_accuracy"],
                   "memorization": mem},
        "evaluation": {
            "model": cfg.evaluation.model.kind,
            "synthetic_prob": ((evaluation.get("selection") or {}).get("synthetic") or {}).get(
                "synthetic_prob", cfg.evaluation.synthetic_prob[0]),
            "split": cfg.evaluation.split,
            "arms": {k: v for k, v in evaluation["arms"].items() if Arm.of(k).filter is None},
            "product_arm": evaluation.get("product_arm"), "recipe": evaluation.get("recipe"),
            "product_recipe": evaluation.get("product_recipe"), "selection": evaluation.get("selection", {}),
            "baselines": evaluation.get("baselines", []), "best_baseline": evaluation.get("best_baseline"),
            "gains": evaluation.get("gains"), "synthetic_adds": evaluation.get("synthetic_adds", {}),
            "per_class_delta": evaluation.get("per_class_delta"),
            "filter_gain": evaluation.get("filter_gain"), "filter_ablation": ablation,
        },
        "pseudo": None if pseudo is None else {k: pseudo.get(k) for k in (
            "rule", "threshold", "count", "pool_size", "per_class", "thresholds", "validation_accuracy",
            "min_precision", "reason", "per_class_amount", "labeled_images", "folds", "repeats",
            "labeler_oof_accuracy", "labeler_oof_per_class")},
        "product_arm": evaluation.get("product_arm"),
        "gain_over_best_baseline": (None if gain is None else
                                    {k: gain[k] for k in ("mean", "ci_low", "ci_high", "std", "n", "p_value",
                                                          "verdict", "differences")}
                                    | {"baseline": evaluation.get("best_baseline"),
                                       "product_arm": evaluation.get("product_arm")}),
        "dataset": {"path": str(rf.dataset.path), "splits": publish_info["splits"]},
    })


# Rendering ----------------------------------------------------------------------------------------------------


def _selection_rows(m: dict) -> tuple[list, list, list, str]:
    """The choice table (recipe, pseudo) and the pseudo-label table and text, for either selection rule."""
    ev, data = m["evaluation"], m["data"]
    sel = ev.get("selection") or {}
    rows = []
    for name, what in (("recipe", "classic augmentation"), ("pseudo", "pseudo-labeled pool"),
                       ("synthetic", "synthetic data")):
        d = sel.get(name)
        if not d:
            continue
        if "skipped" in d:
            rows.append([what, "cross-validation", "—", "—", "—", f"skipped: {d['skipped']}"])
        elif "oof_accuracy" in d:  # cross-validated
            diff, score = d.get("difference"), d.get("oof_score") or {}
            scores = ", ".join(f"{o} {_pct(v)}" + (f" / {_pct(score[o])}" if o in score else "")
                               for o, v in d["oof_accuracy"].items())
            interval = "—" if diff is None else (f"{100 * diff['mean']:+.1f} [{100 * diff['ci_low']:+.1f}, "
                                                 f"{100 * diff['ci_high']:+.1f}] "
                                                 f"({100 * diff.get('confidence', 0.95):.0f}%)")
            outcome = (d["chosen"] if name == "recipe" else
                       ("in the recipe" if d["in_recipe"] else "left out") if name == "pseudo" else
                       f"in the product at p={d['synthetic_prob']:g}" if d["in_product"] else "left out")
            if d["rule"] not in ("cross_validation",):
                outcome += " (set)"
            elif diff is not None:
                outcome += " (decided by the data)" if d["decided"] else " (the data cannot decide: simpler)"
            rests = (f"{d['images']} labeled images the generator never saw x {d['repeats']} seeds"
                     if name == "synthetic" else f"{d['images']} images, {d['folds']} folds x {d['repeats']}")
            rule = ("held-out labeled images" if name == "synthetic" else "cross-validation"
                    ) if d["rule"] == "cross_validation" else f"set: {d['rule']}"
            rows.append([what, rule, scores, interval, rests, outcome])
        elif name == "recipe":
            va = d["validation_accuracy"]
            rows.append([what, f"validation: {d['rule']}", f"real {_pct(va.get('real'))}, real+classic "
                         f"{_pct(va.get('real+classic'))}", "—",
                         f"{data.get('validation_size', 0)} validation images", d["chosen"]])
        else:
            rows.append([what, "validation: kept if it raises accuracy",
                         f"without {_pct(d['validation_accuracy_without'])}, with "
                         f"{_pct(d['validation_accuracy_with'])}", "—",
                         f"{data.get('validation_size', 0)} validation images",
                         "in the recipe" if d["in_recipe"] else "left out"])
    ps = m.get("pseudo") or {}
    if not ps:
        return rows, [], [], "No pseudo-labeling stage in this run."
    if ps.get("rule") == "cross_validation":
        chosen = ps.get("per_class_amount")
        oof = (sel.get("pseudo") or {}).get("per_class_oof_accuracy") or {}
        p_true = (sel.get("pseudo") or {}).get("per_class_oof_score") or {}
        head = ["pool images per class", "out-of-fold accuracy (%)", "out-of-fold true-class p (%)", ""]
        table = [[k, _pct(v), _pct(p_true.get(k)), "chosen" if str(chosen) == k else ""] for k, v in oof.items()]
        text = ("No pseudo-labels: " + ps["reason"] + "." if ps.get("reason") else
                f"On each of {ps.get('folds')} folds a pseudo-labeler trained without the held-out images labeled "
                f"the pool, and the downstream classifier trained on the fold plus each class's most confident pool "
                f"images (the same number for every class) scored the held-out images (the probability it gave "
                f"their true class decides). The best number, "
                f"{chosen} per class, labels {ps.get('count')} of {ps.get('pool_size')} pool images (per class: "
                f"{ps.get('per_class')}), with the labeler trained on all {ps.get('labeled_images')} labeled "
                f"images, whose own out-of-fold accuracy is {_pct(ps.get('labeler_oof_accuracy'))}%. These images "
                "also trained the generator when lora.use_pseudo_labeled is on.")
        return rows, table, head, text
    head = ["threshold", "validation images above", "precision (%)", "coverage (%)", "meets rule", ""]
    table = [[t["threshold"], t["validation_support"], _pct(t["validation_precision"]),
              _pct(t["validation_coverage"]), "✓" if t["meets_rule"] else "",
              "chosen" if t["threshold"] == ps.get("threshold") else ""] for t in ps.get("thresholds") or []]
    text = ("No pseudo-labels: " + ps["reason"] + "." if ps.get("reason") else
            f"A classifier trained on the labeled train split only labeled the unlabeled pool; the threshold is "
            f"the lowest whose confident validation predictions are at least {_pct(ps.get('min_precision'))}% "
            f"accurate: {ps.get('threshold')}, which labels {ps.get('count')} of {ps.get('pool_size')} pool "
            f"images (per class: {ps.get('per_class')}). These images also trained the generator when "
            "lora.use_pseudo_labeled is on.")
    return rows, table, head, text


def _pct(x) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}"


def _ci(s: dict) -> str:
    if s.get("ci_low") is None:
        return f"{_pct(s['mean'])}"
    return f"{_pct(s['mean'])} ± {_pct(s['std'])} [{_pct(s['ci_low'])}, {_pct(s['ci_high'])}]"


def _md_table(header: list[str], rows: list[list]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def _html_table(header: list[str], rows: list[list]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f"<div class='scroll'><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>"


def headline(m: dict) -> str:
    g = m.get("gain_over_best_baseline")
    ev = m["evaluation"]
    arms, product = ev["arms"], ev.get("product_arm")
    if g is None or product not in arms or "accuracy" not in arms[product]:
        return "No comparison of synthetic data against a baseline was run."
    b = g["baseline"]
    interval = ("" if g["ci_low"] is None else
                f", 95% CI [{100 * g['ci_low']:+.1f}, {100 * g['ci_high']:+.1f}]")
    recipe = ev.get("product_recipe") or "real"
    rule = ((ev.get("selection") or {}).get("recipe") or {}).get("rule")
    how = ("chosen on labeled data by cross-validation" if rule == "cross_validation" else
           f"set by evaluation.recipe={rule}" if rule in ("classic", "none") else "chosen on validation")
    if not Arm.of(product).synthetic:  # the choose stage left the synthetic data out
        syn = (ev.get("selection") or {}).get("synthetic") or {}
        label = adds_label(recipe)
        adds = (ev.get("synthetic_adds") or {}).get(label, {}).get("accuracy")
        without = (f"On the {syn.get('images')} labeled images the generator never saw, the synthetic data could "
                   f"not show that it helps, so the product is your recipe alone ({recipe}; {how})")
        against = ("it is the best baseline" if b == product else
                   f"against {_pct(arms[b]['accuracy']['mean'])}% for the best baseline ({b}): a paired difference "
                   f"of {100 * g['mean']:+.1f} points over {g['n']} seeds{interval}: **{g['verdict']}**")
        diag = "" if not adds else (
            f" With the synthetic data ({arm_plus(recipe, 'synthetic')}, a diagnostic): {100 * adds['mean']:+.1f} "
            f"points" + ("" if adds["ci_low"] is None else
                         f", 95% CI [{100 * adds['ci_low']:+.1f}, {100 * adds['ci_high']:+.1f}]") +
            f": {adds['verdict']}.")
        return f"{without}: {_pct(arms[product]['accuracy']['mean'])}% {ev['split']} accuracy; {against}.{diag}"
    return (f"Your recipe plus synthetic data ({product}; recipe {recipe} {how}) reached "
            f"{_pct(arms[product]['accuracy']['mean'])}% {ev['split']} accuracy against "
            f"{_pct(arms[b]['accuracy']['mean'])}% for the best baseline ({b}): a paired difference of "
            f"{100 * g['mean']:+.1f} points over {g['n']} seeds{interval}: **{g['verdict']}**.")


def key_arms(ev: dict) -> list[str]:
    """The arms shown per class: real, real+classic, the best baseline and the product (each once, if run)."""
    names = dict.fromkeys(("real", "real+classic", ev.get("best_baseline"), ev.get("product_arm")))
    return [a for a in names if a and "per_class_accuracy" in ev["arms"].get(a, {})]


def next_step(m: dict) -> str:
    """One line under the verdict: what a team should do with this result."""
    g = m.get("gain_over_best_baseline")
    if g is None:
        return ""
    ds = m["dataset"]["path"]
    if not Arm.of(g["product_arm"] or "synthetic").synthetic:
        rows = m["dataset"]["splits"]["train"]
        with_pool = has_part(g["product_arm"], "pseudo") and rows.get("pseudo_labeled")
        keep = "the real and pseudo-labeled rows" if with_pool else "the real rows"
        return (f"Next: train on {keep} of `{ds}` (is_synthetic false) with your recipe. The synthetic rows are "
                "published beside them (is_synthetic true) for inspection; the tables below show what they did.")
    if g["verdict"] == Verdict.GAIN:
        return f"Next: train on `{ds}` (train split) with your usual recipe; the gain above is what to expect."
    if g["verdict"] == Verdict.LOSS:
        rows = m["dataset"]["splits"]["train"]
        keep = ("the rows with is_synthetic false (real and pseudo-labeled)" if has_part(g["baseline"], "pseudo") and
                rows.get("pseudo_labeled") else "the rows with is_synthetic false")
        return (f"Next: train on {g['baseline']}: from `{ds}`, take {keep}. Look at the per-class table and the "
                "rejected samples below to see where the generator falls short.")
    return ("Next: the difference is within noise. Raise evaluation.seeds for a tighter interval, or keep "
            f"{g['baseline']}, which costs less.")


def sections(m: dict) -> list[tuple[str, str, list[tuple[list[str], list[list]]], list[str]]]:
    """(title, text, tables, figure names) per section; both renderers walk this list."""
    ev, data, gen, flt = m["evaluation"], m["data"], m["generation"], m["filter"]
    names = data["class_names"]
    arms = ev["arms"]
    arm_rows = []
    for a, v in arms.items():
        if "accuracy" not in v:
            arm_rows.append([a, "skipped: " + v.get("skipped", ""), "", "", ""])
            continue
        sizes = v.get("train_sizes") or {}
        arm_rows.append([a, _ci(v["accuracy"]), _ci(v["macro_f1"]), f"{sizes.get('real', 0)} / {sizes.get('synthetic', 0)}",
                         " ".join(_pct(x) for x in v["per_seed_accuracy"])])
    product = ev.get("product_arm")

    n_seeds = len(m["run"]["evaluation_seeds"])

    def gain_row(label: str, d: dict, f1: dict | None) -> list:
        n = len(d.get("differences") or [])
        if 0 < n < n_seeds:  # a diagnostic arm, trained on the first evaluation.diagnostic_seeds seeds
            label += f" [diagnostic: {n} of {n_seeds} seeds]"
        return [label, f"{100 * d['mean']:+.1f}",
                "n/a" if d["ci_low"] is None else f"[{100 * d['ci_low']:+.1f}, {100 * d['ci_high']:+.1f}]",
                "n/a" if d["p_value"] is None else f"{d['p_value']:.3g}", d["verdict"],
                "" if f1 is None else f"{100 * f1['mean']:+.1f}"]

    gain_rows = [gain_row(f"{product} − {b}" + (" (best baseline)" if b == ev.get("best_baseline") else ""),
                          d["accuracy"], d["macro_f1"]) for b, d in (ev.get("gains") or {}).items()]
    adds = ev.get("synthetic_adds") or {}
    for b in ev.get("baselines") or []:
        label = adds_label(b)
        if label in adds and arm_plus(b, "synthetic") != product:  # the product's own pair is a row above
            gain_rows.append(gain_row(f"{label} (what synthetic data adds)", adds[label]["accuracy"],
                                      adds[label]["macro_f1"]))
    if ev.get("filter_gain"):
        fg = ev["filter_gain"]
        gain_rows.append(gain_row(f"{fg.get('arm', product)} − {fg.get('against', 'unfiltered')} (what the filter is "
                                  "worth)",
                                  fg, None))
    pc_arms = key_arms(ev)
    pc_rows = [[c] + [_pct(arms[a]["per_class_accuracy"][k]) for a in pc_arms] +
               [f"{100 * ev['per_class_delta'][b][k]:+.1f}" for b in (ev.get("per_class_delta") or {})]
               for k, c in enumerate(names)]
    pc_header = ["class"] + pc_arms + [f"Δ vs {b}" for b in (ev.get("per_class_delta") or {})]
    reasons = sorted({r for pc in gen["per_class"] for r in pc["rejected"]})
    filt_rows = [[pc["class"], pc["generated"], pc["kept"]] + [pc["rejected"].get(r, 0) for r in reasons]
                 for pc in gen["per_class"]]
    filt_rows.append(["all", gen["generated"], gen["kept"]] +
                     [sum(pc["rejected"].get(r, 0) for pc in gen["per_class"]) for r in reasons])
    abl_rows = [[name, _ci(v["accuracy"]), v["train_sizes"]["synthetic"] if v.get("train_sizes") else ""]
                for name, v in ev["filter_ablation"].items() if "accuracy" in v]
    unfiltered = (ev.get("filter_gain") or {}).get("against", "real+synthetic_unfiltered")
    filtered = (ev.get("filter_gain") or {}).get("arm", product)
    for a, label in ((unfiltered, "no filter"), (filtered, "all, in order: " + " → ".join(flt["order"]))):
        if a and "accuracy" in arms.get(a, {}):
            abl_rows.append([label, _ci(arms[a]["accuracy"]), arms[a]["train_sizes"]["synthetic"]])
    mem_rows = [[space, v["threshold_rule"], f"{v['threshold']:.4f}", _pct(v["kept_fraction_above"]),
                 _pct(v["train_to_train_fraction_above"]),
                 "n/a" if v["kept_median"] is None else f"{v['kept_median']:.3f}",
                 "n/a" if v["train_to_train_median"] is None else f"{v['train_to_train_median']:.3f}"]
                for space, v in flt["memorization"].items()]
    qc = flt["quality_classifier"]
    test_rows = [[c, data["train_class_counts"][k], data["validation_class_counts"][k], data["test_class_counts"][k]]
                 for k, c in enumerate(names)]
    run = m["run"]
    facts = [["config hash", run["config_hash"]],
             ["base model", f"{run['base_model'].get('description', '')} ({run['base_model'].get('kind', 'pixel')} "
                            "backend)"],
             ["base fingerprint", run["base_model"].get("fingerprint", "")],
             ["adapter hash", run["adapter"].get("adapter_hash", "")],
             ["data fingerprint", data["fingerprint"]], ["evaluation seeds", ", ".join(map(str, run["evaluation_seeds"]))],
             ["sampler", f"{gen['scheduler']}, {gen['num_inference_steps']} steps, {gen.get('precision', 'fp32')}, "
                         f"guidance {gen['guidance_scale']}, "
                         f"strengths {gen['strengths']}"],
             ["downstream model", f"{ev['model']}, synthetic share per batch {ev['synthetic_prob']}"]]
    facts += [[f"{k} version", v] for k, v in run["versions"].items()]
    if run.get("cpu"):
        facts.append(["CPU", run["cpu"]])
    facts += [[f"stage {k} (s)", f"{v:.1f}"] for k, v in run["stage_seconds"].items() if v is not None]
    if run.get("total_seconds"):
        facts.append(["total wall time (s)", f"{run['total_seconds']:.1f}"])
    ds_rows = [[s, v["rows"], v["synthetic"], v.get("pseudo_labeled", 0),
                v["rows"] - v["synthetic"] - v.get("pseudo_labeled", 0)] for s, v in m["dataset"]["splits"].items()]
    sel_rows, ps_rows, ps_head, ps_text = _selection_rows(m)
    verdict = headline(m) + (" " + next_step(m) if next_step(m) else "")
    dup = data.get("duplicates_across_splits") or {}
    dup_rows = [[d["split"], d["id"], d["copy_of"]] for d in dup.get("examples", [])]
    dup_text = ""
    if dup.get("count"):
        dup_text = (f" **{dup['count']} image(s) in a less protected split are identical to one in test or "
                    "validation** (your own split folders; the first are listed below): " +
                    ("they were removed from it (data.cross_split_duplicates: drop)." if dup["action"] == "drop" else
                     "they were left in place, so every arm's test accuracy may be inflated; set "
                     "data.cross_split_duplicates: drop to remove them."))
    skipped = data.get("skipped") or {}
    skip_text = "" if not skipped.get("count") else (
        f" {skipped['count']} entries of the data source were skipped (" +
        ", ".join(f"{why}: {n}" for why, n in skipped["reasons"].items()) + "), e.g. " +
        ", ".join(skipped["examples"][:5]) + f"; {RunFolder('').data.summary.as_posix()} lists the first 20.")
    return [
        ("Verdict", verdict, [(["comparison", "Δ accuracy (pts)", "95% CI", "p", "verdict", "Δ macro-F1 (pts)"],
                               gain_rows)], []),
        ("How the recipe was chosen (labeled data only)",
         f"The product arm is your recipe plus the synthetic data, when it helps on labeled images the generator "
         f"never saw: "
         f"{ev.get('product_arm')}. Every choice below "
         "reads labeled data only: out-of-fold scores of every labeled train image (cross-validation; the richer "
         "option wins only when its paired advantage over the simpler one, in the probability the fold's classifier "
         "gives each image's true class, has an interval above 0, at the level shown: a choice needs a lean, a "
         "claim needs the report's 95%), or the validation split. The synthetic data is judged the same way on the "
         "labeled images kept from the generator (its samples carry what the images it learned from look like). "
         "The test split is read once, for the tables of this report.",
         [(["choice", "rule", "scores (%): accuracy / true-class p", "richer − simpler, true-class p (pts) [CI]",
            "rests on", "outcome"], sel_rows)],
         []),
        ("Pseudo-labels", ps_text, [(ps_head, ps_rows)], []),
        ("Downstream accuracy by arm",
         f"The same {ev['model']} recipe trained from scratch on each arm, {len(run['evaluation_seeds'])} seeds each "
         f"(paired across arms), scored on the real {ev['split']} split. Accuracy and macro-F1 in %: mean ± std "
         "[95% CI].",
         [(["arm", "accuracy", "macro-F1", "train real / synthetic", "per-seed accuracy"], arm_rows)],
         ["arms_accuracy", "arms_macro_f1"]),
        ("Per class", "Test accuracy per class (mean over seeds) and the change that synthetic data made.",
         [(pc_header, pc_rows)], ["per_class", "confusion"]),
        ("What the generator and filter did",
         f"Quality classifier ({qc['kind']}, trained on the real labeled train split only): validation accuracy "
         f"{_pct(qc['validation_accuracy'])}% on {qc['validation_size']} real images; a weak judge makes a weak "
         f"filter. Filter order: {' → '.join(flt['order'])}. ALIA out-of-fold accuracy on train: "
         f"{_pct(flt['alia_oof_accuracy'])}%.",
         [(["class", "generated", "kept"] + [f"rejected: {r}" for r in reasons], filt_rows)],
         ["quality_hist", "grid_real", "grid_kept", "grid_rejected"]),
        ("Filter ablation", "Downstream accuracy (%) when only one filter is applied, none, or all. "
         + _ablation_seeds(ev, arms, product),
         [(["filters", "accuracy", "synthetic kept"], abl_rows)], []),
        ("Memorization",
         "Similarity of every kept synthetic image to its nearest real training image, against the same statistic "
         "between real training images (leave-one-out). Fractions in %.",
         [(["space", "threshold rule", "threshold", "kept above", "train-to-train above", "kept median",
            "train-to-train median"], mem_rows)], ["memorization_hist", "nn_pairs"]),
        ("Data and test split",
         f"Test split: {data['test_size']} real images, held out from fine-tuning, filtering and model selection. "
         f"Labeled train: {data['train_size']}, validation: {data['validation_size']}, unlabeled pool: "
         f"{data['pool_size']}." + dup_text + skip_text,
         [(["class", "train", "validation", "test"], test_rows),
          (["published split", "rows", "synthetic", "pseudo-labeled", "real labeled"], ds_rows)]
         + ([(["split", "image", "identical to"], dup_rows)] if dup_rows else []), []),
        ("Run facts", "", [(["fact", "value"], facts)], []),
    ]


def figures(run: Path, m: dict) -> dict[str, bytes]:
    rf = RunFolder(run)
    splits = Splits.load(rf.data.splits)
    cands = load_candidates(rf.candidates.path)
    table = pd.read_parquet(rf.filter.scores)
    fsum = _read(rf.filter.summary)
    arms, names = m["evaluation"]["arms"], m["data"]["class_names"]
    shown = {a: v for a, v in arms.items() if "accuracy" in v}
    figs = {}
    if shown:
        split = m["evaluation"]["split"]
        figs["arms_accuracy"] = plots.arms_plot(shown, "accuracy", split)
        figs["arms_macro_f1"] = plots.arms_plot(shown, "macro_f1", split)
        which = key_arms(m["evaluation"])
        figs["per_class"] = plots.per_class_plot(shown, names, which, split)
        figs["confusion"] = plots.confusion_plot({a: shown[a]["confusion"] for a in which if a in shown}, names)
    kept = table["kept"].to_numpy()
    figs["quality_hist"] = plots.histogram_plot(
        {"kept": table.loc[kept, "p_intended"].to_numpy(), "rejected": table.loc[~kept, "p_intended"].to_numpy()},
        "quality score p(intended class)")
    space = fsum["memorization_space"]
    figs["memorization_hist"] = plots.histogram_plot(
        {"kept synthetic → nearest train": table.loc[kept, f"nn_similarity_{space}"].to_numpy(),
         "train → nearest other train": np.asarray(fsum[f"train_nn_similarity_{space}"])},
        f"cosine similarity ({space})", threshold=m["filter"]["memorization"][space]["threshold"])
    rng = np.random.default_rng(0)  # which examples are shown; fixed so a rebuilt report is identical
    real_rows, kept_rows, rej_rows = [], [], []
    for k, c in enumerate(names):
        r = np.flatnonzero(splits.train.labels == k)[:10]
        real_rows.append((c, splits.train.images[r], None))
        kk = np.flatnonzero(kept & (table["label"].to_numpy() == k))
        kk = np.sort(rng.choice(kk, min(10, len(kk)), replace=False)) if len(kk) else kk
        kept_rows.append((c, cands.images[kk], None))
        rr = np.flatnonzero(~kept & (table["label"].to_numpy() == k))
        rr = np.sort(rng.choice(rr, min(10, len(rr)), replace=False)) if len(rr) else rr
        rej_rows.append((c, cands.images[rr], [str(x).replace("_", " ") for x in table["reason"].to_numpy()[rr]]))
    figs["grid_real"] = plots.image_grid(real_rows)
    figs["grid_kept"] = plots.image_grid(kept_rows)
    if any(len(r[1]) for r in rej_rows):  # nothing rejected: no grid of empty rows
        figs["grid_rejected"] = plots.image_grid(rej_rows)
    top = table[kept].nlargest(10, "nn_similarity")
    index = {i: n for n, i in enumerate(splits.train.ids)}
    pairs = [("synthetic", cands.images[top.index.to_numpy()], [f"{s:.3f}" for s in top["nn_similarity"]]),
             ("nearest real", splits.train.images[[index[i] for i in top["nn_train_id"]]] if len(top) else
              splits.train.images[:0], None)]
    figs["nn_pairs"] = plots.image_grid(pairs, cell=72)
    return figs


CAPTIONS = {
    "arms_accuracy": "Accuracy per arm", "arms_macro_f1": "Macro-F1 per arm",
    "per_class": "Per-class accuracy", "confusion": "Confusion matrices (summed over seeds, row-normalized)",
    "quality_hist": "Quality scores, kept vs rejected", "grid_real": "Real labeled training images, per class",
    "grid_kept": "Kept synthetic images, per class", "grid_rejected": "Rejected synthetic images, with the reason",
    "memorization_hist": "Nearest-real-neighbour similarity",
    "nn_pairs": "Kept synthetic images most similar to a training image (top) and that image (bottom)",
}

CSS = """body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:1000px;margin:2em auto;
padding:0 1em;color:#222;line-height:1.45}h1{margin-bottom:.2em}h2{border-bottom:1px solid #ddd;padding-bottom:.2em;
margin-top:1.8em}table{border-collapse:collapse;margin:.8em 0;font-size:.9em}th,td{border:1px solid #ddd;
padding:.3em .6em;text-align:right}th{background:#f5f5f5}td:first-child,th:first-child{text-align:left}
figure{margin:1em 0}figcaption{font-size:.85em;color:#555}img{max-width:100%}.verdict{font-size:1.15em;
background:#f4f8f4;border-left:4px solid #2ca02c;padding:.7em 1em}.verdict.loss{background:#fbf3f3;
border-left-color:#d62728}.verdict.none{background:#f6f6f6;border-left-color:#888}.muted{color:#777;font-size:.85em;
overflow-wrap:anywhere}.scroll{overflow-x:auto;-webkit-overflow-scrolling:touch}
@media (max-width:600px){body{margin:1em auto;padding:0 .6em;font-size:15px}table{font-size:.78em}
th,td{padding:.25em .4em}.verdict{font-size:1.05em;padding:.6em .7em}h2{font-size:1.25em}}"""


def render(m: dict, figs: dict[str, bytes]) -> tuple[str, str]:
    secs = sections(m)
    verdict = (m.get("gain_over_best_baseline") or {}).get("verdict")
    tone = {Verdict.GAIN: "gain", Verdict.LOSS: "loss"}.get(verdict, "none")
    md = [f"# augment report: {m['run']['name']}", ""]
    body = [f"<h1>augment report: {html.escape(m['run']['name'])}</h1>",
            f"<p class='muted'>run folder {html.escape(m['run']['output_dir'])} · config {m['run']['config_hash']}</p>"]
    for title, text, tables, fig_names in secs:
        md += [f"## {title}", "", text, ""] if text else [f"## {title}", ""]
        body.append(f"<h2>{html.escape(title)}</h2>")
        if text:
            t = html.escape(text).replace("**", "")
            body.append(f"<p class='verdict {tone}'>{t}</p>" if title == "Verdict" else f"<p>{t}</p>")
        for header, rows in tables:
            if rows:
                md += [_md_table(header, rows), ""]
                body.append(_html_table(header, rows))
        for f in fig_names:
            if f in figs:
                md += [f"![{CAPTIONS[f]}]({RunFolder('').figure(f).as_posix()})", ""]
                b64 = base64.b64encode(figs[f]).decode()
                body.append(f"<figure><img alt='{CAPTIONS[f]}' src='data:image/png;base64,{b64}'>"
                            f"<figcaption>{CAPTIONS[f]}</figcaption></figure>")
    page = (f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>augment report: "
            f"{html.escape(m['run']['name'])}</title>"
            "<meta name='viewport' content='width=device-width, initial-scale=1'>"
            f"<style>{CSS}</style></head><body>{''.join(body)}</body></html>")
    return "\n".join(md), page


def build_report(run_dir: str | Path) -> dict:
    """Write metrics.json, report.md (+ report_assets/) and report.html into the run folder; return the metrics."""
    run = Path(run_dir)
    rf = RunFolder(run)
    m = collect_metrics(run)
    figs = _reused_figures(run, m)
    if figs is None:
        figs = figures(run, m)
        rf.report_assets.mkdir(exist_ok=True)
        for name, png in figs.items():
            rf.figure(name).write_bytes(png)
        write_json(rf.figures, {"key": _figures_key(run, m), "names": sorted(figs)})
    md, page = render(m, figs)
    for path, text in ((rf.metrics, json.dumps(m, indent=2)), (rf.report_md, md), (rf.report_html, page)):
        write_text(path, text)
    return m


def _ablation_seeds(ev: dict, arms: dict, product: str | None) -> str:
    n_diag = {len(v["per_seed_accuracy"]) for v in ev["filter_ablation"].values() if "per_seed_accuracy" in v}
    n_all = len(arms.get(product, {}).get("per_seed_accuracy", [])) if product else 0
    if not n_diag or n_diag == {n_all}:
        return "Same seeds throughout."
    return (f"Single filters and no filter: the first {max(n_diag)} seeds (evaluation.diagnostic_seeds); all "
            f"filters: all {n_all} seeds, so compare intervals, not the last digit.")


FIGURES_VERSION = 3  # bump when the figures' drawing changes, so that reports of earlier runs redraw them


def _figures_key(run: Path, m: dict) -> str:
    """What the figures show: every metric but the run's timings, and the filtered candidates they sample."""
    shown = {k: v for k, v in m.items() if k != "run"}
    filt = (read_json(RunFolder(run).filter.stage) or {}).get("key", "")
    return hashlib.sha256(json.dumps([shown, filt, FIGURES_VERSION], sort_keys=True,
                                     default=str).encode()).hexdigest()[:16]


def _reused_figures(run: Path, m: dict) -> dict[str, bytes] | None:
    """The figures of the last build when nothing they show has changed (rendering them is most of a rebuild)."""
    rf = RunFolder(run)
    done = read_json(rf.figures) or {}
    if done.get("key") != _figures_key(run, m):
        return None
    try:
        return {name: rf.figure(name).read_bytes() for name in done["names"]}
    except (OSError, KeyError):
        return None

