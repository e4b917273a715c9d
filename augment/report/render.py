"""The report's files: report.md (figures under report_assets/), a self-contained report.html and metrics.json,
built from a run folder.

`build_report(run_dir)` reads only what the stages wrote, so `augment report RUN_DIR` rebuilds it without
recomputing anything. Every number comes from the run's files.
"""

from __future__ import annotations

import base64
import hashlib
import html
import json
from pathlib import Path

import numpy as np
import pandas as pd

from augment.arms import Verdict
from augment.data import Splits
from augment.generate import load_candidates
from augment.report import plots
from augment.report.metrics import collect_metrics, read_record
from augment.report.schema import Metrics, validate_metrics
from augment.results import FilterScores
from augment.report.facts import sections
from augment.report.sections import key_arms
from augment.runfolder import RunFolder, read_json, write_json, write_text

def _md_table(header: list[str], rows: list[list]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def _html_table(header: list[str], rows: list[list]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f"<div class='scroll'><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>"


def figures(run: Path, m: Metrics) -> dict[str, bytes]:
    rf = RunFolder(run)
    splits = Splits.load(rf.data.splits)
    cands = load_candidates(rf.candidates.path)
    table = pd.read_parquet(rf.filter.scores)
    fsum = read_record(rf.filter.summary, FilterScores)
    arms, names = m.evaluation.arms, m.data.class_names
    shown = {a: v for a, v in arms.items() if v.ran}
    figs = {}
    if shown:
        split = m.evaluation.split
        figs["arms_accuracy"] = plots.arms_plot(shown, "accuracy", split)
        figs["arms_macro_f1"] = plots.arms_plot(shown, "macro_f1", split)
        which = key_arms(m.evaluation)
        figs["per_class"] = plots.per_class_plot({a: shown[a].per_class_accuracy for a in which}, names, split)
        figs["confusion"] = plots.confusion_plot({a: shown[a].confusion for a in which}, names)
    kept = table["kept"].to_numpy()
    figs["quality_hist"] = plots.histogram_plot(
        {"kept": table.loc[kept, "p_intended"].to_numpy(), "rejected": table.loc[~kept, "p_intended"].to_numpy()},
        "quality score p(intended class)")
    space = fsum.memorization_space
    figs["memorization_hist"] = plots.histogram_plot(
        {"kept synthetic → nearest train": table.loc[kept, f"nn_similarity_{space}"].to_numpy(),
         "train → nearest other train": np.asarray(fsum.train_similarity(space))},
        f"cosine similarity ({space})", threshold=m.filter.memorization[space].threshold)
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


def render(m: Metrics, figs: dict[str, bytes]) -> tuple[str, str]:
    secs = sections(m)
    verdict = m.gain_over_best_baseline.verdict if m.gain_over_best_baseline else None
    tone = {Verdict.GAIN: "gain", Verdict.LOSS: "loss"}.get(verdict, "none")
    md = [f"# augment report: {m.run.name}", ""]
    body = [f"<h1>augment report: {html.escape(m.run.name)}</h1>",
            f"<p class='muted'>run folder {html.escape(m.run.output_dir)} · config {m.run.config_hash}</p>"]
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
            f"{html.escape(m.run.name)}</title>"
            "<meta name='viewport' content='width=device-width, initial-scale=1'>"
            f"<style>{CSS}</style></head><body>{''.join(body)}</body></html>")
    return "\n".join(md), page


def build_report(run_dir: str | Path) -> Metrics:
    """Write metrics.json, report.md (+ report_assets/) and report.html into the run folder; return the metrics,
    typed (validated against the schema here, once: every reader after it takes this object)."""
    run = Path(run_dir)
    rf = RunFolder(run)
    raw = collect_metrics(run)
    m = validate_metrics(raw, f"{rf.metrics} (as assembled)")
    figs = _reused_figures(run, raw)
    if figs is None:
        figs = figures(run, m)
        rf.report_assets.mkdir(exist_ok=True)
        for name, png in figs.items():
            rf.figure(name).write_bytes(png)
        write_json(rf.figures, {"key": _figures_key(run, raw), "names": sorted(figs)})
    md, page = render(m, figs)
    for path, text in ((rf.metrics, json.dumps(raw, indent=2)), (rf.report_md, md), (rf.report_html, page)):
        write_text(path, text)
    return m


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
