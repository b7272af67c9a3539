"""ckpt_stage_validate: find registered versions without a verdict, validate each in its own task.

A thin caller of the library: discovery is ``Registry.sweepable()``, each mapped task is
``pipeline.validate_version``. Model problems end the task successfully with a quarantine recorded;
infrastructure failures raise for Airflow to retry; a bug fails the task without retries.
"""

from __future__ import annotations

import datetime as dt

from airflow.sdk import dag, task


@dag(
    dag_id="ckpt_stage_validate",
    schedule=dt.timedelta(minutes=5),
    start_date=dt.datetime(2026, 1, 1, tzinfo=dt.UTC),
    catchup=False,
    max_active_runs=1,
    tags=["ckpt-stage", "mlflow"],
    doc_md=__doc__,
)
def ckpt_stage_validate():
    @task
    def discover() -> list[dict[str, str]]:
        from ckpt_stage.config import Settings
        from ckpt_stage.registry import Registry

        return [v.ref.to_dict() for v in Registry(Settings.from_env()).sweepable()]

    @task(retries=3, retry_delay=dt.timedelta(seconds=30), retry_exponential_backoff=True,
          map_index_template="{{ task.op_kwargs['ref']['name'] }} v{{ task.op_kwargs['ref']['version'] }}")
    def validate(ref: dict[str, str]) -> dict:
        from airflow.exceptions import AirflowFailException

        from ckpt_stage.domain import ReasonCode, VersionRef
        from ckpt_stage.pipeline import validate_version

        outcome = validate_version(VersionRef(ref["name"], ref["version"]))
        if outcome.report is None:
            return {"skipped": outcome.skipped}
        report = outcome.report
        codes = sorted({f.code.value for f in report.reasons if f.code})
        if ReasonCode.INTERNAL_ERROR.value in codes:
            raise AirflowFailException(f"ckpt-stage bug while validating {ref}: {report.summary}")
        return {"verdict": report.verdict.value, "reasons": codes, "run_id": outcome.run_id}

    validate.expand(ref=discover())


ckpt_stage_validate()
