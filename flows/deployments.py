"""Deployments: serve the augment flow on a cron schedule, on demand (`run_deployment`), or on an event.

    augment serve configs/digits.yaml --cron "0 2 * * *" --trigger-event dataset.labeled.updated

keeps a process running that executes scheduled and triggered runs. From a data pipeline:

    from prefect.deployments import run_deployment
    run = run_deployment("augment/digits", parameters={"overrides": ["data.source=/data/new"]})
    assert run.state.is_completed(), run.state.message      # run_deployment does not raise on failure

or emit the event the deployment listens for; its payload may carry overrides for that run:

    from prefect.events import emit_event
    emit_event(event="dataset.labeled.updated", resource={"prefect.resource.id": "dataset.cats"},
               payload={"overrides": ["data.source=/data/cats-2026-11-26"]})

At most one run per deployment executes at a time (`limit`, default 1); further runs wait in the queue
(collision strategy ENQUEUE), and a lock on the run folder keeps runs of other deployments out of it too.

`deploy` registers the same deployment for a work pool instead, so that workers (a process worker here, Docker
or Kubernetes workers, a GPU machine for the Stable Diffusion config) pull and execute its runs:

    prefect work-pool create augment-local --type process
    augment deploy configs/digits.yaml --pool augment-local --cron "0 2 * * *"
    prefect worker start --pool augment-local
"""

from pathlib import Path

from augment.config import RunConfig
from flows.augment_flow import augment_flow

ROOT = Path(__file__).resolve().parents[1]
ENTRYPOINT = "flows/augment_flow.py:augment_flow"

# The trigger's parameters are rendered from the event: `overrides` is the event payload's `overrides` list (or
# empty), parsed as JSON after the Jinja template is rendered.
EVENT_OVERRIDES = {"__prefect_kind": "json", "value": {
    "__prefect_kind": "jinja", "template": "{{ event.payload.get('overrides', []) | tojson }}"}}


def build_triggers(trigger_event: str | None) -> list:
    if not trigger_event:
        return []
    from prefect.events import DeploymentEventTrigger

    return [DeploymentEventTrigger(expect={trigger_event}, match={"prefect.resource.id": "*"},
                                   parameters={"overrides": EVENT_OVERRIDES})]


def _limit(limit: int):
    from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy

    return ConcurrencyLimitConfig(limit=limit, collision_strategy=ConcurrencyLimitStrategy.ENQUEUE)


def deploy(cfg: RunConfig, pool: str, name: str | None = None, cron: str | None = None,
           trigger_event: str | None = None, limit: int = 1, source: str | None = None,
           image: str | None = None, job_variables: dict | None = None):
    """Register the flow as a deployment of work pool `pool`; returns the deployment id.

    `source`: where workers get the code (default: this checkout, for process workers on this machine; a git URL
    for remote workers). `image`: the container image of Docker/Kubernetes pools (built and pushed by you)."""
    flow = augment_flow.from_source(source=source or str(ROOT), entrypoint=ENTRYPOINT)
    return flow.deploy(
        name=name or cfg.name, work_pool_name=pool, image=image, build=False, push=False,
        job_variables=job_variables, cron=cron, triggers=build_triggers(trigger_event),
        parameters={"config": cfg.model_dump(mode="json"), "overrides": []}, concurrency_limit=_limit(limit),
        description=f"augment job {cfg.name!r}", print_next_steps=False,
    )


def serve(cfg: RunConfig, name: str | None = None, cron: str | None = None, trigger_event: str | None = None,
          limit: int = 1):
    augment_flow.serve(
        name=name or cfg.name,
        cron=cron,
        triggers=build_triggers(trigger_event),
        parameters={"config": cfg.model_dump(mode="json"), "overrides": []},
        global_limit=_limit(limit),
        description=f"augment job {cfg.name!r}",
    )
