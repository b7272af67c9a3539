"""What the dashboard, its JSON API, ``/metrics`` and ``ckpt-stage show`` read from MLflow.

MLflow is the system of record (docs/architecture.md): version tags say where each version stands, and every
attempt is a run in the ``ckpt-stage-validations`` experiment holding ``report.json``. This module
turns those into plain JSON-able dicts; it imports neither FastAPI nor Jinja, so the CLI can use it.

Staying fast with thousands of versions:
- lists are read with server-side tag filters (``Registry.iter_versions``) and paginated here;
- every MLflow read is kept in a small cache for a few seconds (``ttl_s``), and a stale entry is
  served at once while one background refresh runs (``stale_s``), so a page never waits for a full
  listing more than once; concurrent misses for one key share one fetch;
- reports are immutable once written, so they are cached by run id without expiry (LRU-bounded).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import datetime as dt
import logging
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import Any
from urllib.parse import quote

from ckpt_stage import drift
from ckpt_stage.config import Settings, format_size
from ckpt_stage.domain import ReasonCode, Status, Verdict, VersionRef
from ckpt_stage.errors import UsageError
from ckpt_stage.orchestrate import VALIDATE_DAG_ID
from ckpt_stage.registry import (
    ATTEMPT,
    LEASE_OWNER,
    LEASE_UNTIL,
    REASONS,
    RUN_ID,
    RUN_MODEL,
    RUN_VERSION,
    SUMMARY,
    TAG,
    VALIDATED_AT,
    VERDICT,
    Registry,
    VersionState,
    iso_ms,
    now_utc,
    parse_iso,
)

log = logging.getLogger(__name__)

# Problems first: what a person has to act on sits at the top of the home page.
STATUS_ORDER: dict[str | None, int] = {
    Status.QUARANTINED.value: 0,
    Status.ERROR.value: 1,
    Status.VALIDATING.value: 2,
    Status.PENDING.value: 3,
    None: 4,
    Status.SKIPPED.value: 5,
    Status.PROMOTED.value: 6,
}
STATUS_FILTERS = (*(s.value for s in Status), "none")
MAX_PAGE_SIZE = 500
MAX_REPORTS_PER_DETAIL = 20
"""Older attempts are listed without their report (one S3 read each); MLflow keeps them all."""

# Tags or report fields a validation run may carry to locate its Airflow task (written by the DAG).
AIRFLOW_RUN_TAGS = {"dag_id": "airflow.dag_id", "run_id": "airflow.run_id", "task_id": "airflow.task_id",
                    "map_index": "airflow.map_index", "try_number": "airflow.try_number"}


# -- small helpers -----------------------------------------------------------------------------------



def human_age(seconds: float | None) -> str:
    if seconds is None or seconds < 0 or math.isnan(seconds):
        return "—"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{int(seconds // size)}{unit}"
    return f"{int(seconds)}s"


def human_bytes(n: float | int | None) -> str:
    return "—" if n is None else format_size(n)


def human_seconds(s: float | int | None) -> str:
    if s is None:
        return "—"
    s = float(s)
    if s < 1:
        return f"{s * 1000:.0f} ms"
    if s < 120:
        return f"{s:.2f} s"
    return f"{s / 60:.1f} min"


def version_key(version: str) -> tuple[int, str]:
    return (int(version), version) if version.isdigit() else (-1, version)


# -- cache -------------------------------------------------------------------------------------------
class TTLCache:
    """A tiny stale-while-revalidate cache keyed by hashable tuples.

    ``get(key, load)``: fresh (younger than ``ttl_s``) → cached value; stale but younger than
    ``stale_s`` → cached value now and one background refresh; older or missing → ``load()`` in the
    caller, with concurrent callers for the same key waiting for that one load (no stampede on
    MLflow when a page and an API poll arrive together).
    """

    def __init__(self, ttl_s: float = 5.0, stale_s: float = 60.0, max_entries: int = 256,
                 clock: Callable[[], float] = time.monotonic):
        self.ttl_s, self.stale_s, self.max_entries, self.clock = ttl_s, max(stale_s, ttl_s), max_entries, clock
        self._data: OrderedDict[Any, tuple[float, Any]] = OrderedDict()
        self._lock = threading.Lock()
        self._key_locks: dict[Any, threading.Lock] = {}
        self._refreshing: set[Any] = set()
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None

    def get(self, key: Any, load: Callable[[], Any]) -> Any:
        now = self.clock()
        with self._lock:
            hit = self._data.get(key)
            if hit is not None:
                self._data.move_to_end(key)
        if hit is not None:
            age = now - hit[0]
            if age < self.ttl_s:
                return hit[1]
            if age < self.stale_s:
                self._refresh_later(key, load)
                return hit[1]
        with self._key_lock(key):
            with self._lock:  # another caller may have loaded it while we waited
                hit = self._data.get(key)
            if hit is not None and self.clock() - hit[0] < self.ttl_s:
                return hit[1]
            return self._load(key, load)

    def invalidate(self) -> None:
        with self._lock:
            self._data.clear()

    def _key_lock(self, key: Any) -> threading.Lock:
        with self._lock:
            return self._key_locks.setdefault(key, threading.Lock())

    def _load(self, key: Any, load: Callable[[], Any]) -> Any:
        started = self.clock()
        value = load()
        with self._lock:
            self._data[key] = (started, value)
            self._data.move_to_end(key)
            while len(self._data) > self.max_entries:
                old, _ = self._data.popitem(last=False)
                self._key_locks.pop(old, None)
        return value

    def _refresh_later(self, key: Any, load: Callable[[], Any]) -> None:
        with self._lock:
            if key in self._refreshing:
                return
            self._refreshing.add(key)
            if self._pool is None:
                self._pool = concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="ckpt-stage-cache")

        def refresh() -> None:
            try:
                with self._key_lock(key):
                    self._load(key, load)
            except Exception as exc:  # noqa: BLE001 - the stale value stays; the next miss retries
                log.warning("refreshing %r failed: %s", key, exc)
            finally:
                with self._lock:
                    self._refreshing.discard(key)

        self._pool.submit(refresh)


class LRU:
    """Bounded memo for immutable things (reports by run id)."""

    def __init__(self, max_entries: int = 512):
        self.max_entries = max_entries
        self._data: OrderedDict[Any, Any] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Any, load: Callable[[], Any]) -> Any:
        with self._lock:
            if key in self._data:
                self._data.move_to_end(key)
                return self._data[key]
        value = load()
        if value is not None:  # a report not written yet may appear later: do not remember misses
            with self._lock:
                self._data[key] = value
                while len(self._data) > self.max_entries:
                    self._data.popitem(last=False)
        return value


# -- rows --------------------------------------------------------------------------------------------
def row_of(state: VersionState, now: dt.datetime | None = None) -> dict[str, Any]:
    """One version as the list views show it."""
    now = now or now_utc()
    tags = state.tags
    status = state.status.value if state.status else None
    validated_at = tags.get(VALIDATED_AT) or None
    created_at = iso_ms(state.created_ms)
    since = parse_iso(validated_at) if validated_at else None
    if since is None and state.created_ms:
        since = dt.datetime.fromtimestamp(state.created_ms / 1000, dt.UTC)
    age_s = (now - since).total_seconds() if since else None
    return {
        "model": state.ref.name,
        "version": state.ref.version,
        "status": status,
        "reasons": list(state.reasons),
        "summary": tags.get(SUMMARY, ""),
        "attempt": state.attempt,
        "validated_at": validated_at,
        "created_at": created_at,
        "age_s": round(age_s, 1) if age_s is not None else None,
        "run_id": tags.get(RUN_ID) or None,
        "source_run_id": state.run_id,
        "owner": tags.get("owner") or tags.get("team") or tags.get("mlflow.user") or None,
        "lease_owner": tags.get(LEASE_OWNER) or None,
        "lease_until": tags.get(LEASE_UNTIL) or None,
        "aliases": list(state.aliases),
        "holds_alias": False,  # the configured alias (what deployments get); filled in by DashboardData
    }


def sort_rows(rows: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Quarantined and error first; newest verdict (or registration) first within a status."""
    def key(r: dict[str, Any]) -> tuple:
        return (STATUS_ORDER.get(r["status"], 4), -(_ts(r["validated_at"]) or _ts(r["created_at"]) or 0.0),
                r["model"], -version_key(r["version"])[0])

    return sorted(rows, key=key)


def _ts(text: str | None) -> float | None:
    t = parse_iso(text) if text else None
    return t.timestamp() if t else None


# -- the reader --------------------------------------------------------------------------------------
class DashboardData:
    """Read-side of the dashboard over one ``Registry``; safe to share between request threads."""

    def __init__(self, settings: Settings, registry: Registry | None = None, *,
                 ttl_s: float = 5.0, stale_s: float = 60.0, clock: Callable[[], float] = time.monotonic):
        self.settings = settings
        self.registry = registry or Registry(self.settings)
        self.cache = TTLCache(ttl_s, stale_s, clock=clock)
        self.detail_cache = TTLCache(min(ttl_s, 2.0), min(ttl_s, 2.0), clock=clock)
        self.reports = LRU()

    def invalidate(self) -> None:
        self.cache.invalidate()
        self.detail_cache.invalidate()

    # lists ----------------------------------------------------------------------------------------
    def rows(self, *, status: str | None = None, model: str | None = None,
             reason: str | None = None) -> list[dict[str, Any]]:
        """Every matching version, sorted problems-first. ``status="none"``: never validated."""
        model, reason = model or None, reason or None
        server_status = status if status and status != "none" else None

        def load() -> list[dict[str, Any]]:
            now = now_utc()
            states = self.registry.iter_versions(model=model, status=server_status, reason=reason)
            rows = [row_of(s, now) for s in states]
            holders = self._safe(self.alias_holders) or {}
            for r in rows:
                r["aliases"] = r["aliases"] or holders.get((r["model"], r["version"]), [])
                r["holds_alias"] = self.settings.alias in r["aliases"]
            return sort_rows(rows)

        rows = self.cache.get(("rows", server_status, model, reason), load)
        if status == "none":
            rows = [r for r in rows if r["status"] is None]
        return rows

    def page(self, *, status: str | None = None, model: str | None = None, reason: str | None = None,
             page: int = 1, page_size: int = 50) -> dict[str, Any]:
        page_size = max(1, min(int(page_size), MAX_PAGE_SIZE))
        rows = self.rows(status=status, model=model, reason=reason)
        pages = max(1, math.ceil(len(rows) / page_size))
        page = max(1, min(int(page), pages))
        start = (page - 1) * page_size
        return {
            "items": rows[start:start + page_size],
            "total": len(rows),
            "page": page,
            "page_size": page_size,
            "pages": pages,
            "filters": {"status": status, "model": model, "reason": reason},
        }

    def counts(self, *, model: str | None = None, reason: str | None = None) -> dict[str, int]:
        """Versions per status (``none`` for never validated), for the tabs and ``/metrics``."""
        out = {s: 0 for s in STATUS_FILTERS}
        for r in self.rows(model=model, reason=reason):
            out[r["status"] or "none"] = out.get(r["status"] or "none", 0) + 1
        return out

    def reason_counts(self, *, status: str | None = Status.QUARANTINED.value,
                      model: str | None = None) -> dict[str, int]:
        counts: dict[str, int] = {}
        for r in self.rows(status=status, model=model):
            for code in r["reasons"]:
                counts[code] = counts.get(code, 0) + 1
        return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))

    def alias_holders(self) -> dict[tuple[str, str], list[str]]:
        """(model, version) → the aliases it holds, for every registered model in one paginated listing.

        MLflow's ``search_model_versions`` returns every version with ``aliases=[]`` (3.17's SQL store fills
        them in only for ``get_model_version``), so the lists would never show which version holds the
        alias without this; ``search_registered_models`` does carry each model's alias → version map."""
        return self.cache.get(("aliases",), self.registry.alias_holders)

    def models(self) -> list[str]:
        return sorted({r["model"] for r in self.rows()})

    # one version -----------------------------------------------------------------------------------
    def detail(self, model: str, version: str) -> dict[str, Any] | None:
        """The version, every attempt (newest first) with its report, drift and links; None if unknown."""
        return self.detail_cache.get(("detail", model, str(version)), lambda: self._detail(model, str(version)))

    def _detail(self, model: str, version: str) -> dict[str, Any] | None:
        ref = VersionRef(model, version)
        try:
            state = self.registry.get(ref)
        except UsageError:
            return None
        attempts = []
        exp_id = self._experiment_id()
        # No experiment yet means no attempt yet; Registry.attempts would create it, and a view must not write.
        runs = self.registry.attempts(ref) if exp_id else []
        reports = self._reports([r["run_id"] for r in runs[:MAX_REPORTS_PER_DETAIL]])
        for run in runs:
            tags = run.get("tags") or {}
            report = reports.get(run["run_id"])
            attempts.append({
                "attempt": _int(tags.get(ATTEMPT)) or (report or {}).get("attempt"),
                "run_id": run["run_id"],
                "started_at": iso_ms(run.get("start_time")),
                "verdict": tags.get(VERDICT) or (report or {}).get("verdict"),
                "reasons": [c for c in (tags.get(REASONS) or "").split(",") if c],
                "summary": tags.get(SUMMARY) or (report or {}).get("summary", ""),
                "metrics": run.get("metrics") or {},
                "report": report,
                "links": {"mlflow_run": self.mlflow_run_url(run["run_id"], exp_id),
                          "airflow_log": self.airflow_log_url(tags, report)},
            })
        promoted = self._safe(lambda: self.registry.alias_version(model))
        drift = self._drift(model, version, promoted, attempts[0]["report"] if attempts else None)
        row = row_of(state)
        row["holds_alias"] = self.settings.alias in row["aliases"] or (promoted is not None and promoted == version)
        return {
            "model": model,
            "version": version,
            "state": {**row, "tags": {k: v for k, v in state.tags.items() if k.startswith(TAG)}},
            "alias": self.settings.alias,
            "promoted_version": promoted,
            "attempts": attempts,
            "drift": drift,
            "links": {
                "mlflow_version": self.mlflow_version_url(model, version),
                "mlflow_source_run": self.mlflow_run_url(state.run_id) if state.run_id else None,
                "mlflow_validation_run": self.mlflow_run_url(row["run_id"], exp_id) if row["run_id"] else None,
                "airflow": self.airflow_dag_url(VALIDATE_DAG_ID),
            },
        }

    def _reports(self, run_ids: list[str]) -> dict[str, dict[str, Any] | None]:
        if not run_ids:
            return {}

        def one(run_id: str) -> dict[str, Any] | None:
            try:
                return self.reports.get(run_id, lambda: self.registry.report_of(run_id))
            except Exception as exc:  # noqa: BLE001 - a missing report must not hide the other attempts
                log.warning("report.json of run %s unreadable: %s", run_id, exc)
                return None

        # S3 reads are independent; a few threads keep a many-attempt page quick.
        with concurrent.futures.ThreadPoolExecutor(min(4, len(run_ids))) as pool:
            return dict(zip(run_ids, pool.map(one, run_ids), strict=True))

    def _drift(self, model: str, version: str, promoted: str | None,
               report: dict[str, Any] | None) -> dict[str, Any] | None:
        """The drift view: the report's drift findings (``drift.findings_of``), the layer diff against the
        alias holder (``drift.diff_layers``), and the weight changes the report recorded."""
        findings = drift.findings_of(report)
        weights = next((f.get("detail") for f in findings if (f.get("detail") or {}).get("kind") == drift.WEIGHTS
                        and f.get("code") is None), None)
        empty: dict[str, list] = {"added": [], "removed": [], "changed": []}
        if not promoted or promoted == version:
            return {"against": None, "findings": findings, **empty, "weights": weights} if findings else None
        prev_layers = None
        with contextlib.suppress(Exception):
            prev = self.registry.get(VersionRef(model, promoted))
            run_id = prev.tags.get(RUN_ID)
            prev_report = self.reports.get(run_id, lambda: self.registry.report_of(run_id)) if run_id else None
            prev_layers = ((prev_report or {}).get("model_info") or {}).get("layers")
        layers = ((report or {}).get("model_info") or {}).get("layers")
        if not findings and not (layers and prev_layers):
            return None
        diff = drift.diff_layers(prev_layers, layers) if layers and prev_layers else empty
        return {"against": promoted, "findings": findings, **diff, "weights": weights}

    # stats -----------------------------------------------------------------------------------------
    def reason_stats(self, *, days: int = 14, model: str | None = None) -> dict[str, Any]:
        """Versions quarantined per reason per UTC day over the last ``days`` days (from attempt runs).

        A version quarantined twice in a day counts once for that day: the chart tells how many
        versions each reason stopped, not how often someone pressed re-run.
        """
        days = max(1, min(int(days), 366))
        return self.cache.get(("reason_stats", days, model or None), lambda: self._reason_stats(days, model))

    def _reason_stats(self, days: int, model: str | None) -> dict[str, Any]:
        today = now_utc().date()
        first = today - dt.timedelta(days=days - 1)
        buckets = [(first + dt.timedelta(days=i)).isoformat() for i in range(days)]
        since_ms = int(dt.datetime.combine(first, dt.time(), dt.UTC).timestamp() * 1000)
        seen: dict[str, dict[str, set]] = {}
        for run in self.registry.iter_runs(verdict=Verdict.QUARANTINE.value, model=model, since_ms=since_ms):
            day = dt.datetime.fromtimestamp(run["start_time"] / 1000, dt.UTC).date().isoformat()
            tags = run["tags"]
            who = (tags.get(RUN_MODEL), tags.get(RUN_VERSION))
            for code in filter(None, (tags.get(REASONS) or "").split(",")):
                seen.setdefault(code, {}).setdefault(day, set()).add(who)
        order = {c.value: i for i, c in enumerate(ReasonCode)}
        series = {code: [len(per_day.get(d, ())) for d in buckets]
                  for code, per_day in sorted(seen.items(), key=lambda kv: order.get(kv[0], 99))}
        return {"days": days, "buckets": buckets, "series": series,
                "totals": {c: sum(v) for c, v in series.items()}}

    def run_stats(self) -> dict[str, Any]:
        """Durations, bytes and verdict counts of every recorded attempt, for ``/metrics``."""
        return self.cache.get(("run_stats",), self._run_stats)

    def _run_stats(self) -> dict[str, Any]:
        durations: list[float] = []
        total_bytes = 0.0
        verdicts: dict[str, int] = {}
        for run in self.registry.iter_runs():
            m = run["metrics"]
            if "timings_s.total" in m:
                durations.append(float(m["timings_s.total"]))
            total_bytes += float(m.get("bytes", 0.0) or 0.0)
            v = run["tags"].get(VERDICT) or "unknown"
            verdicts[v] = verdicts.get(v, 0) + 1
        return {"durations": durations, "bytes": total_bytes, "verdicts": verdicts}

    def _experiment_id(self) -> str | None:
        return self.cache.get(("experiment",), lambda: self._safe(self.registry.find_experiment_id))

    # links -----------------------------------------------------------------------------------------
    def mlflow_base(self) -> str | None:
        if self.settings.mlflow_ui_url:
            return self.settings.mlflow_ui_url.rstrip("/")
        uri = self._safe(lambda: self.registry.tracking_uri)
        return uri.rstrip("/") if uri and uri.startswith(("http://", "https://")) else None

    def mlflow_version_url(self, model: str, version: str) -> str | None:
        base = self.mlflow_base()
        return f"{base}/#/models/{quote(model, safe='')}/versions/{quote(str(version), safe='')}" if base else None

    def mlflow_run_url(self, run_id: str | None, experiment_id: str | None = None) -> str | None:
        base = self.mlflow_base()
        if not base or not run_id:
            return None
        if experiment_id:
            return f"{base}/#/experiments/{quote(experiment_id, safe='')}/runs/{quote(run_id, safe='')}"
        return f"{base}/#/runs/{quote(run_id, safe='')}"

    def airflow_dag_url(self, dag_id: str) -> str | None:
        base = self.settings.airflow_url.rstrip("/")
        return f"{base}/dags/{quote(dag_id, safe='')}" if base else None

    def airflow_log_url(self, run_tags: dict[str, str], report: dict[str, Any] | None) -> str | None:
        """The Airflow task (log tab) that ran an attempt, when the attempt says which one it was."""
        base = self.settings.airflow_url.rstrip("/")
        if not base:
            return None
        info = dict((report or {}).get("airflow") or {})
        for key, tag in AIRFLOW_RUN_TAGS.items():
            for name in (TAG + tag, tag):
                if run_tags.get(name) and not info.get(key):
                    info[key] = run_tags[name]
        if not (info.get("dag_id") and info.get("run_id") and info.get("task_id")):
            return None
        url = (f"{base}/dags/{quote(str(info['dag_id']), safe='')}/runs/{quote(str(info['run_id']), safe='')}"
               f"/tasks/{quote(str(info['task_id']), safe='')}")
        map_index = info.get("map_index")
        if map_index not in (None, "", -1, "-1"):
            url += f"/mapped/{quote(str(map_index), safe='')}"
        if info.get("try_number"):
            url += f"?try_number={quote(str(info['try_number']), safe='')}"
        return url

    @staticmethod
    def _safe(fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 - optional facts (alias, experiment) must not break a page
            log.warning("dashboard read failed: %s", exc)
            return None


def _int(text: Any) -> int | None:
    try:
        return int(text)
    except (TypeError, ValueError):
        return None
