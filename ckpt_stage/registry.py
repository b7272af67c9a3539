"""MLflow adapter: find versions, claim them, record verdicts, move the alias.

The registry is the system of record (CONTRACT.md "What is recorded in MLflow"). Write order on a
verdict: the attempt's run and every other tag first, ``ckpt_stage.status`` last; on a pass the
status becomes ``promoted`` before the alias moves; on a quarantine the alias leaves the version
before its status becomes ``quarantined``. Every write is idempotent, so an overlapping or repeated
attempt is harmless: the last complete write wins.

MLflow's client retries HTTP calls by itself (``MLFLOW_HTTP_REQUEST_MAX_RETRIES``); this adapter does
not stack another retry loop on top, it only translates what is left into the stage's errors.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import os
import socket
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from ckpt_stage.config import Settings
from ckpt_stage.domain import Decision, Report, Status, Verdict, VersionRef
from ckpt_stage.errors import RegistryError, RegistryUnavailable, UsageError

# The client prints "🏃 View run … at: …" on stdout when a run ends; stdout belongs to --json.
os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")

log = logging.getLogger(__name__)

TAG = "ckpt_stage."
STATUS, REASONS, SUMMARY, ATTEMPT = TAG + "status", TAG + "reasons", TAG + "summary", TAG + "attempt"
VALIDATED_AT, RUN_ID, SHA256 = TAG + "validated_at", TAG + "run_id", TAG + "sha256"
LEASE_OWNER, LEASE_UNTIL = TAG + "lease_owner", TAG + "lease_until"
ARCH, ARCH_KWARGS = TAG + "arch", TAG + "arch_kwargs"

PAGE = 200


def now_utc() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def iso(t: dt.datetime) -> str:
    return t.astimezone(dt.UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def parse_iso(text: str) -> dt.datetime | None:
    try:
        t = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except (ValueError, AttributeError):
        return None
    return t if t.tzinfo else t.replace(tzinfo=dt.UTC)


def default_owner() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


@dataclass(frozen=True)
class VersionState:
    """A registered version as the stage sees it."""

    ref: VersionRef
    tags: dict[str, str] = field(default_factory=dict)
    source: str = ""
    run_id: str | None = None
    created_ms: int = 0
    aliases: tuple[str, ...] = ()

    @property
    def status(self) -> Status | None:
        raw = self.tags.get(STATUS)
        try:
            return Status(raw) if raw else None
        except ValueError:
            return None

    @property
    def attempt(self) -> int:
        try:
            return int(self.tags.get(ATTEMPT, "0") or 0)
        except ValueError:
            return 0

    @property
    def reasons(self) -> tuple[str, ...]:
        return tuple(r for r in self.tags.get(REASONS, "").split(",") if r)

    @property
    def lease_until(self) -> dt.datetime | None:
        return parse_iso(self.tags.get(LEASE_UNTIL, ""))

    def lease_active(self, at: dt.datetime | None = None) -> bool:
        until = self.lease_until
        return self.status is Status.VALIDATING and until is not None and until > (at or now_utc())

    def needs_validation(self, at: dt.datetime | None = None) -> bool:
        """What ``sweep`` picks: no status, pending, error, or validating with an expired lease."""
        status = self.status
        if status in (None, Status.PENDING, Status.ERROR):
            return True
        return status is Status.VALIDATING and not self.lease_active(at)


@contextlib.contextmanager
def translate(what: str) -> Iterator[None]:
    """MLflow/requests exceptions → the stage's errors (after the client's own retries)."""
    from mlflow.exceptions import MlflowException, RestException

    try:
        yield
    except MlflowException as exc:
        code = getattr(exc, "error_code", "") or ""
        text = str(exc)
        if code == "RESOURCE_DOES_NOT_EXIST":
            raise UsageError(f"{what}: {text}") from exc
        if code in ("INTERNAL_ERROR", "TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED") and (
            not isinstance(exc, RestException) or "API request" in text or code != "INTERNAL_ERROR"
            or "Max retries" in text
        ):
            raise RegistryUnavailable(f"{what}: MLflow kept failing: {text[:500]}") from exc
        if "API request to" in text or "Max retries exceeded" in text or "Connection" in text:
            raise RegistryUnavailable(f"{what}: MLflow kept failing: {text[:500]}") from exc
        raise RegistryError(f"{what}: {text[:500]}") from exc
    except OSError as exc:  # requests' ConnectionError derives from OSError
        raise RegistryUnavailable(f"{what}: cannot reach MLflow: {exc}") from exc


def _state(mv: Any) -> VersionState:
    return VersionState(
        ref=VersionRef(mv.name, str(mv.version)),
        tags=dict(mv.tags or {}),
        source=mv.source or "",
        run_id=mv.run_id or None,
        created_ms=int(mv.creation_timestamp or 0),
        aliases=tuple(getattr(mv, "aliases", ()) or ()),
    )


class Registry:
    """Thin adapter over ``MlflowClient``; the tracking URI comes from MLflow's own settings."""

    def __init__(self, settings: Settings, *, client: Any = None, tracking_uri: str | None = None):
        self.settings = settings
        self._client = client
        self._tracking_uri = tracking_uri
        self._experiment_id: str | None = None

    @property
    def client(self) -> Any:
        if self._client is None:
            from mlflow import MlflowClient

            self._client = MlflowClient(tracking_uri=self._tracking_uri)
        return self._client

    # -- reading -------------------------------------------------------------------------------
    def get(self, ref: VersionRef) -> VersionState:
        with translate(f"model {ref.name!r} version {ref.version}"):
            return _state(self.client.get_model_version(ref.name, ref.version))

    def download_uri(self, ref: VersionRef) -> str:
        with translate(f"resolving the files of {ref}"):
            return str(self.client.get_model_version_download_uri(ref.name, ref.version))

    def iter_versions(self, *, model: str | None = None, status: str | None = None,
                      reason: str | None = None) -> Iterator[VersionState]:
        clauses = []
        if model:
            clauses.append(f"name = '{_quote(model)}'")
        if status:
            clauses.append(f"tags.`{STATUS}` = '{_quote(status)}'")
        if reason:
            clauses.append(f"tags.`{REASONS}` LIKE '%{_quote(reason)}%'")
        filter_string = " and ".join(clauses) or None
        token = None
        while True:
            with translate("listing model versions"):
                page = self.client.search_model_versions(
                    filter_string=filter_string, max_results=PAGE, page_token=token
                )
            for mv in page:
                st = _state(mv)
                if reason and reason not in st.reasons:
                    continue
                yield st
            token = page.token
            if not token:
                return

    def sweepable(self) -> list[VersionState]:
        at = now_utc()
        out = [v for v in self.iter_versions() if v.needs_validation(at)]
        return sorted(out, key=lambda v: (v.ref.name, int(v.ref.version) if v.ref.version.isdigit() else 0))

    def alias_version(self, model: str) -> str | None:
        with translate(f"reading alias {self.settings.alias!r} of {model!r}"):
            try:
                return str(self.client.get_model_version_by_alias(model, self.settings.alias).version)
            except Exception as exc:  # noqa: BLE001 - no alias is a normal state
                if "RESOURCE_DOES_NOT_EXIST" in str(getattr(exc, "error_code", "")) or "not found" in str(exc).lower():
                    return None
                raise

    # -- claiming ------------------------------------------------------------------------------
    def claim(self, ref: VersionRef, owner: str, *, force: bool = False) -> VersionState | None:
        """Take the lease. Returns the state after the claim, or None when another owner holds it.

        Best effort (MLflow tags have no compare-and-set): write owner and deadline, re-read, and back
        off if another owner's write landed last.
        """
        state = self.get(ref)
        if not force and state.lease_active() and state.tags.get(LEASE_OWNER) not in ("", owner):
            log.info("%s is being validated by %s until %s; backing off", ref,
                     state.tags.get(LEASE_OWNER), state.tags.get(LEASE_UNTIL))
            return None
        until = now_utc() + dt.timedelta(seconds=self.settings.lease_s)
        self._set_tags(ref, {LEASE_OWNER: owner, LEASE_UNTIL: iso(until)})
        self._set_tags(ref, {STATUS: Status.VALIDATING.value})
        time.sleep(0.05)  # let a racing claimer's write land before the re-read
        again = self.get(ref)
        if again.tags.get(LEASE_OWNER) != owner:
            log.info("%s: lost the claim to %s", ref, again.tags.get(LEASE_OWNER))
            return None
        return state

    # -- recording -----------------------------------------------------------------------------
    def experiment_id(self) -> str:
        if self._experiment_id is None:
            name = self.settings.experiment
            with translate(f"experiment {name!r}"):
                exp = self.client.get_experiment_by_name(name)
                if exp is None:
                    try:
                        self._experiment_id = self.client.create_experiment(name)
                    except Exception:  # noqa: BLE001 - created concurrently by another worker
                        exp = self.client.get_experiment_by_name(name)
                        if exp is None:
                            raise
                        self._experiment_id = exp.experiment_id
                else:
                    self._experiment_id = exp.experiment_id
        return self._experiment_id

    def log_attempt(self, report: Report) -> str:
        """One MLflow run per attempt with ``report.json`` and metrics; returns its run id."""
        from mlflow.entities import Metric, Param, RunTag

        ref = report.model
        assert ref is not None
        data = report.to_dict()
        tags = {
            "ckpt_stage.model": ref.name, "ckpt_stage.version": ref.version,
            "ckpt_stage.verdict": report.verdict.value, "ckpt_stage.attempt": str(report.attempt),
            "ckpt_stage.reasons": ",".join(sorted({r.code.value for r in report.reasons if r.code})),
            "mlflow.runName": f"{ref.name}-v{ref.version}-attempt{report.attempt}",
        }
        # Who ran it (an Airflow task instance): the dashboard links the attempt to that task's log.
        for key, value in (report.extra.get("airflow") or {}).items():
            if value is not None:
                tags[f"airflow.{key}"] = str(value)
        ts = int(time.time() * 1000)
        metrics = [Metric(f"timings_s.{k}", float(v), ts, 0) for k, v in data["timings_s"].items()]
        metrics += [Metric(f"resources.{k}", float(v), ts, 0) for k, v in data["resources"].items()
                    if isinstance(v, int | float)]
        metrics.append(Metric("bytes", float(sum(f.size for f in report.files)), ts, 0))
        params = [Param("model", ref.name), Param("version", ref.version)]
        # No stdout redirect here (it would swap sys.stdout under other threads): the "View run" print
        # is switched off by MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT, set when this module is imported.
        with translate(f"recording the attempt of {ref}"):
            run = self.client.create_run(self.experiment_id(), tags=tags)
            run_id = run.info.run_id
            self.client.log_batch(run_id, metrics=metrics, params=params,
                                  tags=[RunTag("ckpt_stage.summary", report.summary[:500])])
            with tempfile.TemporaryDirectory() as tmp:
                path = os.path.join(tmp, "report.json")
                with open(path, "w") as fh:
                    json.dump(data, fh, indent=2, sort_keys=False)
                self.client.log_artifact(run_id, path)
            self.client.set_terminated(run_id, "FINISHED")
        return run_id

    def record(self, report: Report, decision: Decision, *, digest: str) -> str:
        """Write the verdict of one attempt, in the contract's order. Returns the run id."""
        ref = report.model
        assert ref is not None
        run_id = self.log_attempt(report)
        codes = ",".join(c.value for c in decision.codes)
        self._set_tags(ref, {
            REASONS: codes,
            SUMMARY: report.summary[:500],
            ATTEMPT: str(report.attempt),
            VALIDATED_AT: iso(now_utc()),
            RUN_ID: run_id,
            SHA256: digest,
        })
        if decision.verdict is Verdict.PASS:
            self._set_tags(ref, {STATUS: Status.PROMOTED.value})
            self.sync_alias(ref.name)
        elif decision.verdict in (Verdict.QUARANTINE, Verdict.SKIP):  # neither may hold the alias
            self.sync_alias(ref.name, excluding=ref.version)
            self._set_tags(ref, {STATUS: Status.for_verdict(decision.verdict).value})
        else:
            self._set_tags(ref, {STATUS: Status.ERROR.value})
        self._clear_lease(ref)
        return run_id

    def record_error_status(self, ref: VersionRef, summary: str) -> None:
        """Last resort when a full record failed: leave the version eligible for a re-run."""
        self._set_tags(ref, {SUMMARY: summary[:500], VALIDATED_AT: iso(now_utc())})
        self._set_tags(ref, {STATUS: Status.ERROR.value})
        self._clear_lease(ref)

    def sync_alias(self, model: str, *, excluding: str | None = None) -> str | None:
        """Point the alias at the highest promoted version (never ``excluding``); remove it if none."""
        promoted = [
            int(v.ref.version) for v in self.iter_versions(model=model, status=Status.PROMOTED.value)
            if v.ref.version != excluding and v.ref.version.isdigit()
        ]
        target = str(max(promoted)) if promoted else None
        current = self.alias_version(model)
        with translate(f"moving alias {self.settings.alias!r} of {model!r}"):
            if target is None:
                if current is not None:
                    self.client.delete_registered_model_alias(model, self.settings.alias)
            elif current != target:
                self.client.set_registered_model_alias(model, self.settings.alias, target)
        return target

    def _clear_lease(self, ref: VersionRef) -> None:
        with translate(f"clearing the lease of {ref}"):
            for key in (LEASE_OWNER, LEASE_UNTIL):
                with contextlib.suppress(Exception):
                    self.client.delete_model_version_tag(ref.name, ref.version, key)

    def _set_tags(self, ref: VersionRef, tags: dict[str, str]) -> None:
        with translate(f"tagging {ref}"):
            for key, value in tags.items():
                self.client.set_model_version_tag(ref.name, ref.version, key, value)

    def report_of(self, run_id: str) -> dict[str, Any] | None:
        """The ``report.json`` an attempt's run holds, or None when it has none (or it is unreadable)."""
        with translate(f"reading report.json of run {run_id}"):
            return _load_json_artifact(self.client, run_id)

    def attempts(self, ref: VersionRef) -> list[dict[str, Any]]:
        """Every recorded attempt's run (newest first), without the reports."""
        exp = self.experiment_id()
        flt = f"tags.`ckpt_stage.model` = '{_quote(ref.name)}' and tags.`ckpt_stage.version` = '{_quote(ref.version)}'"
        with translate(f"listing attempts of {ref}"):
            runs = self.client.search_runs([exp], filter_string=flt, order_by=["attributes.start_time DESC"],
                                           max_results=100)
        return [{"run_id": r.info.run_id, "start_time": r.info.start_time, "tags": dict(r.data.tags),
                 "metrics": dict(r.data.metrics)} for r in runs]


def _load_json_artifact(client: Any, run_id: str) -> dict[str, Any] | None:
    with tempfile.TemporaryDirectory() as tmp:
        try:
            path = client.download_artifacts(run_id, "report.json", tmp)
        except Exception as exc:  # noqa: BLE001 - a run without a report is shown as such
            log.warning("run %s has no readable report.json: %s", run_id, exc)
            return None
        with open(path) as fh:
            return json.load(fh)


def _quote(text: str) -> str:
    return text.replace("\\", "\\\\").replace("'", "\\'")
