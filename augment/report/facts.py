"""The report's last sections, what the run cost (wall seconds per stage on its device, per 1,000 kept samples and
per point of gain) and what it was, and the list of every section in order (`sections`), which both renderers
walk."""

from __future__ import annotations

from augment.report.schema import Metrics
from augment.report.sections import CONTENT, Section, backbone_words, model_words

GENERATOR_STAGES = ("base", "finetune", "generate", "filter")  # what making the kept samples took


def _facts(m: Metrics) -> Section:
    run, data, gen, ev = m.run, m.data, m.generation, m.evaluation
    facts = [["config hash", run.config_hash],
             ["base model", f"{run.base_model.description} ({run.base_model.kind} backend)"],
             ["base fingerprint", run.base_model.fingerprint],
             ["adapter hash", run.adapter.adapter_hash],
             ["data fingerprint", data.fingerprint], ["evaluation seeds", ", ".join(map(str, run.evaluation_seeds))],
             ["sampler", f"{gen.scheduler}, {gen.num_inference_steps} steps, {gen.precision}, "
                         f"guidance {gen.guidance_scale}, strengths {gen.strengths}"],
             ["downstream model", f"{model_words(m)}, synthetic share per batch {ev.synthetic_prob}"]]
    facts += [[name, f"{c.kind}" + (f" on {backbone_words(c.backbone)} ({c.head} head)" if c.backbone else "")]
              for name, c in run.classifiers.items() if name != "evaluation.model"]
    facts += [[f"{k} version", v] for k, v in run.versions.items()]
    if run.cpu:
        facts.append(["CPU", run.cpu])
    facts += [[f"stage {k} (s)", f"{v:.1f}"] for k, v in run.stage_seconds.items() if v is not None]
    if run.total_seconds:
        facts.append(["total wall time (s)", f"{run.total_seconds:.1f}"])
    return Section("Run facts", "", [(["fact", "value"], facts)], [])


def _cost(m: Metrics) -> Section | None:
    """Device-seconds per stage, and what a team weighs before scheduling the job nightly: the generator's seconds
    per 1,000 kept samples and, when the verdict is a significant gain, the whole run's seconds per point of it."""
    run, seconds = m.run, {k: v for k, v in m.run.stage_seconds.items() if v is not None}
    if not seconds:
        return None
    device = run.device or "a device not recorded"
    total = sum(seconds.values())
    making = sum(seconds.get(k, 0.0) for k in GENERATOR_STAGES)
    kept = m.generation.kept
    lines = [f"{total:.0f} s of wall time on {device} in all: each stage's wall time when it last ran in this run "
             "folder (a stage reused on a rerun keeps the time it took then; a runner with several GPUs holds each "
             "of them that long)."]
    if kept:
        lines.append(f"Making the kept samples (stages {', '.join(GENERATOR_STAGES)}): {making:.0f} s, "
                     f"{1000 * making / kept:.0f} s per 1,000 kept samples ({kept} kept).")
    gain = m.gain_over_best_baseline
    if gain is not None and gain.ci_low is not None and gain.ci_low > 0 and gain.mean > 0:
        lines.append(f"Per point of gain over the best baseline ({100 * gain.mean:+.1f} points, significant): "
                     f"{total / (100 * gain.mean):.0f} s of the whole run.")
    else:
        lines.append("No significant gain over the best baseline, so no cost per point of gain.")
    rows = [[k, f"{v:.1f}", f"{100 * v / total:.0f}%" if total else "—"] for k, v in seconds.items()]
    return Section("What it cost", " ".join(lines), [(["stage", "wall seconds", "share"], rows)], [])


SECTIONS = (*CONTENT, _cost, _facts)


def sections(m: Metrics) -> list[Section]:
    """The report's sections in order; both renderers walk this list."""
    return [s for s in (section(m) for section in SECTIONS) if s is not None]
