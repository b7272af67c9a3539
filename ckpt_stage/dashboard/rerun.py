"""Re-runs asked for from the dashboard: through Airflow when it is configured, in-process otherwise.

With ``CKPT_STAGE_AIRFLOW_URL`` set, the request becomes a run of DAG ``ckpt_stage_rerun`` (conf
``{"model", "versions"}`` or ``{"status", "reason", "model"}``, the DAG's params) through Airflow's
REST API, so it runs where validations always run, with the same pools and logs. Without Airflow the
dashboard validates in a background thread (``pipeline.validate_version_safely(ref, force=True)``) and
the request returns at once; one worker thread, because each validation already uses a whole
isolated worker process and the MLflow write order must not interleave for one version.
"""

from __future__ import annotations

import concurrent.futures
import datetime as dt
import logging
import threading
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ckpt_stage.config import Settings
from ckpt_stage.dashboard.data import DashboardData
from ckpt_stage.domain import VersionRef
from ckpt_stage.errors import RerunError, RerunTooLarge, UsageError
from ckpt_stage.orchestrate import MAX_RERUN, RERUN_DAG_ID, RerunSelection

log = logging.getLogger(__name__)

MAX_VERSIONS = MAX_RERUN
"""One request re-runs at most this many versions, in-process or as a DAG run (the library's one limit)."""


class RerunRequest(RerunSelection):
    """The library's ``RerunSelection``; ``parse`` answers a bad body with ``RerunError(422)``."""

    @classmethod
    def parse(cls, body: Any) -> RerunRequest:
        try:
            sel = RerunSelection.parse(body)
        except RerunTooLarge as exc:
            raise RerunError(413, str(exc)) from exc
        except UsageError as exc:
            raise RerunError(422, str(exc)) from exc
        return cls(model=sel.model, versions=sel.versions, status=sel.status, reason=sel.reason)


@dataclass
class Job:
    id: str
    request: RerunRequest
    refs: list[VersionRef]
    requested_by: str
    created_at: str
    state: str = "queued"
    """queued → running → done (or failed when the job itself broke)."""
    results: list[dict[str, Any]] = field(default_factory=list)
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "job_id": self.id, "mode": "in-process", "state": self.state, "requested_by": self.requested_by,
            "created_at": self.created_at, "request": self.request.conf(),
            "versions": [r.to_dict() for r in self.refs], "done": len(self.results), "results": list(self.results),
            "error": self.error,
        }


class Rerunner:
    def __init__(self, settings: Settings, data: DashboardData, *,
                 validate: Callable[..., Any] | None = None, airflow_client: Callable[[Settings], Any] | None = None):
        """``validate`` and ``airflow_client`` (a class or factory taking settings) are for tests."""
        self.settings, self.data = settings, data
        self._validate = validate
        self._airflow_client = airflow_client
        self._jobs: OrderedDict[str, Job] = OrderedDict()
        self._active: dict[VersionRef, str] = {}
        self._lock = threading.Lock()
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="ckpt-stage-rerun")
        self._airflow: Any = None

    @property
    def mode(self) -> str:
        """``airflow`` when Airflow's URL and credentials are configured, else ``in-process``."""
        client = self._client()
        return "airflow" if client is not None and client.configured() else "in-process"

    def _client(self) -> Any:
        # One client for the app's lifetime: it caches Airflow's JWT and is thread-safe.
        if self._airflow is None and self.settings.airflow_url:
            from ckpt_stage.airflow_client import AirflowClient

            cls = self._airflow_client or AirflowClient
            self._airflow = cls(self.settings)
        return self._airflow

    def submit(self, req: RerunRequest, requested_by: str) -> dict[str, Any]:
        if self.mode == "airflow":
            return self._trigger_airflow(req, requested_by)
        return self._submit_local(req, requested_by)

    def _trigger_airflow(self, req: RerunRequest, requested_by: str) -> dict[str, Any]:
        conf = req.conf()
        try:
            result = self._client().trigger_dag(RERUN_DAG_ID, conf)
        except Exception as exc:  # noqa: BLE001 - Airflow refused or is down: tell the person, do not guess
            raise RerunError(502, f"Airflow did not accept the re-run of {req.describe()}: {exc}")
        run_id = None
        if isinstance(result, dict):
            run_id = result.get("dag_run_id") or result.get("run_id")
        elif isinstance(result, str):
            run_id = result
        base = self.settings.airflow_url.rstrip("/")
        link = f"{base}/dags/{RERUN_DAG_ID}/runs/{run_id}" if run_id else f"{base}/dags/{RERUN_DAG_ID}"
        log.info("re-run of %s triggered in Airflow by %s: %s", req.describe(), requested_by, run_id)
        return {"mode": "airflow", "dag_id": RERUN_DAG_ID, "dag_run_id": run_id, "conf": conf, "link": link,
                "requested_by": requested_by, "message": f"Airflow re-runs {req.describe()}"}

    def _resolve(self, req: RerunRequest) -> list[VersionRef]:
        try:
            return req.matching(self.data.registry, limit=MAX_VERSIONS)
        except RerunTooLarge as exc:
            raise RerunError(413, f"{req.describe()}: {exc}; or configure Airflow (CKPT_STAGE_AIRFLOW_URL) "
                                  "to run it as a DAG") from exc

    def _submit_local(self, req: RerunRequest, requested_by: str) -> dict[str, Any]:
        refs = self._resolve(req)
        if not refs:
            raise RerunError(404, f"nothing to re-run: no {req.describe()}")
        job = Job(uuid.uuid4().hex[:12], req, refs, requested_by,
                  dt.datetime.now(dt.UTC).isoformat(timespec="seconds").replace("+00:00", "Z"))
        with self._lock:
            # Pressing the button twice must not queue the same versions twice.
            fresh = [r for r in refs if r not in self._active]
            if not fresh:
                existing = self._jobs.get(self._active[refs[0]])
                doc = existing.to_dict() if existing else {"mode": "in-process", "state": "running"}
                return {**doc, "message": f"already re-running {req.describe()}"}
            job.refs = fresh
            for r in fresh:
                self._active[r] = job.id
            self._jobs[job.id] = job
            while len(self._jobs) > 100:
                self._jobs.popitem(last=False)
        log.info("re-run of %s (%d versions) queued in-process by %s", req.describe(), len(fresh), requested_by)
        self._pool.submit(self._run, job)
        return {**job.to_dict(), "message": f"re-running {req.describe()} in the dashboard process"}

    def _run(self, job: Job) -> None:
        if self._validate is None:
            from ckpt_stage.pipeline import validate_version_safely

            validate = validate_version_safely
        else:
            validate = self._validate
        job.state = "running"
        try:
            for ref in list(job.refs):
                try:
                    outcome = validate(ref, settings=self.settings, registry=self.data.registry, force=True)
                    report = getattr(outcome, "report", None)
                    job.results.append({
                        **ref.to_dict(),
                        "verdict": report.verdict.value if report else None,
                        "attempt": report.attempt if report else None,
                        "run_id": getattr(outcome, "run_id", None),
                        "skipped": getattr(outcome, "skipped", "") or None,
                    })
                except Exception as exc:  # noqa: BLE001 - one broken version must not stop the batch
                    log.exception("re-run of %s failed", ref)
                    job.results.append({**ref.to_dict(), "verdict": None, "error": f"{type(exc).__name__}: {exc}"})
                finally:
                    with self._lock:
                        self._active.pop(ref, None)
                    self.data.invalidate()
            job.state = "done"
        except BaseException as exc:  # noqa: BLE001 - record why the job stopped, then let it propagate
            job.state, job.error = "failed", f"{type(exc).__name__}: {exc}"
            raise

    def job(self, job_id: str) -> dict[str, Any] | None:
        with self._lock:
            job = self._jobs.get(job_id)
        return job.to_dict() if job else None

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        if self._airflow is not None and hasattr(self._airflow, "close"):
            self._airflow.close()
