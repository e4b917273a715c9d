"""Shared helpers of the benchmark scripts: run the product's flow on a config with overrides, format results."""

from __future__ import annotations

import os
import time
from pathlib import Path

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("TQDM_DISABLE", "1")

ROOT = Path(__file__).resolve().parents[1]


def run_job(config: str, overrides: list[str]) -> tuple[dict, float]:
    """Run the augment flow exactly as `augment run` does; return metrics.json and wall seconds."""
    from augment.configfile import load_config
    from flows.augment_flow import augment_flow

    cfg = load_config(config, overrides)
    t0 = time.time()
    metrics = augment_flow(config=cfg).to_json()
    return metrics, time.time() - t0


def pct(s: dict | None) -> str:
    return "n/a" if not s else f"{100 * s['mean']:.1f} ± {100 * s['std']:.1f}"


def gain(g: dict | None) -> str:
    if not g:
        return "n/a"
    ci = "" if g.get("ci_low") is None else f" [{100 * g['ci_low']:+.1f}, {100 * g['ci_high']:+.1f}]"
    return f"{100 * g['mean']:+.1f}{ci}"


def arm(m: dict, name: str) -> dict | None:
    return m["evaluation"]["arms"].get(name, {}).get("accuracy")


def print_table(caption: str, header: list[str], rows: list[list]) -> None:
    print(f"\n{caption}")
    print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for r in rows:
        print("| " + " | ".join(str(c) for c in r) + " |")
