"""The report's metrics (written as metrics.json): every number of the report, assembled from what the stages wrote
in a run folder. Its schema is documented with the report, in the docs folder."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from augment import results
from augment.arms import Arm
from augment.configfile import parse_config, saved_config
from augment.report.schema import SCHEMA_VERSION
from augment.results import (DataSummary, EvaluationSummary, FilterScores, FilterSummary, PseudoFacts, PseudoSummary,
                             PublishRecord, R, Record)
from augment.runfolder import RunFolder


def _json(value):
    """A record, or a dict of records, as JSON values (None stays None)."""
    if isinstance(value, Record):
        return value.to_json()
    if isinstance(value, dict):
        return {k: _json(v) for k, v in value.items()}
    return value


def _require(p: Path) -> Path:
    if not p.exists():
        raise FileNotFoundError(f"{p} is missing: is {p.parent} part of a finished augment run folder?")
    return p


def read_state(p: Path):
    return json.loads(_require(p).read_text())


def read_record(p: Path, model: type[R]) -> R:
    """A stage's record (augment.results), typed; a missing one is the same error as in read_state (run.json)."""
    return results.load(_require(p), model)


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
    """Assemble metrics.json from the run folder (augment.report.schema.Metrics is its schema)."""
    from augment.generate import sampler_of, sampling_precision

    rf = RunFolder(run)
    cfg = parse_config(saved_config(yaml.safe_load(rf.config.read_text())), str(rf.config))
    data = read_record(rf.data.summary, DataSummary)
    decisions = read_record(rf.filter.decisions, FilterSummary)
    fsum = read_record(rf.filter.summary, FilterScores)
    evaluation = read_record(rf.evaluation.summary, EvaluationSummary)
    runinfo = read_state(rf.info)
    publish_info = read_record(rf.dataset.record, PublishRecord)
    table = pd.read_parquet(rf.filter.scores)
    kept = table[table["kept"]]
    space = fsum.memorization_space
    other = "features" if space == "pixels" else "pixels"
    ref_other = np.asarray(fsum.train_similarity(other))
    mem = {
        space: memorization_stats(kept[f"nn_similarity_{space}"], fsum.train_similarity(space),
                                  cfg.filter.max_similarity),
        other: memorization_stats(kept[f"nn_similarity_{other}"], ref_other,
                                  float(np.quantile(ref_other, 0.95)) if len(ref_other) else 1.0),
    }
    mem[other]["threshold_rule"] = "95th percentile of train-to-train nearest-neighbour similarity"
    mem[space]["threshold_rule"] = "filter.max_similarity (the memorization gate)"
    arms = {k: v.to_json() for k, v in evaluation.arms.items()}
    ablation = {f: v for k, v in arms.items() if (f := Arm.of(k).filter) is not None}
    pseudo = read_record(rf.pseudo.summary, PseudoSummary) if rf.pseudo.summary.exists() else None
    gain = evaluation.gain_over_best_baseline
    synthetic = evaluation.selection.synthetic
    return _finite({
        "schema_version": SCHEMA_VERSION,
        "run": {"name": cfg.name, "output_dir": str(run), "config_hash": cfg.fingerprint(),
                "stage_seconds": {k: v.get("seconds") for k, v in runinfo["stages"].items()},
                "total_seconds": runinfo.get("total_seconds"), "versions": runinfo.get("versions", {}),
                "cpu": runinfo.get("cpu"), "device": runinfo.get("device"),
                "base_model": runinfo.get("base", {}), "adapter": runinfo.get("adapter", {}),
                "evaluation_seeds": evaluation.seeds, **_adaptation_seconds(cfg), **_encoders(cfg)},
        "data": data.to_json(),
        "generation": {"generated": decisions.generated, "kept": decisions.kept,
                       "per_class": [c.to_json() for c in decisions.per_class], "scheduler": sampler_of(run, cfg),
                       "num_inference_steps": cfg.generation.num_inference_steps,
                       "precision": sampling_precision(run, cfg),
                       "guidance_scale": cfg.generation.guidance_scale, "strengths": cfg.generation.strengths},
        "filter": {"order": decisions.order, "quality_classifier": fsum.quality_classifier.to_json(),
                   "alia_thresholds": fsum.alia_thresholds, "alia_oof_accuracy": fsum.alia_oof_accuracy,
                   "memorization": mem},
        "evaluation": {
            "model": cfg.evaluation.model.kind,
            "synthetic_prob": (cfg.evaluation.synthetic_prob[0] if synthetic is None or synthetic.synthetic_prob is None
                               else synthetic.synthetic_prob),
            "split": cfg.evaluation.split,
            "arms": {k: v for k, v in arms.items() if Arm.of(k).filter is None},
            "product_arm": evaluation.product_arm, "recipe": evaluation.recipe,
            "product_recipe": evaluation.product_recipe, "selection": evaluation.selection.to_json(),
            "baselines": evaluation.baselines, "best_baseline": evaluation.best_baseline,
            "gains": _json(evaluation.gains), "synthetic_adds": _json(evaluation.synthetic_adds),
            "per_class_delta": evaluation.per_class_delta,
            "filter_gain": _json(evaluation.filter_gain), "filter_ablation": ablation,
        },
        "pseudo": None if pseudo is None else pseudo.model_dump(mode="json", include=set(PseudoFacts.model_fields)),
        "product_arm": evaluation.product_arm,
        "gain_over_best_baseline": (None if gain is None else
                                    gain.model_dump(mode="json", exclude={"confidence"})
                                    | {"baseline": evaluation.best_baseline,
                                       "product_arm": evaluation.product_arm}),
        "dataset": {"path": str(rf.dataset.path), "splits": _json(publish_info.splits)},
    })


def _encoders(cfg) -> dict:
    """{"classifiers": {section: {kind, backbone, head}}} when some classifier section is a pretrained encoder
    (nothing otherwise, so a run without one writes the metrics it always wrote)."""
    from augment.config import CLASSIFIER_SECTIONS

    sections = {f"{s}.{k}": getattr(getattr(cfg, s), k) for s, k in CLASSIFIER_SECTIONS}
    if all(c.kind != "encoder" for c in sections.values()):
        return {}
    return {"classifiers": {name: {"kind": c.kind, "backbone": c.backbone, "head": c.head if c.backbone else None}
                            for name, c in sections.items()}}


def _adaptation_seconds(cfg) -> dict:
    """{"adaptation_seconds": {name: seconds}} for the adaptations trained beside the LoRA, when any was listed
    (nothing otherwise, so a run without them writes the metrics it always wrote)."""
    from augment.results import AdapterInfo
    from augment.stages.generator import TRAINED_BESIDE_LORA, adaptation_adapter

    seconds = {}
    for a in cfg.lora.adaptations:
        if a in TRAINED_BESIDE_LORA:
            info = results.load(adaptation_adapter(cfg, a).info, AdapterInfo)
            if info is not None:
                seconds[a] = info.train_seconds
    return {"adaptation_seconds": seconds} if seconds else {}
