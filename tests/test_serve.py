"""Served deployments against a real Prefect server: what a team's pipeline does.

A `prefect server start` on 127.0.0.1 (its own PREFECT_HOME), `augment serve` in a subprocess, then:
run_deployment with a partial config and overrides, the trigger event with overrides in its payload, the cron
schedule, and the `augment.dataset.published` event each run emits. Every served run used to fail before its first
stage (`from __future__ import annotations` in the flow module).
"""

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from conftest import ROOT

DEPLOYMENT = "augment/tiny-served"
EVENT = "test.labeled.updated"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(predicate, timeout: float, what: str, procs=()):
    t0 = time.time()
    while time.time() - t0 < timeout:
        for p in procs:
            if p.poll() is not None:
                raise AssertionError(f"{what}: process exited early with {p.returncode}")
        value = predicate()
        if value:
            return value
        time.sleep(1.0)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A real Prefect server and `augment serve` of the tiny config; yields (api_url, run folder)."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    tmp = tmp_path_factory.mktemp("serve")
    url = f"http://127.0.0.1:{_free_port()}/api"
    env = {**os.environ, "PREFECT_HOME": str(tmp / "prefect-home"), "PREFECT_API_URL": url,
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_UI_ENABLED": "false",
           "PREFECT_SERVER_API_HOST": "127.0.0.1", "PREFECT_SERVER_API_PORT": url.split(":")[2].split("/")[0],
           "PYTHONPATH": str(ROOT)}
    logs = open(tmp / "server.log", "w")
    server = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                               "--port", env["PREFECT_SERVER_API_PORT"]], env=env, stdout=logs, stderr=logs,
                              cwd=tmp)
    procs = [server]
    try:
        _wait(lambda: _healthy(url), 180, "the Prefect server", procs)
        out = tmp / "run"
        serve_log = open(tmp / "serve.log", "w")
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "flows.cli", "serve", str(ROOT / "configs" / "tiny.yaml"), "--name",
             "tiny-served", "--cron", "0 3 * * *", "--trigger-event", EVENT,
             "--set", f"publish.output_dir={out}", "--set", f"base.cache_dir={tmp / 'cache'}"],
            env=env, stdout=serve_log, stderr=serve_log, cwd=tmp))
        with temporary_settings({PREFECT_API_URL: url}):
            yield url, out, procs, tmp
    finally:
        for p in reversed(procs):
            p.terminate()
        for p in procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()


def _deployment(procs):
    from prefect.client.orchestration import get_client

    def read():
        with get_client(sync_client=True) as client:
            try:
                return client.read_deployment_by_name(DEPLOYMENT)
            except Exception:  # not registered yet
                return None

    return _wait(read, 120, "the served deployment", procs)


def _logs(tmp: Path) -> str:
    return "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(tmp.glob("*.log")))


def test_served_deployment_runs_with_merged_config_and_overrides(served):
    from prefect.deployments import run_deployment

    url, out, procs, tmp = served
    dep = _deployment(procs)
    assert [s.schedule.cron for s in dep.schedules] == ["0 3 * * *"]
    assert dep.global_concurrency_limit is not None and dep.global_concurrency_limit.limit == 1

    # A partial config changes only what it names; overrides apply on top; the run is checked, not assumed.
    run = run_deployment(DEPLOYMENT, parameters={"config": {"generation": {"num_per_class": 3}},
                                                 "overrides": ["generation.seed=7"]}, timeout=600)
    assert run.state.is_completed(), f"{run.state}\n{_logs(tmp)}"
    used = yaml.safe_load((out / "config.yaml").read_text())
    assert used["generation"]["num_per_class"] == 3 and used["generation"]["seed"] == 7
    assert used["publish"]["output_dir"] == str(out) and used["name"] == "tiny"  # the deployment's, kept
    import datasets

    train = datasets.load_from_disk(str(out / "dataset"))["train"]
    assert len(train) > 0


@pytest.mark.slow
def test_the_documented_pattern_catches_refused_parameters_and_failed_runs(served):
    """The run_deployment pattern of docs/orchestration.md. A config that fails the deployment's parameter schema is
    refused by the server (HTTP 409) before any run exists, so run_deployment raises; a bad override is only seen by
    the flow, whose run fails and is returned."""
    from prefect.deployments import run_deployment
    from prefect.exceptions import PrefectHTTPStatusError

    _deployment(served[2])  # registered by `augment serve` (this test may run first)
    with pytest.raises(PrefectHTTPStatusError) as refused:
        run_deployment(DEPLOYMENT, parameters={"config": {"lora": {"rank": 0}}}, timeout=60)
    assert refused.value.response.status_code == 409 and "rank" in refused.value.response.text
    run = run_deployment(DEPLOYMENT, parameters={"overrides": ["lora.rank=0"]}, timeout=600)
    assert run.state.is_failed() and "lora.rank" in (run.state.message or ""), run.state
    assert run.run_count == 1  # a user error is not retried (a crash is, once)


@pytest.mark.slow
def test_trigger_event_starts_a_run_with_the_payload_overrides(served):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    url, out, procs, tmp = served
    dep = _deployment(procs)
    time.sleep(3)  # the automation is registered with the deployment; give the trigger service a moment
    # Emitted from another process, as a data pipeline would (this process's events worker may already be bound
    # to the flow tests' temporary server).
    emit = ("from prefect.events import emit_event; emit_event(event=%r, resource={'prefect.resource.id': "
            "'dataset.tiny'}, payload={'overrides': ['generation.seed=11']})" % EVENT)
    subprocess.run([sys.executable, "-c", emit], env={**os.environ, "PREFECT_API_URL": url}, check=True,
                   timeout=120)

    def triggered_run():
        with get_client(sync_client=True) as client:
            runs = client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[dep.id])))
        mine = [r for r in runs if r.parameters.get("overrides") == ["generation.seed=11"]]
        return mine[0] if mine and mine[0].state and mine[0].state.is_final() else None

    run = _wait(triggered_run, 300, "the event-triggered run to finish", procs)
    assert run.state.is_completed(), f"{run.state}\n{_logs(tmp)}"
    assert yaml.safe_load((out / "config.yaml").read_text())["generation"]["seed"] == 11


def test_every_served_run_announces_its_dataset(served):
    from prefect.client.orchestration import get_client
    from prefect.events.filters import EventFilter, EventNameFilter, EventOccurredFilter
    from datetime import datetime, timedelta, timezone

    from flows.augment_flow import PUBLISHED_EVENT

    url, out, procs, tmp = served

    def published():
        with get_client(sync_client=True) as client:
            now = datetime.now(timezone.utc)
            page = client.read_events(EventFilter(
                event=EventNameFilter(name=[PUBLISHED_EVENT]),
                occurred=EventOccurredFilter(since=now - timedelta(hours=1), until=now + timedelta(hours=1))), limit=50)
        return page.events

    events = _wait(published, 60, "the published event", procs)
    e = events[0]
    assert e.resource.id == f"augment.dataset.{(out / 'dataset').resolve()}"
    assert e.payload["job"] == "tiny" and e.payload["rows"]["test"] > 0
    assert e.payload["verdict"] and len(e.payload["config_hash"]) == 16


@pytest.mark.slow
def test_deploy_to_a_process_work_pool_runs_on_a_worker(served):
    """`augment deploy` to a process work pool; a `prefect worker` pulls the run from the checkout and executes it."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.deployments import run_deployment

    url, _, procs, tmp = served
    env = {**os.environ, "PREFECT_API_URL": url, "PREFECT_HOME": str(tmp / "prefect-home"), "PYTHONPATH": str(ROOT)}
    with get_client(sync_client=True) as client:
        client.create_work_pool(WorkPoolCreate(name="augment-test-pool", type="process"))
    out = tmp / "pool-run"
    done = subprocess.run(
        [sys.executable, "-m", "flows.cli", "deploy", str(ROOT / "configs" / "tiny.yaml"), "--pool",
         "augment-test-pool", "--name", "tiny-pool", "--set", f"publish.output_dir={out}",
         "--set", f"base.cache_dir={tmp / 'cache'}"], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "augment/tiny-pool" in done.stdout
    worker_log = open(tmp / "worker.log", "w")
    procs.append(subprocess.Popen([sys.executable, "-m", "prefect", "worker", "start", "--pool", "augment-test-pool"],
                                  env=env, stdout=worker_log, stderr=worker_log, cwd=tmp))
    run = run_deployment("augment/tiny-pool", parameters={"overrides": ["generation.num_per_class=2"]}, timeout=600)
    assert run.state.is_completed(), f"{run.state}\n{_logs(tmp)}"
    assert yaml.safe_load((out / "config.yaml").read_text())["generation"]["num_per_class"] == 2
    assert (out / "dataset" / "augment_publish.json").exists()


def test_prefect_yaml_registers_its_deployment(served):
    """The shipped prefect.yaml works with `prefect deploy`: schedule, queueing limit, partial config, pull step."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate

    url, _, procs, tmp = served
    with get_client(sync_client=True) as client:
        client.create_work_pool(WorkPoolCreate(name="augment-local", type="process"))
    env = {**os.environ, "PREFECT_API_URL": url, "PREFECT_HOME": str(tmp / "prefect-home"), "PWD": str(ROOT)}
    done = subprocess.run([sys.executable, "-m", "prefect", "--no-prompt", "deploy", "--name", "digits-nightly"],
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    with get_client(sync_client=True) as client:
        dep = client.read_deployment_by_name("augment/digits-nightly")
    assert [s.schedule.cron for s in dep.schedules] == ["0 2 * * *"]
    assert dep.global_concurrency_limit.limit == 1 and dep.work_pool_name == "augment-local"
    assert dep.parameters["config"]["name"] == "digits" and dep.parameters["overrides"] == []
    steps = [s for step in dep.pull_steps for s in step.values()]
    assert steps and steps[0]["directory"] == str(ROOT)
