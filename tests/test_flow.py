"""End to end: a real Prefect flow run on the tiny config, a real datasets round trip, the report, the CLI."""

import html
import json
import os
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from flows.cli import main


class _Images(HTMLParser):
    def __init__(self):
        super().__init__()
        self.srcs = []

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.srcs.append(dict(attrs).get("src", ""))


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, prefect_harness):
    from augment.configfile import load_config
    from conftest import ROOT
    from flows.augment_flow import augment_flow

    tmp = tmp_path_factory.mktemp("flow")
    cfg = load_config(ROOT / "configs" / "tiny.yaml", [
        f"publish.output_dir={tmp / 'run'}", f"base.cache_dir={tmp / 'cache'}",
        # enough candidates and a lenient judge so that some synthetic rows are published
        "generation.num_per_class=8", "filter.min_confidence=0.0", "filter.order=[memorization, near_duplicates]",
        # diagnostic arms on fewer seeds than the verdict's, as in the default job
        "evaluation.seeds=3", "evaluation.diagnostic_seeds=2",
    ])
    metrics = augment_flow(config=cfg)
    return cfg, metrics, Path(cfg.publish.output_dir)


GOLDEN_RUN = Path(__file__).parent / "data" / "tiny_run_golden.json"
_MACHINE_KEYS = {"seconds", "stage_seconds", "total_seconds", "pretrain_seconds", "train_seconds", "versions", "cpu",
                 "device", "output_dir", "path"}  # what depends on the machine, the clock or the temporary folder


def run_digest(run: Path) -> dict:
    """What a finished run computed, without what depends on the machine or the folder: the evaluation's results,
    metrics.json, and each published split's rows (a hash per column, image bytes included)."""
    import hashlib

    import datasets

    def strip(x):
        if isinstance(x, dict):
            return {k: strip(v) for k, v in x.items() if k not in _MACHINE_KEYS}
        if isinstance(x, list):
            return [strip(v) for v in x]
        return x.replace(str(run), "<run>") if isinstance(x, str) else x

    out = {"results": strip(json.loads((run / "evaluation" / "results.json").read_text())),
           "metrics": strip(json.loads((run / "metrics.json").read_text())), "dataset": {}}
    for name, split in datasets.load_from_disk(str(run / "dataset")).items():
        table = split.data.table
        cols = {}
        for c in table.column_names:
            h = hashlib.sha256()
            for v in table.column(c).to_pylist():
                h.update(v["bytes"] if c == "image" else json.dumps(v).encode())
            cols[c] = h.hexdigest()[:16]
        out["dataset"][name] = {"rows": split.num_rows, "features": str(split.features), "columns": cols}
    return out


def _shape(x):
    """The digest's structure: keys, list lengths and value types (what must hold on any CPU)."""
    if isinstance(x, dict):
        return {k: _shape(v) for k, v in x.items()}
    if isinstance(x, list):
        return [len(x)] + ([_shape(x[0])] if x else [])
    return "number" if isinstance(x, (int, float)) and not isinstance(x, bool) else type(x).__name__


def test_the_tiny_run_computes_what_the_golden_run_computed(finished_run):
    """Behaviour is kept through refactors: the tiny flow run's results, metrics and published rows equal the
    saved ones (tests/data/tiny_run_golden.json, written with AUGMENT_WRITE_GOLDEN=1 by the code before a
    redesign). Exactly on the kind of CPU that wrote them; elsewhere float sums round differently and a tiny
    training can tip, so another kind compares the structure (every key, arm, seed and list length)."""
    import os

    from augment.diffusion.tensors import cpu_kind

    _, _, run = finished_run
    mine = {"cpu_kind": cpu_kind(), **run_digest(run)}
    if os.environ.get("AUGMENT_WRITE_GOLDEN") == "1":
        GOLDEN_RUN.write_text(json.dumps(mine, indent=1, sort_keys=True) + "\n")
    golden = json.loads(GOLDEN_RUN.read_text())
    if golden["cpu_kind"] == mine["cpu_kind"]:
        for part in ("results", "metrics", "dataset"):
            assert mine[part] == golden[part], part
    else:
        assert _shape(mine["results"]) == _shape(golden["results"])
        assert _shape(mine["metrics"]) == _shape(golden["metrics"])
        assert {n: (d["rows"], d["features"]) for n, d in mine["dataset"].items()} == \
            {n: (d["rows"], d["features"]) for n, d in golden["dataset"].items()}


def stages_walked(run: Path) -> list[str]:
    """The stages a run went through, in the order run.json recorded them finishing."""
    return list(json.loads((run / "run.json").read_text())["stages"])


def test_the_flow_walks_the_one_stage_list(finished_run):
    """The flow runs pipeline.STAGES as the library's own run does (tests/test_export.py checks that one), every
    stage a task named after it."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import TaskRunFilter, TaskRunFilterName

    from augment import pipeline

    _, _, run = finished_run
    names = [s.name for s in pipeline.STAGES]
    assert stages_walked(run) == [n for n in names if pipeline.STAGE[n].timed]
    with get_client(sync_client=True) as client:
        tasks = client.read_task_runs(task_run_filter=TaskRunFilter(name=TaskRunFilterName(any_=names)))
    assert set(names) <= {t.name for t in tasks}


def test_flow_publishes_a_dataset_that_datasets_loads(finished_run):
    import datasets

    cfg, metrics, run = finished_run
    for loaded in (datasets.load_from_disk(str(run / "dataset")), datasets.load_dataset(str(run / "dataset"))):
        assert set(loaded) == {"train", "validation", "test"}
        train = loaded["train"]
        assert train.features["label"].names == [str(i) for i in range(10)]
        n_syn, n_pseudo = sum(train["is_synthetic"]), sum(train["is_pseudo_labeled"])
        assert n_syn == metrics.generation.kept > 0
        # pool rows are published exactly when the evaluation put them in the recipe (out of fold decided)
        in_recipe = "pseudo" in metrics.evaluation.product_recipe
        assert n_pseudo == (metrics.pseudo.count if in_recipe else 0)
        assert len(train) == metrics.data.train_size + n_syn + n_pseudo
        if in_recipe:
            pseudo_rows = train.filter(lambda r: r["is_pseudo_labeled"])
            assert all(c > metrics.pseudo.threshold for c in pseudo_rows["pseudo_confidence"])
            assert not any(pseudo_rows["is_synthetic"])
        assert len(loaded["test"]) == metrics.data.test_size and not any(loaded["test"]["is_synthetic"])
        row = train[len(train) - 1]
        assert row["is_synthetic"] and row["seed"] is not None and row["adapter_hash"]
        assert row["image"].size == (8, 8)
    assert metrics.dataset.splits["train"].synthetic == metrics.generation.kept
    assert not list(run.glob("*.tmp"))  # nothing half-written left behind


def test_metrics_schema_and_report(finished_run):
    cfg, metrics, run = finished_run
    on_disk = json.loads((run / "metrics.json").read_text())
    assert on_disk["schema_version"] == 1 and metrics.to_json() == on_disk  # the flow returns the file, typed
    gain = on_disk["gain_over_best_baseline"]
    assert {"mean", "ci_low", "ci_high"} <= set(gain) and len(gain["differences"]) == cfg.evaluation.seeds
    ev = on_disk["evaluation"]
    product, recipe = ev["product_arm"], ev["product_recipe"]
    syn = ev["selection"]["synthetic"]  # the choose stage: on labeled images the generator never saw
    assert syn["images"] == syn["holdout"] == 10 and syn["synthetic_prob"] in cfg.evaluation.synthetic_prob
    assert product == (recipe + "+synthetic" if syn["in_product"] else recipe)
    assert product == on_disk["product_arm"] == gain["product_arm"]
    assert ev["selection"]["recipe"]["chosen"] in ("real", "real+classic")
    other = "real+synthetic" if ev["recipe"] == "real+classic" else "real+classic+synthetic"  # not the recipe's
    for arm in ("real", "real+classic", ev["recipe"] + "+synthetic", product):
        assert len(ev["arms"][arm]["per_seed_accuracy"]) == cfg.evaluation.seeds
    for arm in (other, recipe + "+synthetic_unfiltered", "synthetic"):
        assert len(ev["arms"][arm]["per_seed_accuracy"]) == cfg.evaluation.diagnostic_seeds
    assert on_disk["pseudo"]["count"] > 0  # the tiny config's lenient labeler labels some pool images
    pseudo_arm = ev["selection"]["recipe"]["chosen"] + "+pseudo"
    assert pseudo_arm in ev["baselines"] and pseudo_arm + "+synthetic" in ev["arms"]
    assert set(ev["synthetic_adds"]) >= {"real+synthetic vs real", "real+classic+synthetic vs real+classic"}
    best = on_disk["gain_over_best_baseline"]["baseline"]
    assert best in ev["baselines"] and "synthetic" not in best
    a = on_disk["evaluation"]["arms"][product]["per_seed_accuracy"]
    b = on_disk["evaluation"]["arms"][best]["per_seed_accuracy"]
    assert gain["mean"] == pytest.approx(sum(x - y for x, y in zip(a, b)) / len(a))
    page = (run / "report.html").read_text()
    parser = _Images()
    parser.feed(page)
    assert len(parser.srcs) >= 8 and all(s.startswith("data:image/png;base64,") for s in parser.srcs)
    assert "http://" not in page and "https://" not in page  # self-contained
    md = (run / "report.md").read_text()
    for src in re.findall(r"\]\((report_assets/[^)]+)\)", md):
        assert (run / src).is_file()
    assert f"{metrics.data.test_size} real images" in md
    assert "## How the recipe was chosen (labeled data only)" in md and "## Pseudo-labels" in md
    assert f"| {metrics.data.train_size} images, 2 folds x 1 |" in md  # what each choice rests on
    assert "| synthetic data | held-out labeled images |" in md
    if product != best:
        assert f"{product} − {best} (best baseline)" in md
    else:  # the recipe alone is the product and the best baseline: no row against itself
        assert "it is the best baseline" in md and f"{product} − {best}" not in md
    assert "(what synthetic data adds) [diagnostic: 2 of 3 seeds]" in md  # a row on fewer seeds says so


def test_rerun_reuses_every_expensive_stage(finished_run):
    from flows.augment_flow import augment_flow

    cfg, metrics, run = finished_run
    # the published dataset and the report's figures too: an unchanged re-run rewrites neither
    kept = [run / "finetune" / "adapter" / "adapter_model.safetensors", next((run / "candidates").glob("shard-*.npz")),
            run / "evaluation" / "results.json", run / "dataset" / "augment_publish.json",
            next((run / "dataset" / "data").glob("train-*.parquet")), run / "report_assets" / "arms_accuracy.png"]
    before = [p.stat().st_mtime_ns for p in kept]
    again = augment_flow(config=cfg)
    assert [p.stat().st_mtime_ns for p in kept] == before
    assert again.gain_over_best_baseline == metrics.gain_over_best_baseline
    assert (run / "report.html").read_text().count("data:image/png;base64") >= 6  # reused figures are embedded


def test_a_changed_publish_setting_republishes_and_new_metrics_redraw(finished_run):
    from augment import pipeline
    from augment.stages import generator, outcome
    from augment.report.render import build_report

    cfg, metrics, run = finished_run
    version = pipeline.runfolder.read_json(run / "dataset" / "augment_publish.json")["version"]
    renamed = cfg.model_copy(update={"publish": cfg.publish.model_copy(update={"dataset_name": "renamed"})})
    with pipeline.started(renamed):
        base, adapter = generator.recorded(renamed)
        outcome.publish_stage(renamed, base, adapter, log=lambda m: None)
    assert "renamed" in (run / "dataset" / "README.md").read_text()
    # every row carries the config hash, which covers the publish section: a new version
    assert pipeline.runfolder.read_json(run / "dataset" / "augment_publish.json")["version"] != version
    figs = run / "report_assets" / "figures.json"
    stamp = figs.stat().st_mtime_ns
    m = json.loads((run / "metrics.json").read_text())
    summary = run / "evaluation" / "summary.json"
    saved = summary.read_text()
    try:  # a metric the figures show changes: they are drawn again
        ev = json.loads(saved)
        acc = ev["arms"]["real"]["accuracy"]
        for k in ("mean", "ci_low", "ci_high"):
            acc[k] = acc[k] - 0.01 if acc[k] is not None else None
        summary.write_text(json.dumps(ev))
        build_report(run)
        assert figs.stat().st_mtime_ns != stamp
    finally:
        summary.write_text(saved)
        build_report(run)
    assert json.loads((run / "metrics.json").read_text())["evaluation"] == m["evaluation"]


def test_report_command_rebuilds_without_recomputing(finished_run, capsys):
    cfg, metrics, run = finished_run
    (run / "report.html").unlink()
    assert main(["report", str(run)]) == 0
    assert (run / "report.html").exists()
    assert "paired difference" in capsys.readouterr().out


MEASURE = """<script>addEventListener('load', () => {
  const imgs = [...document.images].filter(i => i.alt.includes('per class') && i.alt.includes('images'));
  document.title = JSON.stringify({page: document.documentElement.scrollWidth, view: innerWidth,
    grid: imgs.map(i => i.getBoundingClientRect().width), body: document.body.getBoundingClientRect().width});
});</script>"""


@pytest.mark.parametrize("width", [500, 1280])  # phone-sized (headless Chromium's narrowest window) and desktop
def test_report_renders_in_headless_chromium(finished_run, tmp_path, width):
    """The report at phone and desktop widths: nothing wider than the screen (wide tables scroll inside their own
    box), and the sample grids drawn large enough to see (8x8 digits are upscaled, not left as 8-pixel stamps)."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("chromium is not installed (.ci/run installs it)")
    _, _, run = finished_run
    flags = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}",
             f"--window-size={width},2000"]
    png = tmp_path / "shot.png"
    subprocess.run(flags + [f"--screenshot={png}", (run / "report.html").as_uri()], check=True, capture_output=True,
                   timeout=120)
    assert png.stat().st_size > 20_000  # a rendered page with figures, not a blank one
    probe = tmp_path / "probe.html"  # the same page with a script that measures it
    probe.write_text((run / "report.html").read_text().replace("</body>", MEASURE + "</body>"))
    dom = subprocess.run(flags + ["--dump-dom", "--virtual-time-budget=5000", probe.as_uri()], check=True,
                         capture_output=True, text=True, timeout=120).stdout
    got = json.loads(html.unescape(re.search(r"<title>(.*?)</title>", dom, re.S).group(1)))
    assert got["page"] <= got["view"], got  # no sideways scrolling of the whole page
    assert len(got["grid"]) >= 2 and min(got["grid"]) >= min(300, 0.9 * got["body"]), got
    # each image of the kept-sample grid is drawn at least 5x its 8 pixels on a desktop
    if width >= 1000:
        assert min(got["grid"]) >= 400


def test_cli_reports_user_errors_clearly(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("lora:\n  rank: -1\n  colour: red\n")
    assert main(["run", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "lora.rank" in err and "lora.colour: unknown key" in err and "Traceback" not in err
    missing = tmp_path / "missing.yaml"
    missing.write_text(f"data:\n  source: {tmp_path / 'no_such_folder'}/\n")
    assert main(["validate", str(missing)]) == 2  # checked now, not an hour into a run
    err = capsys.readouterr().err
    assert "no_such_folder" in err and "does not exist" in err and len(err.strip().splitlines()) == 1
    good = tmp_path / "good.yaml"
    good.write_text(f"publish:\n  output_dir: {tmp_path / 'out'}\n")
    assert main(["validate", str(good)]) == 0 and "sklearn-digits" in capsys.readouterr().out


def test_stages_run_without_prefect_even_with_nothing_to_generate(tiny_cfg):
    """balance=max on a balanced train split asks for zero samples: every stage and the report still work."""
    from augment import pipeline
    from augment.stages import core
    from augment.report.render import build_report

    cfg = tiny_cfg.model_copy(deep=True)
    cfg.generation.balance = "max"
    cfg.evaluation.seeds = 1  # one seed: no intervals anywhere, and the report still renders
    quiet = lambda m: None  # noqa: E731
    with pipeline.started(cfg):
        _run_stages_without_prefect(cfg, quiet)
    m = build_report(core.output_dir(cfg)).to_json()
    assert m["generation"]["generated"] == 0 and (core.output_dir(cfg) / "report.html").exists()
    assert m["evaluation"]["arms"]["real"]["accuracy"]["ci_low"] is None


def _run_stages_without_prefect(cfg, quiet):
    from augment.stages import choices, generator, outcome

    generator.prepare_data(cfg)
    base = generator.base_model(cfg, log=quiet)
    choices.pseudo_stage(cfg, log=quiet)
    adapter = generator.finetune_stage(cfg, base, log=quiet)
    assert generator.generate_stage(cfg, base, adapter, log=quiet).samples == 0
    assert outcome.filter_stage(cfg, log=quiet).kept == 0
    summary = outcome.evaluate_stage(cfg, log=quiet)
    assert summary.arms["synthetic"].skipped and not summary.arms["synthetic"].ran
    assert outcome.publish_stage(cfg, base, adapter).splits["train"].synthetic == 0


def test_deployment_event_trigger():
    from flows.deployments import build_triggers

    assert build_triggers(None) == []
    (trigger,) = build_triggers("dataset.labeled.updated")
    assert trigger.expect == {"dataset.labeled.updated"}


def test_a_stage_is_redone_when_what_it_consumes_changes(tiny_cfg):
    """Same config, another base (e.g. a re-pretrained cache entry): the adapter and everything after it is redone."""
    from augment import pipeline
    from augment.stages import choices, generator

    quiet = lambda m: None  # noqa: E731
    with pipeline.started(tiny_cfg) as out:
        generator.prepare_data(tiny_cfg)
        base = generator.base_model(tiny_cfg, log=quiet)
        choices.pseudo_stage(tiny_cfg, log=quiet)
        first = generator.finetune_stage(tiny_cfg, base, log=quiet)
        adapter = out / "finetune" / "adapter" / "adapter_model.safetensors"
        stamp = adapter.stat().st_mtime_ns
        assert generator.finetune_stage(tiny_cfg, base, log=quiet) == first and adapter.stat().st_mtime_ns == stamp
        generator.generate_stage(tiny_cfg, base, first, log=quiet)
        key = json.loads((out / "candidates" / "stage.json").read_text())["key"]
        generator.finetune_stage(tiny_cfg, base.model_copy(update={"fingerprint": "another-base"}), log=quiet)
        assert adapter.stat().st_mtime_ns != stamp
        other = first.model_copy(update={"adapter_hash": "another"})
        changed = generator.generate_stage(tiny_cfg, base, other, log=quiet)
        assert json.loads((out / "candidates" / "stage.json").read_text())["key"] != key and changed.samples > 0


@pytest.mark.parametrize("kind", ["processes", pytest.param("dask", marks=pytest.mark.slow)])
def test_results_do_not_depend_on_the_runner(finished_run, tmp_path, kind):
    """Generation shards and downstream trainings as Prefect tasks on a process pool or a local Dask cluster give
    the local run's candidates and exactly its results."""
    if kind == "dask":
        pytest.importorskip("prefect_dask")
    from augment.config import RunnerConfig
    from flows.augment_flow import augment_flow

    cfg, metrics, run = finished_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns(".augment-run.lock"))
    for stage in ("candidates", "filter", "evaluation"):  # everything before is reused
        shutil.rmtree(copy / stage)
    other = cfg.model_copy(update={"publish": cfg.publish.model_copy(update={"output_dir": str(copy)}),
                                   "runner": RunnerConfig(kind=kind, workers=2)})
    again = augment_flow(config=other)
    strip = lambda res: {a: [{k: v for k, v in r.items() if k != "seconds"} for r in rs]  # noqa: E731
                         for a, rs in res["runs"].items()}
    from augment.generate import load_candidates

    a, b = load_candidates(copy / "candidates"), load_candidates(run / "candidates")
    assert a.meta.equals(b.meta) and np.array_equal(a.images, b.images)
    mine, theirs = (json.loads((d / "evaluation" / "results.json").read_text()) for d in (copy, run))
    assert strip(mine) == strip(theirs) and mine["selection"] == theirs["selection"]
    assert again.gain_over_best_baseline == metrics.gain_over_best_baseline


@pytest.mark.slow
def test_workers_pinned_to_different_devices_split_the_generation_and_evaluation_units(finished_run, tmp_path):
    """runner.devices: a local Dask cluster of one worker per GPU, each started with its own CUDA_VISIBLE_DEVICES
    (fake here: no GPU, device cpu), shares the generation shards and the downstream trainings; the results are the
    local run's."""
    pytest.importorskip("prefect_dask")
    from distributed import Client, get_task_stream

    from augment.config import RunnerConfig
    from flows.augment_flow import augment_flow, pinned_cluster, task_runner

    cfg, metrics, run = finished_run
    pinned = cfg.model_copy(update={"runner": RunnerConfig(kind="dask", devices=["0", "1"]), "device": "cpu"})
    runner = task_runner(pinned)
    assert runner.cluster_kwargs == {"devices": ["0", "1"], "strict": False}  # a CPU run: fake GPUs are fine
    copy = tmp_path / "run"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns(".augment-run.lock"))
    for stage in ("candidates", "filter", "evaluation"):
        shutil.rmtree(copy / stage)
    # The same cluster the runner builds, started here so that its task stream can be read after the flow
    with pinned_cluster(["0", "1"]) as cluster, Client(cluster) as client:
        seen = client.run(lambda: os.environ.get("CUDA_VISIBLE_DEVICES"))
        assert sorted(seen.values()) == ["0", "1"]
        with get_task_stream(client=client) as stream:
            other = pinned.model_copy(update={
                "publish": cfg.publish.model_copy(update={"output_dir": str(copy)}),
                "runner": RunnerConfig(kind="dask", address=cluster.scheduler_address)})
            again = augment_flow(config=other)
        by_device: dict[str, set[str]] = {}
        for t in stream.data:
            by_device.setdefault(seen[t["worker"]], set()).add(t["key"].split("-")[0])
    assert set(by_device) == {"0", "1"}, by_device
    for device, kinds in by_device.items():
        assert {"generate_task", "train_task"} <= kinds, (device, by_device)
    mine, theirs = (json.loads((d / "evaluation" / "results.json").read_text()) for d in (copy, run))
    strip = lambda res: {a: [{k: v for k, v in r.items() if k != "seconds"} for r in rs]  # noqa: E731
                         for a, rs in res["runs"].items()}
    assert strip(mine) == strip(theirs) and again.gain_over_best_baseline == metrics.gain_over_best_baseline


def test_flow_leaves_progress_report_and_summary_artifacts(finished_run):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    cfg, _, run = finished_run
    with get_client(sync_client=True) as client:
        arts = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(like_="augment-tiny-")))
    kinds = {a.key: a.type for a in arts}
    for key in ("pretraining", "finetuning", "generation", "evaluation"):
        assert kinds.get(f"augment-tiny-{key}") == "progress", (key, kinds)
    assert kinds.get("augment-tiny-summary") == "markdown" and kinds.get("augment-tiny-per-class") == "table"
    # the report itself, readable in the UI from any machine, saying where its figures are; no file:// link
    reports = [str(a.data) for a in arts if a.key == "augment-tiny-report"]  # every run's version
    assert kinds.get("augment-tiny-report") == "markdown"
    latest = reports[0] if len(reports) == 1 else next(d for d in reports if str((run / "report.html").resolve()) in d)
    assert "## Verdict" in latest and "| comparison |" in latest and "report_assets/" not in latest
    assert f"`{(run / 'report.html').resolve()}` on `" in latest and "file://" not in latest


def test_a_crashed_flow_run_is_retried_and_resumes(tiny_cfg, prefect_harness, monkeypatch):
    """The flow retries once; the retry reuses every stage that finished before the crash."""
    from augment import pipeline
    from flows.augment_flow import augment_flow

    real, calls = pipeline.STAGE["filter"].fn, {"n": 0}  # the function the stage declares

    def crash_once(*a, **k):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("worker lost")
        return real(*a, **k)

    from augment import generate as gen

    real_generate, generated = gen.generate, {"n": 0}

    def counting_generate(*a, **k):
        generated["n"] += 1
        return real_generate(*a, **k)

    import dataclasses
    import functools

    crashing = dataclasses.replace(pipeline.STAGE["filter"], fn=functools.wraps(real)(crash_once))
    monkeypatch.setattr(pipeline, "STAGES", tuple(crashing if s.name == "filter" else s for s in pipeline.STAGES))
    monkeypatch.setitem(pipeline.STAGE, "filter", crashing)
    monkeypatch.setattr(gen, "generate", counting_generate)
    metrics = augment_flow.with_options(retry_delay_seconds=0)(config=tiny_cfg)
    assert calls["n"] == 2 and metrics.generation.generated > 0
    assert generated["n"] == 1  # the retry reused the candidates of the crashed attempt


def test_rerunning_a_finished_job_returns_at_once(finished_run, capsys):
    """`augment run` on a folder holding a finished run of the same config and data does not start the flow."""
    from augment import pipeline
    from conftest import ROOT

    cfg, metrics, run = finished_run
    before = (run / "run.json").read_bytes()
    args = ["run", str(ROOT / "configs" / "tiny.yaml"), "--output-dir", str(run),
            "--set", f"base.cache_dir={cfg.base.cache_dir}", "--set", "generation.num_per_class=8",
            "--set", "filter.min_confidence=0.0", "--set", "filter.order=[memorization, near_duplicates]",
            "--set", "evaluation.seeds=3", "--set", "evaluation.diagnostic_seeds=2"]
    assert main(args) == 0
    out, err = capsys.readouterr()
    assert "nothing changed since the last run" in err and "paired difference" in out
    assert (run / "run.json").read_bytes() == before  # no stage ran, nothing was recorded
    changed = cfg.model_copy(update={"data": cfg.data.model_copy(update={"seed": cfg.data.seed + 1})})
    assert pipeline.finished(changed) is None  # other data: the flow runs
    assert pipeline.finished(cfg) is not None
    (run / "report.html").rename(run / "report.html.away")  # a deleted output is rebuilt by the flow
    try:
        assert pipeline.finished(cfg) is None
    finally:
        (run / "report.html.away").rename(run / "report.html")


def test_summary_artifact_prints_a_zero_bound_as_zero_and_a_missing_interval_as_na():
    from flows.augment_flow import _interval

    row = {"accuracy_mean": 0.02, "accuracy_ci_low": 0.0, "accuracy_ci_high": 0.05}
    assert _interval(row) == "[0.0, 5.0]"
    assert _interval({**row, "accuracy_ci_low": None, "accuracy_ci_high": None}) == "n/a"
