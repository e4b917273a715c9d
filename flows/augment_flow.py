"""The main flow: one task per stage of augment.pipeline.STAGES (the list the library's own `run` walks too), the
report as Prefect artifacts.

Tasks pass paths and small summaries, never tensors. Reuse of expensive work is the library's (stage folders keyed
by config and data fingerprints), so it also holds across flow runs, deployments and machines sharing a disk.

No `from __future__ import annotations` here: a served deployment's runner pickles the flow by value, and string
annotations then no longer resolve to `RunConfig` ("Augment_FlowModel is not fully defined"): every served run
failed before its first stage. tests/test_serve.py runs a served deployment against a real server.
"""

import time
from contextlib import ExitStack, contextmanager
from pathlib import Path

from prefect import flow, get_run_logger, task, unmapped
from prefect.artifacts import create_markdown_artifact, create_progress_artifact
from prefect.artifacts import create_table_artifact
from prefect.artifacts import update_progress_artifact
from prefect.cache_policies import NO_CACHE
from prefect.task_runners import TaskRunner

from augment import pipeline, progress
from augment.stages import generator, outcome
from augment.errors import USER_ERRORS
from augment.config import ConfigError, RunConfig
from augment.configfile import apply_overrides, deep_merge, parse_config
from augment.report.schema import Metrics
from augment.report.sections import headline, key_arms
from augment.results import AdapterInfo, BaseModelInfo, Record
from augment.runfolder import RunFolder
from augment.trainings import TrainingRun


def _log(message: str) -> None:
    get_run_logger().info(message)


@contextmanager
def _progress(cfg: RunConfig, stage: str):
    """The progress callback(done, total) of one stage (`progress.stage`: a terminal bar, or log lines with a
    heartbeat every 25 s), which also keeps the stage's Prefect progress artifact up to date, if it has one
    (created on the first call, so a reused stage leaves none behind)."""
    s = pipeline.STAGE[stage]
    key, description = s.artifact
    artifact, last = [], [-1]

    def update(done: int, total: int) -> None:
        pct = round(100.0 * done / max(total, 1), 0)
        if pct != last[0]:
            last[0] = pct
            if not artifact:
                artifact.append(create_progress_artifact(progress=pct, key=f"{_key(cfg)}-{key}",
                                                         description=description))
            else:
                update_progress_artifact(artifact_id=artifact[0], progress=pct)

    # the heartbeat logs from its own thread: the run logger is looked up here, in the task's
    with progress.stage(s.what, s.unit, get_run_logger().info) as p:
        yield progress.both(update, p) if description else p


@task(cache_policy=NO_CACHE, task_run_name="{stage}")
def run_stage(cfg: RunConfig, stage: str, kept: dict) -> Record | Metrics:
    """One stage of pipeline.STAGES, here in the flow's process; the report's also leaves its artifacts."""
    with _progress(cfg, stage) as p:
        out = pipeline.STAGE[stage].call(cfg, kept, log=_log, progress=p, units=None)
    if stage == "report":
        _artifacts(cfg, out)
    return out


@task(cache_policy=NO_CACHE)
def train_task(cfg: RunConfig, arm: str, recipe: str, seed: int) -> TrainingRun:
    """One downstream training (arm x seed): the unit the task runner spreads over processes or Dask workers."""
    return outcome.train_unit(cfg, arm, recipe, seed)


class SharedRunner(TaskRunner):
    """One started task runner lent to every stage subflow of a run: a subflow enters and leaves it without starting
    or stopping the pool underneath (Prefect duplicates a subflow's runner and starts the copy: a process pool or a
    Dask cluster per stage, ~20 s each on 2 cores)."""

    def __init__(self, runner: TaskRunner):
        super().__init__()
        self.runner = runner

    def duplicate(self) -> "SharedRunner":
        return self

    def __enter__(self) -> "SharedRunner":  # a subflow may enter its runner more than once; the pool stays up
        self._started = True
        return self

    def __exit__(self, *exc) -> None:
        pass

    def __getstate__(self) -> dict:  # the subflow (and so its runner) is pickled into each task's process
        return {**self.__dict__, "runner": None}

    def submit(self, task, parameters, wait_for=None, dependencies=None):
        return self.runner.submit(task, parameters, wait_for=wait_for, dependencies=dependencies)


def task_runner(cfg: RunConfig):
    """The Prefect task runner that `cfg.runner` names (not used for `local`): on GPUs, one worker per GPU
    (augment/gpus.py; the pipeline's preflight has refused several on one)."""
    from prefect.task_runners import ProcessPoolTaskRunner

    from augment.gpus import pinned_devices, runner_workers

    r = cfg.runner
    n, devices = runner_workers(cfg), pinned_devices(cfg)
    if r.kind == "processes":
        return ProcessPoolTaskRunner(max_workers=n)
    try:
        import dask
        from prefect_dask import DaskTaskRunner
    except ImportError:
        raise ConfigError("runner.kind=dask needs prefect-dask: pip install 'augment[dask]'") from None
    # Dask's nannies start workers with MALLOC_TRIM_THRESHOLD_=65536: glibc then returns freed memory at once and
    # every torch training step page-faults its buffers back in. Measured: a downstream training took 9.0 s with
    # it and 4.9 s without. Our local workers start without it (a remote cluster's config is its own).
    environ = dict(dask.config.get("distributed.nanny.pre-spawn-environ", {}) or {})
    environ.pop("MALLOC_TRIM_THRESHOLD_", None)
    dask.config.set({"distributed.nanny.pre-spawn-environ": environ})
    if r.address:
        return DaskTaskRunner(address=r.address)
    if devices:
        # a pinned worker of a GPU run must find its GPU; a CPU run (device cpu) keeps its workers on the CPU
        strict = cfg.device != "cpu"
        return DaskTaskRunner(cluster_class=pinned_cluster, cluster_kwargs={"devices": devices, "strict": strict})
    return DaskTaskRunner(cluster_kwargs={"n_workers": n, "threads_per_worker": 1, "processes": True})


def pinned_cluster(devices: list[str], strict: bool = True, **kwargs):
    """A local Dask cluster of one single-threaded worker per GPU, each started with CUDA_VISIBLE_DEVICES set to its
    own (as dask-cuda's LocalCUDACluster does, without needing NVML), named after it; `strict`: a worker whose GPU
    is not there fails its units rather than training on the CPU (augment.gpus.PINNED)."""
    from distributed import Nanny, Scheduler, SpecCluster

    from augment.gpus import PINNED

    env = {PINNED: "1"} if strict else {}
    workers = {f"gpu-{d}": {"cls": Nanny, "options": {"nthreads": 1, "name": f"gpu-{d}",
                                                       "env": {"CUDA_VISIBLE_DEVICES": d, **env}}} for d in devices}
    return SpecCluster(workers=workers, scheduler={"cls": Scheduler, "options": {"dashboard_address": ":0"}},
                       **kwargs)


@task(cache_policy=NO_CACHE)
def generate_task(cfg: RunConfig, base: BaseModelInfo, adapter: AdapterInfo, shard: int) -> int:
    """One shard of candidates: the generation unit the task runner spreads over processes or Dask workers."""
    return generator.generate_unit(cfg, base, adapter, shard)


def _units(cfg: RunConfig, stage: str, kept: dict):
    """The map of a distributed stage's units onto this flow's task runner, yielding each result in order."""
    if stage == "generate":
        def run_shards(shards: list[int]):
            for f in generate_task.map(unmapped(cfg), unmapped(kept["base"]), unmapped(kept["adapter"]), shards):
                yield f.result()

        return run_shards

    def run_units(units: list[tuple[str, str, int]]):
        futures = train_task.map(unmapped(cfg), [u[0] for u in units], [u[1] for u in units],
                                 [u[2] for u in units])
        for f in futures:
            yield f.result()

    return run_units


@flow(name="augment-units", flow_run_name="augment-{stage}")
def run_stage_on_runner(cfg: RunConfig, stage: str, kept: dict) -> Record:
    """A distributed stage (generation, evaluation) with each of its units a task on this flow's task runner."""
    with _progress(cfg, stage) as p:
        return pipeline.STAGE[stage].call(cfg, kept, log=_log, progress=p, units=_units(cfg, stage, kept))


PUBLISHED_EVENT = "augment.dataset.published"


def announce(cfg: RunConfig, m: Metrics) -> None:
    """Emit `augment.dataset.published` so that a downstream training deployment can trigger on it."""
    from prefect.events import emit_event

    gain = m.gain_over_best_baseline
    verdict = {"verdict": None, "gain": None, "ci_low": None, "ci_high": None, "baseline": None} if gain is None else {
        "verdict": gain.verdict.value, "gain": gain.mean, "ci_low": gain.ci_low, "ci_high": gain.ci_high,
        "baseline": gain.baseline}
    path = str(Path(m.dataset.path).resolve())
    emit_event(
        event=PUBLISHED_EVENT,
        resource={"prefect.resource.id": f"augment.dataset.{path}", "prefect.resource.name": cfg.name,
                  "augment.job": cfg.name, "augment.dataset.path": path},
        payload={"dataset_path": path, "job": cfg.name, "product_arm": m.evaluation.product_arm, **verdict,
                 "rows": {s: v.rows for s, v in m.dataset.splits.items()},
                 "synthetic_rows": m.dataset.splits["train"].synthetic,
                 "config_hash": m.run.config_hash},
    )


def _key(cfg: RunConfig) -> str:
    """Artifact keys are stable per job name, so their history accumulates across runs. Prefect allows only
    lowercase ASCII letters, digits and dashes: `isalnum` kept the `é` of `café`, and the run failed at its first
    artifact."""
    from augment.config import slug

    return f"augment-{slug(cfg.name)}"


def _interval(row: dict) -> str:
    """An arm's 95% interval in points; "n/a" where it could not be computed (one seed). A bound of exactly 0.0 is
    a bound (an arm that never got a test image right), not a missing one."""
    low, high = row["accuracy_ci_low"], row["accuracy_ci_high"]
    if low is None or high is None:
        return "n/a"
    return f"[{100 * low:.1f}, {100 * high:.1f}]"


def _artifacts(cfg: RunConfig, m: Metrics) -> None:
    ev = m.evaluation
    rows = [{"arm": a, "accuracy_mean": v.accuracy.mean, "accuracy_ci_low": v.accuracy.ci_low,
             "accuracy_ci_high": v.accuracy.ci_high, "macro_f1_mean": v.macro_f1.mean}
            for a, v in ev.arms.items() if v.ran]
    lines = [f"# augment: {cfg.name}", "", headline(m), "", "| arm | accuracy | 95% CI |", "|---|---|---|"]
    lines += [f"| {r['arm']} | {100 * r['accuracy_mean']:.1f} | {_interval(r)} |" for r in rows]
    lines += ["", f"Generated {m.generation.generated}, kept {m.generation.kept}. "
              f"Dataset: `{m.dataset.path}`. Full report: the `{_key(cfg)}-report` artifact, and "
              f"`{RunFolder(m.run.output_dir).report_html}` on the worker."]
    create_markdown_artifact(markdown="\n".join(lines), key=f"{_key(cfg)}-summary", description="augment summary")
    per_class = []
    for k, c in enumerate(m.data.class_names):
        row = {"class": c}
        for a in key_arms(ev):
            row[a] = round(ev.arms[a].per_class_accuracy[k], 4)
        gen = m.generation.per_class[k]
        row.update(generated=gen.generated, kept=gen.kept)
        per_class.append(row)
    create_table_artifact(table=per_class, key=f"{_key(cfg)}-per-class", description="Per-class results")
    create_markdown_artifact(markdown=_report_markdown(Path(m.run.output_dir)), key=f"{_key(cfg)}-report",
                             description="The full report (its figures are in report.html on the worker)")


def _report_markdown(run: Path) -> str:
    """The report itself, for the Prefect UI: a `file://` link opens nothing on a teammate's machine, so the
    artifact holds report.md's text and tables, and says on which machine and where the HTML report with its
    figures lies."""
    import re
    import socket

    rf = RunFolder(run)
    html = rf.report_html.resolve()
    where = (f"> Figures and sample grids: `{html}` on `{socket.gethostname()}` (the run folder holds the report, "
             "the dataset and every stage's output; copy it to share them).")
    assets = re.escape(RunFolder("").report_assets.name)
    text = re.sub(rf"!\[([^\]]*)\]\({assets}/[^)]*\)", r"*(figure in report.html: \1)*", rf.report_md.read_text())
    title, _, rest = text.partition("\n")
    return f"{title}\n\n{where}\n{rest}"


def resolve_config(config: RunConfig, overrides: list[str]) -> RunConfig:
    """The config a run uses: in a deployment, the keys this run's `config` sets are merged into the
    deployment's own config (a partial dict changes only what it names); then `overrides` (`key=value`, as the
    CLI's --set) apply on top."""
    from prefect.client.orchestration import get_client
    from prefect.runtime import deployment

    data = config.model_dump(mode="json")
    default = None
    if deployment.id:  # the flow run's parameters are already shallow-merged: read the deployment's own
        with get_client(sync_client=True) as client:
            default = (client.read_deployment(deployment.id).parameters or {}).get("config")
    if isinstance(default, dict):
        data = deep_merge(default, config.model_dump(mode="json", exclude_unset=True))
    return parse_config(apply_overrides(data, overrides), "flow parameters")


# A crashed run (a killed worker, an out-of-memory kill, a lost GPU) is retried once; it resumes from every finished
# stage, fine-tuning checkpoint and generation shard. A user error is not retried (`_no_retry`); `augment run` turns
# retries off.
@flow(name="augment", retries=1, retry_delay_seconds=30)
def augment_flow(config: RunConfig = RunConfig(), overrides: list[str] = [],  # noqa: B006 (Prefect form)
                 wait: bool = False) -> Metrics:
    """Pseudo-label, fine-tune, generate, filter, evaluate and publish; returns the report's metrics (metrics.json,
    typed: its `to_json()` is the file's JSON).

    `overrides`: `section.key=value` strings applied on top of `config`, e.g. `["data.source=/data/new"]`.
    `wait`: when another run holds the output folder, wait for it to finish instead of failing."""
    t0 = time.time()
    try:
        cfg = resolve_config(config, overrides)
        return _run(cfg, wait, t0)
    except USER_ERRORS:
        _no_retry()
        raise


def _no_retry() -> None:
    """A bad config, bad data or a folder in use fail the same way again: no retry 30 s later (the retry is for
    crashes). The server decides retries from the run's policy, so the policy is changed there."""
    from prefect.client.orchestration import get_client
    from prefect.context import FlowRunContext

    run = FlowRunContext.get().flow_run
    with get_client(sync_client=True) as client:
        client.update_flow_run(flow_run_id=run.id,
                               empirical_policy=run.empirical_policy.model_copy(update={"retries": 0}))


def _run(cfg: RunConfig, wait: bool, t0: float) -> Metrics:
    """pipeline.STAGES, each a task; a distributed stage on a processes/dask runner is a subflow whose units are
    tasks on one pool or cluster, started for the first such stage and shared by the run's others."""
    with ExitStack() as pool:
        shared: list[SharedRunner] = []

        def call(stage: pipeline.Stage, kept: dict):
            if not stage.distributed or cfg.runner.kind == "local":
                return run_stage.with_options(retries=stage.retries, retry_delay_seconds=5)(cfg, stage.name, kept)
            if not shared:
                shared.append(SharedRunner(pool.enter_context(task_runner(cfg))))
            return run_stage_on_runner.with_options(task_runner=shared[0])(cfg, stage.name, kept)

        metrics = pipeline.walk(cfg, call, wait=wait, t0=t0)
    announce(cfg, metrics)
    return metrics
