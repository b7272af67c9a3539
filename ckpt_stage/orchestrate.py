"""What the Airflow DAGs do, as plain functions: discover, size, select, validate one version.

The DAGs in ``dags/`` are thin: they wire these functions into tasks (``build_validation_tasks``) and
add nothing the library does not have. Nothing here imports Airflow at module level, so the receiver,
the CLI and unit tests can use the constants and functions without it.

Flow of one DAG run::

    discover / select  →  plan (sizes each version: sum of its S3 object sizes → worker class)
                       →  batch_<class> (that class's versions)
                       →  validate_<class> mapped over them, in the class's pool and queue

One mapped task per class, not one task with a per-instance pool: Airflow 3.3 cannot expand ``pool`` or
``queue`` per mapped instance ("unmappable or already specified arguments"; see docs/traps.md).
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from ckpt_stage.config import PREFIX, Settings, WorkerClass
from ckpt_stage.domain import RERUNNABLE_STATUSES, ReasonCode, Status, Verdict, VersionRef
from ckpt_stage.errors import TRANSIENT_CODES, CkptStageError, RerunTooLarge, UsageError, ValidationFailed, is_retryable_finding

if TYPE_CHECKING:
    from ckpt_stage.pipeline import Outcome
    from ckpt_stage.registry import Registry, VersionState
    from ckpt_stage.storage import Listing

log = logging.getLogger(__name__)

VALIDATE_DAG_ID = "ckpt_stage_validate"
RERUN_DAG_ID = "ckpt_stage_rerun"

# The asset the webhook receiver updates; ``x-`` schemes are left alone by Airflow's URI normalisation.
REGISTRATIONS_ASSET_NAME = "ckpt_stage_model_version_created"
REGISTRATIONS_ASSET_URI = "x-ckpt-stage://mlflow/model-version-created"

# Airflow refuses to expand more than [core] max_map_length (1024) instances; a backlog larger than one
# batch is worked off by the following sweeps.
MAX_BATCH = 500

# Infrastructure codes where another try may succeed (the error taxonomy's, ``errors.TRANSIENT_CODES``).
RETRYABLE_CODES = TRANSIENT_CODES

RERUN_STATUSES = RERUNNABLE_STATUSES

MAX_RERUN = MAX_BATCH
"""One re-run selects at most this many versions, from any entry point (the DAG maps one task per version)."""


def sweep_interval_s(env: Mapping[str, str] | None = None) -> float:
    """``CKPT_STAGE_SWEEP_INTERVAL_S`` of ``env`` (default 300): how often ``ckpt_stage_validate`` sweeps.
    The DAG files read it from their ``Settings``."""
    return Settings.from_env(env).sweep_interval_s


def control_queue(settings: Settings) -> str:
    """The Celery queue of the tasks that load nothing (discover, select, plan, batch): the smallest class's.

    Every deployment runs workers for it, so no worker has to listen on Airflow's ``default`` queue too
    (the executor's ``[operators] default_queue``); LocalExecutor and KubernetesExecutor ignore queues.
    """
    return settings.worker_classes[0].queue


def task_id_for(wc: WorkerClass, verb: str = "validate") -> str:
    return f"{verb}_" + re.sub(r"[^A-Za-z0-9_.-]", "_", wc.name)


# -- discovery ---------------------------------------------------------------------------------------
def refs_from_extras(extras: Iterable[Mapping[str, Any] | None]) -> list[VersionRef]:
    """Asset events' ``extra`` → version refs; malformed ones are logged and dropped (the sweep remains)."""
    out = []
    for extra in extras:
        name = (extra or {}).get("name")
        version = (extra or {}).get("version")
        if isinstance(name, str) and name and isinstance(version, str | int) and str(version).strip():
            out.append(VersionRef(name, str(version).strip()))
        else:
            log.warning("ignoring an asset event without name/version: %r", extra)
    return dedupe(out)


def dedupe(refs: Iterable[VersionRef]) -> list[VersionRef]:
    return list(dict.fromkeys(refs))


class VersionLister(Protocol):
    """What a re-run selection reads from the registry (``Registry`` is one; the tests' fakes are others)."""

    def iter_versions(self, *, model: str | None = None, status: str | None = None,
                      reason: str | None = None) -> Iterable[VersionState]: ...


class VersionReader(VersionLister, Protocol):
    """What discovery and the re-run DAG's selection read from the registry."""

    def get(self, ref: VersionRef) -> VersionState: ...

    def sweepable(self) -> list[VersionState]: ...


class SourceResolver(Protocol):
    """Where a version's files are (``Registry.download_uri``)."""

    def download_uri(self, ref: VersionRef) -> str: ...


def discover(registry: VersionReader, event_refs: Sequence[VersionRef] = (), *, limit: int = MAX_BATCH) -> list[VersionRef]:
    """Versions the run should validate: the events' versions that still need it, then the sweep's.

    An event's version that already has a verdict (the sweep got there first) is left alone, so that a
    late or duplicated webhook never makes a new attempt; a version that no longer exists is dropped.
    """
    chosen: list[VersionRef] = []
    for ref in dedupe(event_refs):
        try:
            state = registry.get(ref)
        except UsageError as exc:
            log.warning("%s from an asset event does not exist (deleted?): %s", ref, exc)
            continue
        if state.needs_validation():
            chosen.append(ref)
        else:
            log.info("%s from an asset event already has status %s; skipping", ref, state.status)
    chosen.extend(state.ref for state in registry.sweepable())
    chosen = dedupe(chosen)
    if len(chosen) > limit:
        log.warning("%d versions need validation; this run takes %d, the next sweeps the rest", len(chosen), limit)
    return chosen[:limit]


# -- selection for re-runs ------------------------------------------------------------------------------
@dataclass(frozen=True)
class RerunSelection:
    """What one re-run asks for, whichever entry point it came from (CLI ``rerun``, the ``ckpt_stage_rerun``
    DAG form, the dashboard's ``POST /api/rerun``): either ``model`` + ``versions``, or ``status``
    (``RERUN_STATUSES``) with optional ``reason`` and ``model``. ``parse`` is the one set of rules; every
    entry point matches at most ``MAX_RERUN`` versions."""

    model: str | None = None
    versions: tuple[str, ...] = ()
    status: str | None = None
    reason: str | None = None

    @classmethod
    def parse(cls, params: Any) -> RerunSelection:
        """Check a selection (cross-field rules JSON schema cannot express); raises ``UsageError``."""
        if not isinstance(params, Mapping):
            raise UsageError("the re-run selection must be a JSON object")
        model, status, reason = (_text_field(params, key) for key in ("model", "status", "reason"))
        raw_versions = params.get("versions") or []
        if isinstance(raw_versions, str | int):
            raw_versions = [raw_versions]
        if not isinstance(raw_versions, list | tuple):
            raise UsageError("versions must be a list of version numbers")
        versions = [str(v).strip() for v in raw_versions if str(v).strip()]
        if versions and status:
            raise UsageError("give either versions (with a model) or a status, not both")
        if versions and not model:
            raise UsageError("versions need a model name")
        if not versions and not status:
            raise UsageError(f"give a model and versions, or a status ({', '.join(RERUN_STATUSES)})")
        if status and status not in RERUN_STATUSES:
            raise UsageError(f"status must be one of {', '.join(RERUN_STATUSES)}, not {status!r}")
        if reason and not status:
            raise UsageError("a reason code filters a status selection; give a status too")
        if reason and reason not in ReasonCode.__members__:
            raise UsageError(f"{reason!r} is not a reason code; known: {', '.join(ReasonCode.__members__)}")
        bad = [v for v in versions if not v.isdigit()]
        if bad:
            raise UsageError(f"model versions are numbers, got {', '.join(map(repr, bad))}")
        if len(set(versions)) > MAX_RERUN:
            raise RerunTooLarge(f"{len(set(versions))} versions given; one re-run takes at most {MAX_RERUN}")
        return cls(model=model, versions=tuple(dict.fromkeys(versions)), status=status, reason=reason)

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "versions": list(self.versions), "status": self.status, "reason": self.reason}

    def conf(self) -> dict[str, Any]:
        """The ``ckpt_stage_rerun`` DAG's params."""
        if self.versions:
            return {"model": self.model, "versions": list(self.versions)}
        return {"status": self.status, "reason": self.reason, "model": self.model}

    def describe(self) -> str:
        if self.versions:
            return f"{self.model} version{'s' if len(self.versions) > 1 else ''} {', '.join(self.versions)}"
        parts = [f"every {self.status} version"]
        if self.model:
            parts.append(f"of {self.model}")
        if self.reason:
            parts.append(f"with {self.reason}")
        return " ".join(parts)

    def matching(self, registry: VersionLister, *, limit: int = MAX_RERUN) -> list[VersionRef]:
        """The versions selected, in order (by model and number for a status selection); more than ``limit``
        raises ``RerunTooLarge``. Named versions are not looked up here (``select_for_rerun`` does)."""
        if self.versions:
            assert self.model is not None
            return [VersionRef(self.model, v) for v in self.versions]
        refs = [s.ref for s in registry.iter_versions(model=self.model, status=self.status, reason=self.reason)]
        refs.sort(key=lambda r: (r.name, int(r.version) if r.version.isdigit() else 0))
        if len(refs) > limit:
            raise RerunTooLarge(f"{len(refs)} versions match; one re-run takes at most {limit}: "
                                "narrow it by model or reason")
        return refs


def _text_field(params: Mapping[str, Any], key: str) -> str | None:
    value = params.get(key)
    if value is not None and not isinstance(value, str):
        raise UsageError(f"{key} must be a string")
    return (value or "").strip() or None


def rerun_selection(params: Mapping[str, Any]) -> dict[str, Any]:
    """``RerunSelection.parse(params)`` as the DAG form's normalised dict."""
    return RerunSelection.parse(params).to_dict()


def select_for_rerun(registry: VersionReader, params: Mapping[str, Any], *, limit: int = MAX_RERUN) -> list[VersionRef]:
    """The DAG's selection: ``RerunSelection.matching``, each named version looked up first (``UsageError``
    naming the version when it does not exist)."""
    sel = RerunSelection.parse(params)
    refs = sel.matching(registry, limit=limit)
    if sel.versions:
        for ref in refs:
            registry.get(ref)
    return refs


# -- sizing -------------------------------------------------------------------------------------------
def list_version(ref: VersionRef, *, settings: Settings, registry: SourceResolver, storage: Any) -> Listing | None:
    """The version's objects (None: they cannot be listed now). Their sizes plan the version; the listing
    itself goes to the validation, which then does not list them again."""
    from ckpt_stage.storage import Listing, resolve_artifact_uri

    try:
        uri = registry.download_uri(ref)
        return Listing(uri, tuple(storage.list_files(resolve_artifact_uri(uri, settings))), time.time())
    except CkptStageError as exc:
        # The validation itself records the proper verdict (ARTIFACT_MISSING, STORAGE_*); sizing only plans.
        log.info("cannot size %s before validating it (%s: %s)", ref, exc.code.value, exc)
        return None


def estimate_bytes(ref: VersionRef, *, settings: Settings, registry: SourceResolver, storage: Any) -> int | None:
    """The cheapest estimate before a download: the sum of the version's S3 object sizes (None: unknown)."""
    listing = list_version(ref, settings=settings, registry=registry, storage=storage)
    return listing.size if listing is not None else None


def planned_memory(s3_bytes: int) -> int:
    """The memory a version is planned with: its S3 bytes plus the scanner's working-memory allowance.

    The scanner's own estimate (``scan.estimate``: declared tensor storage + the same allowance) is at most
    this wherever tensor data is stored uncompressed inside the files (torch zip, safetensors, pt2, legacy
    torch.save), so the class the pipeline picks on the worker is not larger than the class, and so the
    queue, the version was routed to (tests/unit/test_orchestrate.py checks it on real files).
    """
    from ckpt_stage.scan.estimate import OVERHEAD_BYTES

    return int(s3_bytes) + OVERHEAD_BYTES


def route(estimated_bytes: int | None, settings: Settings) -> WorkerClass:
    """Planned memory → worker class (and so pool and queue): the smallest class that holds it.

    A version too big for every class, or of unknown size, goes to the largest class: there the scan's
    tensor-metadata estimate refuses it with RESOURCE_LIMIT before anything is loaded, and an unknown size
    is safest where the fewest run at once.
    """
    if estimated_bytes is None:
        return settings.largest_class
    return settings.class_for(estimated_bytes) or settings.largest_class


def plan(refs: Sequence[VersionRef], settings: Settings,
         estimate: Callable[[VersionRef], int | Listing | None]) -> list[dict[str, Any]]:
    """Size each version and route it: ``[{name, version, s3_bytes, estimated_bytes, worker_class, queue,
    over_budget}]`` (``estimated_bytes``: ``planned_memory`` of the S3 bytes; ``over_budget``: above the
    largest class, to be refused unloaded). ``estimate`` gives a size, or the version's ``Listing``: then
    the item carries it as ``listing`` (up to ``Listing.MAX_FILES`` objects) for the validation to use."""
    with ThreadPoolExecutor(max_workers=min(4, max(1, len(refs)))) as pool:
        sizes = list(pool.map(estimate, refs))
    out = []
    for ref, found in zip(refs, sizes, strict=True):
        size = found if found is None or isinstance(found, int) else found.size
        need = planned_memory(size) if size is not None else None
        wc = route(need, settings)
        item: dict[str, Any] = {**ref.to_dict(), "s3_bytes": size, "estimated_bytes": need, "worker_class": wc.name,
                "queue": wc.queue, "over_budget": need is not None and need > settings.largest_class.memory_bytes}
        if found is not None and not isinstance(found, int) and len(found.files) <= found.MAX_FILES:
            item["listing"] = found.to_dict()
        out.append(item)
    return out


def in_class(planned: Iterable[Mapping[str, Any]], worker_class: str) -> list[dict[str, Any]]:
    return [dict(item) for item in planned if item.get("worker_class") == worker_class]


def plan_versions(refs: Sequence[VersionRef], settings: Settings) -> list[dict[str, Any]]:
    from ckpt_stage.registry import Registry
    from ckpt_stage.storage import S3Storage

    registry = Registry(settings)
    # Sizing must not stall the run: few quick tries; the validation has the full retry budget.
    storage = S3Storage(settings.replace(s3_attempts=min(2, settings.s3_attempts),
                                         s3_deadline_s=min(15.0, settings.s3_deadline_s)))
    return plan(refs, settings, lambda r: list_version(r, settings=settings, registry=registry, storage=storage))


# -- one version ----------------------------------------------------------------------------------------
def task_result(outcome: Outcome) -> dict[str, Any]:
    """A validation outcome → the task's result, or ``ValidationFailed``.

    pass / quarantine: success (a model problem is a result, not a task failure). error: retryable when
    every reason is a transient infrastructure failure (``errors.is_retryable_finding``: a permanent
    MLflow error, ``RegistryError``, is not, although its code is ``REGISTRY_UNAVAILABLE``), otherwise a failure without retries (INTERNAL_ERROR is
    a bug; STORAGE_MISCONFIGURED is the stage's setup). Either way the verdict is already recorded.
    """
    if outcome.report is None:
        return {"skipped": outcome.skipped}
    report = outcome.report
    codes = sorted({f.code for f in report.reasons if f.code is not None})
    result = {
        **(report.model.to_dict() if report.model else {}),
        "verdict": report.verdict.value,
        "reasons": [c.value for c in codes],
        "attempt": report.attempt,
        "run_id": outcome.run_id,
        "summary": report.summary,
    }
    if report.verdict is not Verdict.ERROR:
        return result
    what = f"{report.model} ended in error ({', '.join(c.value for c in codes)}): {report.summary}"
    if ReasonCode.INTERNAL_ERROR in codes:
        raise ValidationFailed(f"ckpt-stage bug: {what}", retry=False)
    blocking = [f for f in report.reasons if f.code is not None]
    if blocking and all(is_retryable_finding(f) for f in blocking):
        raise ValidationFailed(what, retry=True)
    raise ValidationFailed(what, retry=False)


def validation_task(ref: Mapping[str, Any], *, force: bool, settings: Settings,
                    registry: Registry | None = None, owner: str | None = None,
                    airflow: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Body of a mapped task. Without ``force``, a version that got a verdict meanwhile is skipped.

    ``owner`` names the lease holder; the task passes one that is the same on each of its retries, so a
    retry takes over the lease its failed try left behind instead of waiting for it to expire.

    Raises ``ValidationFailed`` (see ``task_result``): "retry" to the task wrapper unless ``retry=False``. A
    verdict that could not be recorded (MLflow or S3 down while recording) is an ``error`` outcome with
    that infrastructure code, so it is retried like any other transient failure.
    """
    from ckpt_stage.pipeline import validate_version
    from ckpt_stage.registry import LEASE_OWNER, Registry
    from ckpt_stage.storage import Listing

    registry = registry or Registry(settings)
    vref = VersionRef(str(ref["name"]), str(ref["version"]))
    if not force:
        try:
            state = registry.get(vref)
        except UsageError as exc:
            return {**vref.to_dict(), "skipped": f"no longer registered: {exc}"}
        ours = owner is not None and state.status is Status.VALIDATING and state.tags.get(LEASE_OWNER) == owner
        if not state.needs_validation() and not ours:
            return {**vref.to_dict(), "skipped": f"already {state.status.value if state.status else '-'}"}
    extra: dict[str, Any] = {}
    listing = Listing.from_dict(ref.get("listing"))
    if listing is not None:  # the plan task's listing: the objects are not listed again
        extra["listing"] = listing
    return task_result(validate_version(vref, settings=settings, registry=registry, force=force, owner=owner,
                                  origin={"airflow": dict(airflow)} if airflow else None, **extra))


def task_owner(context: Mapping[str, Any]) -> str:
    """A lease owner that names the task instance and stays the same across its retries."""
    ti = context["ti"]
    return f"airflow:{ti.dag_id}/{ti.run_id}/{ti.task_id}/{ti.map_index}"


def task_identity(context: Mapping[str, Any]) -> dict[str, Any]:
    """Which task instance ran an attempt: recorded with it, so the dashboard links to the task's log."""
    ti = context["ti"]
    return {"dag_id": ti.dag_id, "run_id": ti.run_id, "task_id": ti.task_id, "map_index": ti.map_index,
            "try_number": getattr(ti, "try_number", None)}


# -- Airflow wiring --------------------------------------------------------------------------------------
def build_validation_tasks(refs: Any, *, force: bool, settings: Settings, verb: str = "validate") -> None:
    """Inside a ``@dag``: ``plan`` over ``refs`` (an XComArg of ref dicts), then per class a ``batch`` and a mapped task.

    ``refs`` is resolved at run time; the classes (and so the task ids, pools and queues) are fixed when the
    DAG is parsed, from ``CKPT_STAGE_WORKER_CLASSES`` of the DAG processor's environment.
    """
    import datetime as dt

    from airflow.sdk import task
    from airflow.sdk.exceptions import AirflowFailException

    from ckpt_stage.errors import PermanentError

    @task(task_id="plan", queue=control_queue(settings))
    def plan_classes(found: list[dict[str, str]]) -> list[dict[str, Any]]:
        planned = plan_versions([VersionRef(r["name"], r["version"]) for r in found], settings)
        for item in planned:
            log.info("%s v%s: %s bytes in S3, ~%s bytes to load → worker class %s, queue %s%s", item["name"],
                     item["version"], item["s3_bytes"], item["estimated_bytes"], item["worker_class"],
                     item["queue"], " (over every budget: refused before loading)" if item["over_budget"] else "")
        return planned

    # One small task per class picks its versions: a mapped task can expand only over a task's
    # return_value, not over one key of a multiple_outputs dict ("cannot map over XCom with custom key").
    @task(queue=control_queue(settings))
    def batch(planned: list[dict[str, Any]], worker_class: str) -> list[dict[str, Any]]:
        return in_class(planned, worker_class)

    def run(ref: dict[str, Any], worker_class: str) -> dict[str, Any]:
        from airflow.sdk import get_current_context

        try:
            context = get_current_context()
            return validation_task(ref, force=force, owner=task_owner(context), airflow=task_identity(context),
                                settings=class_settings(settings, worker_class))
        except ValidationFailed as exc:
            if exc.retry:
                raise
            raise AirflowFailException(str(exc)) from exc
        except PermanentError as exc:
            # The registry refused to record (bad tag, missing version): retrying cannot help.
            raise AirflowFailException(f"{exc.code.value}: {exc}") from exc

    planned: Any = plan_classes(refs)  # an XComArg, resolved to the list at run time
    on_kubernetes = _kubernetes_executor()
    for wc in settings.worker_classes:
        picked = batch.override(task_id=task_id_for(wc, "batch"))(planned, wc.name)
        extra: dict[str, Any] = {}
        if on_kubernetes:
            # KubernetesExecutor: each class's pod gets that class's memory and CPU (queues mean nothing there).
            extra["executor_config"] = {"pod_override": _pod_override(wc)}
        validate_task = task(
            task_id=task_id_for(wc, verb),
            pool=wc.pool,
            queue=wc.queue,
            retries=settings.task_retries,
            retry_delay=dt.timedelta(seconds=settings.task_retry_delay_s),
            # A multiplier in Airflow 3.3 (delay * 2.0 ** (try - 1)): True would mean 1.0, a constant delay.
            retry_exponential_backoff=2.0,
            max_retry_delay=dt.timedelta(seconds=settings.task_max_retry_delay_s),
            # The attempt renews its lease while it runs (heartbeat), so the task's limit is the attempt's
            # own budget: downloads (each bounded by the S3 deadline), the worker's timeout, recording.
            execution_timeout=dt.timedelta(seconds=settings.worker_timeout_s + 2 * settings.s3_deadline_s + 300),
            map_index_template="{{ task.op_kwargs['ref']['name'] }} v{{ task.op_kwargs['ref']['version'] }}",
            doc_md=f"Validates the versions of worker class **{wc.name}** (≤ {wc.memory_bytes / 2**30:.1f} GiB) "
                   f"in pool `{wc.pool}`, queue `{wc.queue}`.",
            **extra,
        )(run)
        validate_task.partial(worker_class=wc.name).expand(ref=picked)


def class_settings(settings: Settings, worker_class: str) -> Settings:
    """The settings a ``validate_<class>`` task validates with: no class below its own.

    The pipeline gives a load the budget of the smallest class that holds the scan's estimate. On the
    class's queue that is at least the class's own budget, which its hosts are sized for: a version routed
    here with a smaller scan estimate (an MLflow folder whose files outweigh its tensors; an unknown size
    parked in the largest class) gets the room the queue has, not a smaller class's. The largest class, and
    so the RESOURCE_LIMIT threshold, stays the same.
    """
    budget = next((c.memory_bytes for c in settings.worker_classes if c.name == worker_class), None)
    if budget is None:
        return settings  # the DAG was parsed with other classes than this process has: keep its own
    return settings.replace(worker_classes=tuple(c for c in settings.worker_classes if c.memory_bytes >= budget))


def _kubernetes_executor() -> bool:
    """Whether Airflow's configured executor (``[core] executor``, possibly a list) is the KubernetesExecutor."""
    from airflow.configuration import conf

    return "KubernetesExecutor" in conf.get("core", "executor", fallback="")


def _pod_override(wc: WorkerClass) -> Any:
    from ckpt_stage import k8s

    return k8s.pod_override(wc)


def pool_definitions(settings: Settings, *, host_memory_bytes: int | None = None) -> dict[str, dict[str, Any]]:
    """Pools for the worker classes, in ``airflow pools import`` format.

    Slots are how many validations of the class fit into one worker host's memory at once (at least 1);
    without ``host_memory_bytes``, 4 for every class but the largest, which gets 1.
    """
    out = {}
    for wc in settings.worker_classes:
        if host_memory_bytes:
            slots = max(1, host_memory_bytes // max(1, wc.memory_bytes))
        else:
            slots = 1 if wc is settings.largest_class else 4
        out[wc.pool] = {"slots": int(slots), "include_deferred": False,
                        "description": f"ckpt-stage validations of worker class {wc.name!r} "
                                       f"(≤ {wc.memory_bytes / 2**30:.1f} GiB each)"}
    return out


__all__ = [
    "MAX_RERUN", "PREFIX", "RERUN_DAG_ID", "REGISTRATIONS_ASSET_NAME", "REGISTRATIONS_ASSET_URI", "VALIDATE_DAG_ID",
    "RerunSelection", "ValidationFailed", "build_validation_tasks", "class_settings", "control_queue", "discover", "estimate_bytes", "in_class", "task_result",
    "plan", "plan_versions", "planned_memory", "pool_definitions", "refs_from_extras", "rerun_selection", "route",
    "select_for_rerun", "sweep_interval_s", "task_owner", "validation_task",
]
