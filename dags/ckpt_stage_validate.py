"""ckpt_stage_validate: validate new model versions as they are registered, and sweep for the rest.

Runs when the webhook receiver records an event on the asset ``x-ckpt-stage://mlflow/model-version-created``
(MLflow's ``model_version.created``, with ``{name, version}`` in the event's ``extra``), and on a schedule
(``CKPT_STAGE_SWEEP_INTERVAL_S``, default every 5 minutes) that finds every version without a verdict:
no status, ``pending``, ``error``, or ``validating`` with an expired lease. Webhooks get lost (MLflow
drops a delivery after 3 retries and never redelivers); the sweep loses nothing.

Tasks: ``discover`` (the triggering events' versions that still need a verdict, plus the sweep's) →
``plan`` (sum of each version's S3 object sizes → worker class; the listing goes along, so the
validation does not list the objects again) → per class ``batch_<class>`` → ``validate_<class>``, one
mapped task instance per version in the class's pool and queue, so each version has its own log, state
and retries.

Under the CeleryExecutor each class has its queue (``ckpt-small``, ``ckpt-large`` by default, or as
``CKPT_STAGE_WORKER_CLASSES`` names them): start ``airflow celery worker --queues ckpt-large`` on hosts with
the large class's memory. ``discover``, ``plan`` and the ``batch_*`` tasks load nothing and run on the
smallest class's queue. A version above the largest class's budget is routed to the largest class, where
it is refused with RESOURCE_LIMIT before anything is loaded.

A model problem ends its task successfully with a quarantine recorded. An infrastructure failure that
may pass (S3 or MLflow unavailable, a lost worker) fails the task for Airflow to retry with exponential
backoff; a misconfiguration or a bug in the stage (INTERNAL_ERROR) fails it without retries. Either way
the version's verdict is recorded, and an ``error`` version stays eligible for the next sweep.

Pools must exist, one per worker class (``ckpt_stage_small``, ``ckpt_stage_large`` by default):
``airflow pools import infra/airflow/pools.json`` (tasks in a missing pool are never scheduled).
"""

from __future__ import annotations

import datetime as dt
import logging

from airflow.sdk import Asset, AssetOrTimeSchedule, DeltaTriggerTimetable, dag, get_current_context, task

from ckpt_stage import orchestrate
from ckpt_stage.config import Settings

log = logging.getLogger(__name__)

SETTINGS = Settings.from_env()

MODEL_VERSION_CREATED = Asset(name=orchestrate.REGISTRATIONS_ASSET_NAME, uri=orchestrate.REGISTRATIONS_ASSET_URI)


@dag(
    dag_id=orchestrate.VALIDATE_DAG_ID,
    schedule=AssetOrTimeSchedule(
        timetable=DeltaTriggerTimetable(dt.timedelta(seconds=SETTINGS.sweep_interval_s)),
        assets=[MODEL_VERSION_CREATED],
    ),
    start_date=dt.datetime(2026, 1, 1, tzinfo=dt.UTC),
    catchup=False,
    # One run at a time: asset events that arrive meanwhile queue up for the next run, and a sweep never
    # races another sweep for the same versions (the lease makes a race harmless, not free).
    max_active_runs=1,
    tags=["ckpt-stage", "mlflow"],
    doc_md=__doc__,
)
def ckpt_stage_validate():
    # Loads nothing: on the smallest class's queue, which every Celery deployment has workers for.
    @task(queue=orchestrate.control_queue(SETTINGS))
    def discover() -> list[dict[str, str]]:
        from ckpt_stage.registry import Registry

        context = get_current_context()
        extras = [event.extra for events in context["triggering_asset_events"].values() for event in events]
        conf = (context["dag_run"].conf or {}) if context.get("dag_run") else {}
        # A manual trigger may name versions too: {"versions": [{"name": "clf", "version": "3"}]}.
        extras += list(conf.get("versions") or [])
        event_refs = orchestrate.refs_from_extras(extras)
        refs = orchestrate.discover(Registry(SETTINGS), event_refs)
        log.info("%d version(s) named by events; %d to validate: %s", len(event_refs), len(refs),
                 ", ".join(map(str, refs)) or "none")
        return [r.to_dict() for r in refs]

    orchestrate.build_validation_tasks(discover(), force=False, settings=SETTINGS)


ckpt_stage_validate()
