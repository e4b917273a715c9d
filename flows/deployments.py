"""Deployments: serve the augment flow on a cron schedule, on demand (`run_deployment`), or on an event.

    augment serve configs/digits.yaml --cron "0 2 * * *" --trigger-event dataset.labeled.updated

keeps a process running that executes scheduled and triggered runs. From a data pipeline:

    from prefect.deployments import run_deployment
    run_deployment("augment/digits", parameters={"config": {...}})       # or with no parameters: the defaults

or emit the event the deployment listens for:

    from prefect.events import emit_event
    emit_event(event="dataset.labeled.updated", resource={"prefect.resource.id": "my-dataset"})
"""

from __future__ import annotations

from augment.config import RunConfig
from flows.augment_flow import augment_flow


def build_triggers(trigger_event: str | None) -> list:
    if not trigger_event:
        return []
    from prefect.events import DeploymentEventTrigger

    return [DeploymentEventTrigger(expect={trigger_event}, match={"prefect.resource.id": "*"})]


def serve(cfg: RunConfig, name: str | None = None, cron: str | None = None, trigger_event: str | None = None):
    augment_flow.serve(
        name=name or cfg.name,
        cron=cron,
        triggers=build_triggers(trigger_event),
        parameters={"config": cfg.model_dump(mode="json")},
        description=f"augment job {cfg.name!r}",
    )
