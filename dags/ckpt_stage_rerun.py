"""ckpt_stage_rerun: validate chosen versions again, by hand (trigger form, REST API, dashboard button).

Choose either a model and its versions, or every version with a status (``quarantined``, ``error``, ``skipped``, or
``promoted`` after a runtime upgrade), optionally only those whose reasons include one reason code and
only of one model. The run conf has the same shape as the form::

    {"model": "clf", "versions": ["3", "4"]}
    {"status": "quarantined", "reason": "SHAPE_MISMATCH", "model": null}

Each re-run is a new attempt (``ckpt_stage.attempt`` + 1, taking the lease even if one is held) with its own
MLflow run; earlier attempts' runs and reports stay. The versions are sized and validated in their
worker class's pool exactly like ``ckpt_stage_validate`` does.
"""

from __future__ import annotations

import logging

from airflow.sdk import Param, dag, get_current_context, task

from ckpt_stage import orchestrate
from ckpt_stage.config import Settings
from ckpt_stage.domain import ReasonCode

log = logging.getLogger(__name__)

SETTINGS = Settings.from_env()


@dag(
    dag_id=orchestrate.RERUN_DAG_ID,
    schedule=None,
    catchup=False,
    tags=["ckpt-stage", "mlflow"],
    doc_md=__doc__,
    params={
        "model": Param(
            None, type=["null", "string"], title="Model",
            description="Registered model name: required with versions; with a status, only this model.",
        ),
        "versions": Param(
            [], type="array", items={"type": "string", "pattern": "^[0-9]+$"}, title="Versions",
            description="Version numbers of the model, one per line. Leave empty to select by status.",
        ),
        "status": Param(
            None, type=["null", "string"], enum=[None, *orchestrate.RERUN_STATUSES], title="Status",
            description="Re-run every version with this status (instead of versions).",
        ),
        "reason": Param(
            None, type=["null", "string"], enum=[None, *ReasonCode.__members__], title="Reason code",
            description="With a status: only versions whose reasons include this code.",
        ),
    },
)
def ckpt_stage_rerun():
    @task(queue=orchestrate.control_queue(SETTINGS))  # loads nothing: the smallest class's queue
    def select() -> list[dict[str, str]]:
        from airflow.sdk.exceptions import AirflowFailException

        from ckpt_stage.errors import UsageError
        from ckpt_stage.registry import Registry

        params = dict(get_current_context()["params"])
        try:
            refs = orchestrate.select_for_rerun(Registry(SETTINGS), params)
        except UsageError as exc:
            # A wrong form is not worth retrying.
            raise AirflowFailException(f"cannot select versions to re-run: {exc}") from exc
        log.info("re-running %d version(s): %s", len(refs), ", ".join(map(str, refs)) or "none")
        return [r.to_dict() for r in refs]

    orchestrate.build_validation_tasks(select(), force=True, settings=SETTINGS, verb="rerun")


ckpt_stage_rerun()
