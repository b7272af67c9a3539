"""ckpt_stage_recheck: re-check promoted versions against what their verdict validated.

A verdict is about bytes, but the alias points at an S3 location that can be written to after the
verdict. On the sweep's schedule (``CKPT_STAGE_SWEEP_INTERVAL_S``, default every 5 minutes), one task
lists each promoted version's objects (no download) and compares them with the manifest in its
``report.json``; a version whose objects changed, were added or removed loses the alias (to the highest
remaining promoted version) and is quarantined with ``INTEGRITY_MISMATCH``. A re-run
(``ckpt_stage_rerun``) validates the new bytes as a new attempt. ``ckpt-stage sweep`` and
``ckpt-stage recheck`` run the same pass from the command line.

The task fails (and Airflow retries it) when some versions could not be checked (S3 or MLflow
unavailable); versions that could be checked are decided either way.
"""

from __future__ import annotations

import datetime as dt
import logging

from airflow.sdk import DeltaTriggerTimetable, dag, task

from ckpt_stage.config import Settings

log = logging.getLogger(__name__)

SETTINGS = Settings.from_env()
RECHECK_DAG_ID = "ckpt_stage_recheck"


@dag(
    dag_id=RECHECK_DAG_ID,
    schedule=DeltaTriggerTimetable(dt.timedelta(seconds=SETTINGS.sweep_interval_s)),
    start_date=dt.datetime(2026, 1, 1, tzinfo=dt.UTC),
    catchup=False,
    max_active_runs=1,
    tags=["ckpt-stage", "mlflow"],
    doc_md=__doc__,
)
def ckpt_stage_recheck():
    # Fewer retries than a validation (the next sweep re-checks anyway); the delays are the settings'.
    @task(retries=min(2, SETTINGS.task_retries), retry_delay=dt.timedelta(seconds=SETTINGS.task_retry_delay_s),
          retry_exponential_backoff=2.0, max_retry_delay=dt.timedelta(seconds=SETTINGS.task_max_retry_delay_s))
    def recheck() -> dict[str, int]:
        from ckpt_stage.integrity import recheck_promoted

        results = recheck_promoted(settings=SETTINGS)
        counts = {k: sum(1 for r in results if r.outcome == k) for k in ("same", "quarantined", "skipped", "error")}
        for r in results:
            if r.outcome != "same":
                log.warning("%s: %s %s", r.ref, r.outcome, r.message)
        log.info("re-checked %d promoted version(s): %s", len(results), counts)
        if counts["error"]:
            raise RuntimeError(f"{counts['error']} promoted version(s) could not be re-checked; see the log above")
        return counts

    recheck()


ckpt_stage_recheck()
