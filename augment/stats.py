"""Small, tested statistics for the report: t-intervals over seeds and paired differences."""

from __future__ import annotations

import math

import numpy as np
from scipy import stats as st

from augment.arms import Verdict


def summarize(values, confidence: float = 0.95) -> dict:
    """Mean, sample standard deviation and a Student-t confidence interval of the mean."""
    x = np.asarray(values, dtype=np.float64)
    n = len(x)
    if n == 0:
        raise ValueError("summarize: no values")
    mean = float(x.mean())
    std = float(x.std(ddof=1)) if n > 1 else 0.0
    if n > 1:
        half = float(st.t.ppf(0.5 + confidence / 2, n - 1) * std / math.sqrt(n))
        lo, hi = mean - half, mean + half
    else:
        lo = hi = float("nan")
    return {"mean": mean, "std": std, "n": n, "ci_low": lo, "ci_high": hi, "confidence": confidence}


def paired_difference(a, b, confidence: float = 0.95) -> dict:
    """a - b paired by index (same seed), with its t-interval, a two-sided p-value and a plain verdict."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired_difference: unequal lengths {len(a)} and {len(b)}")
    d = a - b
    out = summarize(d, confidence)
    if len(d) > 1 and out["std"] > 0:
        out["p_value"] = float(2 * st.t.sf(abs(out["mean"]) / (out["std"] / math.sqrt(len(d))), len(d) - 1))
    else:
        out["p_value"] = float("nan") if len(d) < 2 else (1.0 if out["mean"] == 0 else 0.0)
    out["differences"] = d.tolist()
    out["verdict"] = verdict(out)
    return out


def verdict(diff: dict) -> Verdict:
    lo, hi = diff["ci_low"], diff["ci_high"]
    if math.isnan(lo):
        return Verdict.NO_INTERVAL
    if lo > 0:
        return Verdict.GAIN
    if hi < 0:
        return Verdict.LOSS
    return Verdict.NONE


def clustered_difference(diffs_by_group, confidence: float = 0.95, n_boot: int = 10000, seed: int = 0) -> dict:
    """Mean of paired differences grouped by few-shot draw (seeds within draws), with a two-level bootstrap
    interval: resample draws, then seeds within each drawn draw. Honest when draws differ more than seeds do."""
    groups = [np.asarray(g, np.float64) for g in diffs_by_group if len(g)]
    if not groups:
        raise ValueError("clustered_difference: no differences")
    mean = float(np.mean(np.concatenate(groups)))
    rng = np.random.default_rng(seed)
    boots = np.empty(n_boot)
    for i in range(n_boot):
        picked = [groups[j] for j in rng.integers(0, len(groups), len(groups))]
        boots[i] = np.mean(np.concatenate([g[rng.integers(0, len(g), len(g))] for g in picked]))
    lo, hi = np.quantile(boots, [0.5 - confidence / 2, 0.5 + confidence / 2])
    out = {"mean": mean, "ci_low": float(lo), "ci_high": float(hi), "n_groups": len(groups),
           "n": int(sum(len(g) for g in groups)), "confidence": confidence}
    out["verdict"] = verdict(out)
    return out
