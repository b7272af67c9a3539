"""MLflow adapter: find versions, claim them, record verdicts, move the alias.

The registry is the system of record (docs/contract.md "What is recorded in MLflow"). Write order on a
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
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from ckpt_stage.config import Settings
from ckpt_stage.domain import Decision, Report, Status, Verdict, VersionRef
from ckpt_stage.errors import CkptStageError, RegistryConflict, RegistryError, RegistryUnavailable, UsageError
from ckpt_stage.registry.tags import (
    ATTEMPT,
    ATTEMPT_ID,
    LEASE_OWNER,
    LEASE_UNTIL,
    MANIFEST_SHA256,
    REASONS,
    RUN_ID,
    RUN_MODEL,
    RUN_VERSION,
    SHA256,
    STATUS,
    SUMMARY,
    VALIDATED_AT,
    VERDICT,
    VersionState,
    iso,
    now_utc,
)

log = logging.getLogger(__name__)

PAGE = 1000
"""Versions per search request (MLflow pages by offset: fewer, larger pages cost the server less in all)."""

# Statuses that are a verdict: a claim that finds one of them recorded meanwhile gives up.
_DECIDED = (Status.PROMOTED, Status.QUARANTINED)

# MLflow's client reads these per request; the stage sets defaults from its settings (see configure_client).
_CLIENT_ENV = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "mlflow_max_retries",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "mlflow_backoff_factor",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "mlflow_timeout_s",
}


def configure_client(settings: Settings, env: Any = None) -> dict[str, str]:
    """Give MLflow's own HTTP retries the stage's defaults, without overriding what the operator set.

    MLflow's defaults (7 retries, backoff factor 2, 120 s timeout) are made for riding out minutes of
    rate limiting; under a flaky connection each reset then waits out the backoff, and a hung server
    holds a call for two minutes. The client is the only retry loop around MLflow calls (the stage adds
    none, see docs/architecture.md), so its budget is the stage's: a few quick retries, a bounded timeout.
    Returns what it set of those (it also switches MLflow's "View run" print off, as a default).
    """
    env = os.environ if env is None else env
    # The client prints "🏃 View run … at: …" on stdout when a run ends; stdout belongs to --json.
    env.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    out = {}
    for var, attr in _CLIENT_ENV.items():
        if not env.get(var):
            env[var] = out[var] = str(int(getattr(settings, attr)))
    return out


def default_owner() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


_CONFLICT_MARKERS = ("UniqueViolation", "duplicate key value", "UNIQUE constraint failed", "Duplicate entry",
                     "could not serialize access", "deadlock detected")


@contextlib.contextmanager
def translate(what: str) -> Iterator[None]:
    """Whatever a registry call raises → the stage's errors, classified once (after the client's own retries).

    MLflow's artifact calls (``report.json``) go to S3 through MLflow's artifact repository: their boto3 /
    botocore errors are S3's and are classified by the storage adapter as ``STORAGE_*``, never as MLflow.
    """
    from mlflow.exceptions import MlflowException, RestException

    from ckpt_stage.storage import classify_s3_error as classify_storage, is_storage_error

    try:
        yield
    except CkptStageError:
        raise
    except MlflowException as exc:
        code = getattr(exc, "error_code", "") or ""
        text = str(exc)
        cause = exc.__cause__ or exc.__context__
        if cause is not None and is_storage_error(cause):
            raise classify_storage(cause, what=what) from exc
        if code == "RESOURCE_DOES_NOT_EXIST":
            raise UsageError(f"{what}: {text}") from exc
        if any(marker in text for marker in _CONFLICT_MARKERS):
            # Two first writes of one tag at once: PostgreSQL refuses the second insert (MLflow merges rows
            # with a read-then-insert). The same write succeeds a moment later.
            raise RegistryConflict(f"{what}: a concurrent write to the same row: {text[:300]}") from exc
        if code in ("INTERNAL_ERROR", "TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED") and (
            not isinstance(exc, RestException) or "API request" in text or code != "INTERNAL_ERROR"
            or "Max retries" in text
        ):
            raise RegistryUnavailable(f"{what}: MLflow kept failing: {text[:500]}") from exc
        if "API request to" in text or "Max retries exceeded" in text or "Connection" in text:
            raise RegistryUnavailable(f"{what}: MLflow kept failing: {text[:500]}") from exc
        raise RegistryError(f"{what}: {text[:500]}") from exc
    except Exception as exc:
        if is_storage_error(exc):
            raise classify_storage(exc, what=what) from exc
        import requests

        if isinstance(exc, OSError | requests.RequestException):  # requests' ConnectionError is an OSError
            raise RegistryUnavailable(f"{what}: cannot reach MLflow: {exc}") from exc
        raise


def _state(mv: Any) -> VersionState:
    return VersionState(
        ref=VersionRef(mv.name, str(mv.version)),
        tags=dict(mv.tags or {}),
        source=mv.source or "",
        run_id=mv.run_id or None,
        created_ms=int(mv.creation_timestamp or 0),
        aliases=tuple(getattr(mv, "aliases", ()) or ()),
    )


def _prompt_check_once(client: Any) -> Any:
    """MLflow 3's client reads the registered model before every tag write, tag delete and alias call
    (``MlflowClient._raise_if_prompt``: is this name a prompt rather than a model?): 13 of the 48
    requests of one verdict. A name that passed once is a model for this client's life (one validation,
    one sweep): later checks of it are skipped. Without that private method, nothing changes."""
    real = getattr(client, "_raise_if_prompt", None)
    if real is None:
        return client
    models: set[str] = set()

    def once(name: str) -> None:
        if name not in models:
            real(name)
            models.add(name)

    client._raise_if_prompt = once
    return client


def concurrently(*calls: Callable[[], Any]) -> list[Any]:
    """Run independent registry calls at once (each already translated), results in order. Every call
    runs to its end; the first failure (in the order given) is raised after all finished, so nothing
    is left in flight behind the caller. One call runs inline."""
    if len(calls) <= 1:
        return [call() for call in calls]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=min(len(calls), PARALLEL_WRITES), thread_name_prefix="ckpt-mlflow") as pool:
        futures = [pool.submit(call) for call in calls]
    for f in futures:
        f.result()  # the first failure, in the order given
    return [f.result() for f in futures]


PARALLEL_WRITES = 8
"""MLflow requests of one attempt in flight at once (independent tag writes, reads; MLflow's HTTP
pool holds 10 connections per host by default)."""

REPORT_CACHE = 64
"""Reports kept in memory per Registry (each a few KB; a model's promoted version is read by every
validation of the model in a sweep)."""


class Registry:
    """Thin adapter over ``MlflowClient``; the tracking URI comes from MLflow's own settings."""

    def __init__(self, settings: Settings, *, client: Any = None, tracking_uri: str | None = None):
        self.settings = settings
        self._client = client
        self._tracking_uri = tracking_uri
        self._experiment_id: str | None = None
        self._lock = threading.Lock()
        self._reports: dict[str, dict[str, Any]] = {}
        """report.json by run id: an attempt's report is written once, with its run, and never again,
        so one sweep reads the promoted version's report (drift) once, not once per version."""
        configure_client(settings)

    @property
    def client(self) -> Any:
        if self._client is None:
            from mlflow import MlflowClient

            self._client = _prompt_check_once(MlflowClient(tracking_uri=self._tracking_uri))
        return self._client

    # -- reading -------------------------------------------------------------------------------
    def get(self, ref: VersionRef) -> VersionState:
        with translate(f"model {ref.name!r} version {ref.version}"):
            return _state(self.client.get_model_version(ref.name, ref.version))

    def state_and_attempts(self, ref: VersionRef) -> tuple[VersionState, list[dict[str, Any]]]:
        """``get(ref)`` and ``attempts(ref)``, read at once."""
        state, runs = concurrently(lambda: self.get(ref), lambda: self.attempts(ref))
        return state, runs

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

    def sweepable(self, *, repair: bool = True) -> list[VersionState]:
        """The versions a sweep validates, in order. From the same listing, ``repair`` first reconciles every
        model's alias (``reconcile``), so each sweep (the CLI's and the DAG's ``discover``) repairs
        what an earlier one left half-done."""
        at = now_utc()
        listing = list(self.iter_versions())
        if repair:
            self.reconcile(listing)
        out = [v for v in listing if v.needs_validation(at)]
        return sorted(out, key=lambda v: (v.ref.name, int(v.ref.version) if v.ref.version.isdigit() else 0))

    def promoted(self, *, model: str | None = None) -> list[VersionState]:
        """Every version whose status is ``promoted`` (the re-check's work list), by model and number."""
        out = list(self.iter_versions(model=model, status=Status.PROMOTED.value))
        return sorted(out, key=lambda v: (v.ref.name, int(v.ref.version) if v.ref.version.isdigit() else 0))

    def alias_version(self, model: str, alias: str | None = None) -> str | None:
        """The version ``alias`` (default: the stage's alias) points at, or None when it is not set."""
        held = self.alias_state(model, alias)
        return held.ref.version if held is not None else None

    def alias_state(self, model: str, alias: str | None = None) -> VersionState | None:
        """The version ``alias`` (default: the stage's alias) points at, with its tags (one request), or
        None when it is not set."""
        alias = alias or self.settings.alias
        with translate(f"reading alias {alias!r} of {model!r}"):
            try:
                return _state(self.client.get_model_version_by_alias(model, alias))
            except Exception as exc:  # noqa: BLE001 - no alias is a normal state
                if "RESOURCE_DOES_NOT_EXIST" in str(getattr(exc, "error_code", "")) or "not found" in str(exc).lower():
                    return None
                raise

    # -- claiming ------------------------------------------------------------------------------
    def claim(self, ref: VersionRef, owner: str, *, force: bool = False) -> VersionState | None:
        """Take the lease. Returns the state before the claim, or None when the claim lost.

        MLflow tags have no compare-and-set, so a claim is a read, a write of the lease, and a re-read:
        - it reads first and writes nothing unless the version still needs a verdict (or ``force``), or
          holds a lease of this same owner (an Airflow task's retry), or of nobody live;
        - it writes only the lease tags, re-reads, and loses when another owner's lease landed last or a
          verdict was recorded meanwhile (its own lease tags are then removed again);
        - only a claim that won writes ``status=validating`` (not over ``promoted``: a re-checked live
          version keeps its status, and the alias, until its new verdict is recorded).
        A backend conflict on a tag write (two first writes of one tag at once) is retried here: MLflow's
        client does not retry a 400, so this is not a second retry loop over the client's.
        """
        started = time.monotonic()
        state = self.get(ref)
        held_by = state.tags.get(LEASE_OWNER, "")
        if not force:
            if state.lease_active() and held_by not in ("", owner):
                log.info("%s is being validated by %s until %s; backing off", ref, held_by,
                         state.tags.get(LEASE_UNTIL))
                return None
            if not state.needs_validation() and not (state.status is Status.VALIDATING and held_by == owner):
                log.info("%s already has status %s; nothing to claim", ref, state.status)
                return None
        until = now_utc() + dt.timedelta(seconds=self.settings.lease_s)
        # The owner tag goes last: it is the ticket, and the last one written wins.
        self._write_retrying_conflicts(ref, {LEASE_UNTIL: iso(until), LEASE_OWNER: owner})
        # A rival that read before our ticket landed writes its own at most its read-to-write time later;
        # under the same load that is about ours, so wait that long (twice, at least 0.25 s) before the
        # re-read: then a rival's later ticket is seen here and this claim gives way. The wait is put to
        # use: what recording needs later and never changes (the experiment) is looked up meanwhile.
        settle = max(0.25, 2 * (time.monotonic() - started))
        waited = time.monotonic()
        with contextlib.suppress(CkptStageError):
            self.experiment_id()
        time.sleep(max(0.0, settle - (time.monotonic() - waited)))
        again = self.get(ref)
        if again.tags.get(LEASE_OWNER) != owner:
            log.info("%s: lost the claim to %s", ref, again.tags.get(LEASE_OWNER))
            return None  # the winner's lease overwrote ours: nothing of this claim is left
        if not force and again.status != state.status and again.status in _DECIDED:
            log.info("%s got the verdict %s meanwhile; giving the claim back", ref, again.status)
            self._clear_lease(ref, owner=owner)
            return None
        if state.status is not Status.PROMOTED:
            self._write_retrying_conflicts(ref, {STATUS: Status.VALIDATING.value})
        return state

    def next_attempt(self, ref: VersionRef, state: VersionState, *, runs: list[dict[str, Any]] | None = None) -> int:
        """One more than any attempt seen: the version's tag or any recorded run (one whose tags never
        landed, e.g. ``report.json`` failed to upload), so an attempt number is never used twice.
        ``runs``: ``attempts(ref)`` when the caller has read them already."""
        seen = [state.attempt]
        for run in self.attempts(ref) if runs is None else runs:
            with contextlib.suppress(ValueError):
                seen.append(int(run["tags"].get(ATTEMPT, "0") or 0))
        return max(seen) + 1

    @contextlib.contextmanager
    def heartbeat(self, ref: VersionRef, owner: str) -> Iterator[None]:
        """Renew the lease every third of ``lease_s`` while the body runs, so a short lease suffices for a
        long attempt and a killed sweep's versions are free within ``lease_s``. Renewal failures are
        logged, never raised: the attempt goes on and its recording is idempotent."""
        stop = threading.Event()
        period = max(0.5, self.settings.lease_s / 3)

        def beat() -> None:
            while not stop.wait(period):
                until = iso(now_utc() + dt.timedelta(seconds=self.settings.lease_s))
                try:
                    with translate(f"renewing the lease of {ref}"):
                        self.client.set_model_version_tag(ref.name, ref.version, LEASE_UNTIL, until)
                except Exception as exc:  # noqa: BLE001 - a missed beat only shortens the lease
                    log.warning("renewing the lease of %s failed: %s", ref, exc)

        thread = threading.Thread(target=beat, name=f"ckpt-lease-{ref.name}-{ref.version}", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join(timeout=max(5.0, self.settings.mlflow_timeout_s))

    def _write_retrying_conflicts(self, ref: VersionRef, tags: dict[str, str], tries: int = 4) -> None:
        for i in range(tries):
            try:
                self._set_tags(ref, tags, ordered=True)
                return
            except RegistryConflict as exc:
                if i == tries - 1:
                    raise
                log.info("%s; writing again", exc)
                time.sleep(0.1 * (2**i))

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

    def log_attempt(self, report: Report, *, attempt_id: str | None = None) -> str:
        """One MLflow run per attempt with ``report.json`` and metrics, finished; returns its run id.

        Idempotent: the run carries ``ckpt_stage.attempt_id``; it is looked up again after a lost answer,
        and a second run that the client's own retry of ``runs/create`` made (the first answer was lost,
        the server had created it) is deleted. A run whose report could not be
        stored is finished as FAILED, never left RUNNING.
        """
        from mlflow.entities import Metric, Param, RunTag

        ref = report.model
        assert ref is not None
        attempt_id = attempt_id or uuid.uuid4().hex
        data = report.to_dict()
        tags = {
            RUN_MODEL: ref.name, RUN_VERSION: ref.version,
            VERDICT: report.verdict.value, ATTEMPT: str(report.attempt),
            REASONS: ",".join(sorted({r.code.value for r in report.reasons if r.code})),
            ATTEMPT_ID: attempt_id,
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
        what = f"recording the attempt of {ref}"
        run_id, artifact_uri = self._run_for_attempt(attempt_id, tags, what=what)

        def log_batch() -> None:
            # No stdout redirect here (it would swap sys.stdout under other threads): the "View run" print
            # is switched off by MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT, set by ``configure_client``.
            with translate(what):
                self.client.log_batch(run_id, metrics=metrics, params=params,
                                      tags=[RunTag(SUMMARY, report.summary[:500])])

        def upload() -> None:
            # Straight to the run's artifact store (the run's location is known from its creation: no
            # runs/get to find it again).
            with translate(f"uploading report.json of {ref}"), tempfile.TemporaryDirectory() as tmp:
                path = os.path.join(tmp, "report.json")
                with open(path, "w") as fh:
                    json.dump(data, fh, indent=2, sort_keys=False)
                self._artifact_repo(artifact_uri).log_artifact(path)

        try:
            # Independent: the metrics, the report and the clean-up of a duplicate run go at once.
            concurrently(log_batch, upload, lambda: self._drop_duplicate_runs(attempt_id, run_id))
        except Exception:
            self._finish_run(run_id, "FAILED")
            raise
        with translate(what):
            self.client.set_terminated(run_id, "FINISHED")
        self._remember_report(run_id, data)
        return run_id

    def _artifact_repo(self, artifact_uri: str) -> Any:
        from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

        return get_artifact_repository(artifact_uri, tracking_uri=self._tracking_uri)

    def _runs_with_attempt_id(self, attempt_id: str) -> list[Any]:
        flt = f"tags.`{ATTEMPT_ID}` = '{_quote(attempt_id)}'"
        with translate("looking up an attempt's run"):
            runs = self.client.search_runs([self.experiment_id()], filter_string=flt,
                                           order_by=["attributes.start_time ASC"], max_results=10)
        return list(runs)

    def _run_for_attempt(self, attempt_id: str, tags: dict[str, str], *, what: str) -> tuple[str, str]:
        """The attempt's run: (run id, artifact URI), created, or found again after a lost answer."""
        try:
            with translate(what):
                run = self.client.create_run(self.experiment_id(), tags=tags)
        except RegistryUnavailable:
            found = self._runs_with_attempt_id(attempt_id)  # the server may have created it: find it again
            if not found:
                raise
            run = found[0]
        return str(run.info.run_id), str(run.info.artifact_uri)

    def _drop_duplicate_runs(self, attempt_id: str, run_id: str) -> None:
        """Delete every other run of this attempt: one that the client's own retry of ``runs/create``
        made after the server had created the first (the first answer was lost)."""
        for extra in self._runs_with_attempt_id(attempt_id):
            if extra.info.run_id != run_id:
                log.info("deleting run %s: a duplicate of attempt %s (a retried runs/create)", extra.info.run_id,
                         attempt_id)
                with contextlib.suppress(Exception), translate("deleting a duplicate run"):
                    self.client.delete_run(extra.info.run_id)

    def _finish_run(self, run_id: str, status: str) -> None:
        try:
            with translate(f"finishing run {run_id}"):
                self.client.set_terminated(run_id, status)
        except Exception as exc:  # noqa: BLE001 - the original failure is the one to report
            log.warning("could not finish run %s as %s: %s", run_id, status, exc)

    def record(self, report: Report, decision: Decision, *, digest: str, attempt_id: str | None = None,
               owner: str | None = None) -> str:
        """Write the verdict of one attempt, in the contract's order. Returns the run id.

        The run (finished, with ``report.json``) comes before any version tag; ``status`` is written
        last. A failure before the status leaves the version as it was (``validating`` with a lease that
        runs out, or ``error``): eligible again. On a pass the status is ``promoted`` before the alias
        moves; if only the alias move fails, the lease tags stay as the marker that ``reconcile`` uses to
        find and repair the version (the alias never points at a version that is not promoted).
        """
        from ckpt_stage.storage import manifest_digest  # the digests' one home; no S3 client is made

        ref = report.model
        assert ref is not None
        run_id = self.log_attempt(report, attempt_id=attempt_id)
        codes = ",".join(c.value for c in decision.codes)
        self._set_tags(ref, {
            REASONS: codes,
            SUMMARY: report.summary[:500],
            ATTEMPT: str(report.attempt),
            VALIDATED_AT: iso(now_utc()),
            RUN_ID: run_id,
            SHA256: digest,
            MANIFEST_SHA256: manifest_digest(
                [(f.path, f.key, f.size, f.etag, f.version_id, f.sha256) for f in report.files]),
        })
        seen: dict[str, VersionState] = {}
        if decision.verdict is Verdict.PASS:
            self._set_tags(ref, {STATUS: Status.PROMOTED.value})
            try:
                # The promoted versions read here include this one, as it is after its status landed:
                # its lease owner is known without reading the version again.
                self.sync_alias(ref.name, seen=seen)
            except CkptStageError as exc:
                log.warning("%s is promoted but the alias did not move (%s); the next sweep repairs it", ref, exc)
                return run_id
        elif decision.verdict in (Verdict.QUARANTINE, Verdict.SKIP):  # neither may hold the alias
            self.sync_alias(ref.name, excluding=ref.version)
            self._set_tags(ref, {STATUS: Status.for_verdict(decision.verdict).value})
        else:
            self._set_tags(ref, {STATUS: Status.ERROR.value})
        # A rival's live lease stays: its attempt records after this one.
        self._clear_lease(ref, owner=owner, seen=seen.get(ref.version))
        return run_id

    def quarantine_promoted(self, ref: VersionRef, *, codes: str, summary: str, expect_run_id: str) -> bool:
        """Take a promoted version out of service after the fact (its files changed since the verdict).

        Same order as a quarantine verdict: the alias leaves the version first (to the highest other
        promoted version, or nowhere), then the reasons and summary, ``ckpt_stage.status`` last. The
        attempt's run and ``ckpt_stage.run_id`` stay: they hold the manifest of what was validated.
        Returns False, writing nothing, when the version is no longer the promoted one that was checked
        (a re-run took it meanwhile: its own verdict decides).
        """
        now = self.get(ref)
        if now.status is not Status.PROMOTED or now.tags.get(RUN_ID) != expect_run_id:
            log.info("%s changed while it was re-checked (status %s); leaving it to its new attempt",
                     ref, now.status)
            return False
        self.sync_alias(ref.name, excluding=ref.version)
        self._set_tags(ref, {REASONS: codes, SUMMARY: summary[:500]})
        self._set_tags(ref, {STATUS: Status.QUARANTINED.value})
        return True

    def record_error_status(self, ref: VersionRef, summary: str, *, owner: str | None = None) -> None:
        """Last resort when a full record failed: leave the version eligible for a re-run, and never
        holding the alias (a forced re-check of a promoted version may have got half-way)."""
        self._set_tags(ref, {SUMMARY: summary[:500], VALIDATED_AT: iso(now_utc())})
        self._set_tags(ref, {STATUS: Status.ERROR.value})
        with contextlib.suppress(CkptStageError):
            self.sync_alias(ref.name)
        self._clear_lease(ref, owner=owner)

    def sync_alias(self, model: str, *, excluding: str | None = None,
                   seen: dict[str, VersionState] | None = None) -> str | None:
        """Point the alias at the highest promoted version (never ``excluding``); remove it if none.
        The promoted versions and the alias are read at once; ``seen`` receives the promoted versions
        as read (by version number), for a caller that needs one of them again."""
        listing, current = concurrently(
            lambda: list(self.iter_versions(model=model, status=Status.PROMOTED.value)),
            lambda: self.alias_version(model))
        if seen is not None:
            seen.update({v.ref.version: v for v in listing})
        promoted = [int(v.ref.version) for v in listing if v.ref.version != excluding and v.ref.version.isdigit()]
        target = str(max(promoted)) if promoted else None
        with translate(f"moving alias {self.settings.alias!r} of {model!r}"):
            if target is None:
                if current is not None:
                    self.client.delete_registered_model_alias(model, self.settings.alias)
            elif current != target:
                self.client.set_registered_model_alias(model, self.settings.alias, target)
        return target

    def reconcile(self, states: Iterable[VersionState], *, touched: Iterable[str] = ()) -> dict[str, str | None]:
        """Repair each model's alias against the rule "highest-numbered version whose status is promoted".

        ``states`` is a listing the caller already has (the sweep's); models in ``touched`` (validated by
        this sweep), models whose alias holder is wrong in the listing, and models with a promoted version
        that still carries lease tags (its alias move failed) are synced; those lease tags are removed once
        the alias is right. Returns ``{model: alias target}`` for the models it synced.
        """
        by_model: dict[str, list[VersionState]] = {}
        for st in states:
            by_model.setdefault(st.ref.name, []).append(st)
        # A version listing carries no aliases (MLflow 3.17's search leaves them empty): every model's alias
        # comes from one listing of the registered models instead, so only models whose alias is wrong are
        # synced (an idle sweep then costs the two listings, not two requests per model).
        held: dict[str, list[str]] | None = None
        try:
            pairs = self.alias_holders()
        except CkptStageError as exc:
            log.warning("could not list the models' aliases (%s); checking every model's alias", exc)
        else:
            held = {}
            for (model, version), aliases in pairs.items():
                if self.settings.alias in aliases:
                    held.setdefault(model, []).append(version)
        wanted = set(touched)
        leftovers: list[VersionRef] = []
        for model, versions in by_model.items():
            promoted = [int(v.ref.version) for v in versions if v.status is Status.PROMOTED and v.ref.version.isdigit()]
            target = str(max(promoted)) if promoted else None
            holders = ([v.ref.version for v in versions if self.settings.alias in v.aliases] if held is None
                       else held.get(model, []))
            if holders != ([target] if target else []):
                wanted.add(model)
            stale = [v.ref for v in versions if v.status is Status.PROMOTED and (LEASE_OWNER in v.tags or LEASE_UNTIL in v.tags)]
            if stale:
                wanted.add(model)
                leftovers.extend(stale)
        out: dict[str, str | None] = {}
        for model in sorted(wanted):
            try:
                out[model] = self.sync_alias(model)
            except CkptStageError as exc:
                log.warning("could not repair the alias of %s: %s (the next sweep tries again)", model, exc)
                continue
            for ref in leftovers:
                if ref.name == model:
                    with contextlib.suppress(CkptStageError):
                        self._clear_lease(ref)
        return out

    def _clear_lease(self, ref: VersionRef, *, owner: str | None = None, seen: VersionState | None = None) -> None:
        """Remove the lease tags (only if ``owner`` still holds them, when given: ``seen`` is the version
        as read after this attempt's last write, else it is read here). Never raises for a tag that is
        already gone."""
        if owner is not None:
            with contextlib.suppress(CkptStageError):
                if (seen or self.get(ref)).tags.get(LEASE_OWNER) != owner:
                    return

        def delete(key: str) -> None:
            with contextlib.suppress(Exception), translate(f"clearing the lease of {ref}"):
                self.client.delete_model_version_tag(ref.name, ref.version, key)

        concurrently(*(lambda k=key: delete(k) for key in (LEASE_OWNER, LEASE_UNTIL)))

    def _set_tags(self, ref: VersionRef, tags: dict[str, str], *, ordered: bool = False) -> None:
        """Write ``tags`` to the version: at once (independent writes; the call returns when all
        landed), or one after the other in the dict's order when ``ordered`` (the lease's ticket goes last)."""
        def one(key: str, value: str) -> None:
            with translate(f"tagging {ref}"):
                self.client.set_model_version_tag(ref.name, ref.version, key, value)

        if ordered:
            for key, value in tags.items():
                one(key, value)
            return
        concurrently(*(lambda k=key, v=value: one(k, v) for key, value in tags.items()))

    def report_of(self, run_id: str) -> dict[str, Any] | None:
        """The ``report.json`` an attempt's run holds, or None when it has none (or it is unreadable)."""
        cached = self._reports.get(run_id)
        if cached is not None:
            return json.loads(json.dumps(cached))  # a copy: callers may change what they get
        with translate(f"reading report.json of run {run_id}"):
            report = self._load_report(run_id)
        if report is not None:
            self._remember_report(run_id, report)
        return report

    def _remember_report(self, run_id: str, report: dict[str, Any]) -> None:
        """Keep a report this adapter wrote or read: the next version of the model in a sweep compares
        against it (drift) without reading it back."""
        with self._lock:
            if len(self._reports) >= REPORT_CACHE:
                self._reports.pop(next(iter(self._reports)), None)
            self._reports[run_id] = json.loads(json.dumps(report))

    def _load_report(self, run_id: str) -> dict[str, Any] | None:
        """``report.json`` of a run: one runs/get for the run's artifact location, then the artifact store
        (MLflow's own ``download_artifacts`` makes three registry requests for the same)."""
        with tempfile.TemporaryDirectory() as tmp:
            try:
                uri = self.client.get_run(run_id).info.artifact_uri
                path = self._artifact_repo(uri).download_artifacts("report.json", tmp)
            except Exception as exc:  # noqa: BLE001 - a run without a report is shown as such
                log.warning("run %s has no readable report.json: %s", run_id, exc)
                return None
            with open(path) as fh:
                return json.load(fh)

    # -- reading for the dashboard ----------------------------------------------------------------
    @property
    def tracking_uri(self) -> str:
        """The MLflow server this adapter talks to (for links to MLflow's own UI)."""
        if self._tracking_uri:
            return self._tracking_uri
        from mlflow.tracking import get_tracking_uri

        return str(get_tracking_uri())

    def alias_holders(self) -> dict[tuple[str, str], list[str]]:
        """(model, version) → the aliases it holds, for every registered model in one paginated listing.

        MLflow's ``search_model_versions`` returns every version with ``aliases=[]`` (3.17's SQL store fills
        them in only for ``get_model_version``); ``search_registered_models`` carries each model's alias map."""
        out: dict[tuple[str, str], list[str]] = {}
        token = None
        with translate("listing the registered models' aliases"):
            while True:
                page = self.client.search_registered_models(max_results=1000, page_token=token)
                for rm in page:
                    for alias, version in sorted((getattr(rm, "aliases", None) or {}).items()):
                        out.setdefault((rm.name, str(version)), []).append(alias)
                token = getattr(page, "token", None)
                if not token:
                    return out

    def find_experiment_id(self) -> str | None:
        """The validations experiment's id, or None while no attempt was ever recorded. Never creates it
        (``experiment_id`` does): a read-only view must not write to the registry."""
        if self._experiment_id is not None:
            return self._experiment_id
        with translate(f"experiment {self.settings.experiment!r}"):
            exp = self.client.get_experiment_by_name(self.settings.experiment)
        return exp.experiment_id if exp is not None else None

    def iter_runs(self, *, verdict: str | None = None, model: str | None = None,
                  since_ms: int | None = None) -> Iterator[dict[str, Any]]:
        """Every recorded attempt's run (as ``attempts`` gives them), filtered on the server by verdict,
        model and start time; nothing when no attempt was ever recorded."""
        exp = self.find_experiment_id()
        if exp is None:
            return
        parts = []
        if verdict:
            parts.append(f"tags.`{VERDICT}` = '{_quote(verdict)}'")
        if since_ms is not None:
            parts.append(f"attributes.start_time >= {int(since_ms)}")
        if model:
            parts.append(f"tags.`{RUN_MODEL}` = '{_quote(model)}'")
        token = None
        while True:
            with translate("listing validation runs"):
                page = self.client.search_runs([exp], filter_string=" and ".join(parts), max_results=1000,
                                               page_token=token)
            yield from (_run_dict(r) for r in page)
            token = getattr(page, "token", None)
            if not token:
                return

    def attempts(self, ref: VersionRef) -> list[dict[str, Any]]:
        """Every recorded attempt's run (newest first), without the reports."""
        exp = self.experiment_id()
        flt = f"tags.`{RUN_MODEL}` = '{_quote(ref.name)}' and tags.`{RUN_VERSION}` = '{_quote(ref.version)}'"
        with translate(f"listing attempts of {ref}"):
            runs = self.client.search_runs([exp], filter_string=flt, order_by=["attributes.start_time DESC"],
                                           max_results=100)
        return [_run_dict(r) for r in runs]


def _run_dict(run: Any) -> dict[str, Any]:
    return {"run_id": run.info.run_id, "start_time": run.info.start_time, "tags": dict(run.data.tags),
            "metrics": dict(run.data.metrics)}


def _quote(text: str) -> str:
    return text.replace("\\", "\\\\").replace("'", "\\'")
