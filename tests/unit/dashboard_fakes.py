"""In-memory stand-ins for the MLflow registry, for the dashboard's unit tests (no server)."""

from __future__ import annotations

import datetime as dt
import time
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

from ckpt_stage.domain import VersionRef
from ckpt_stage.errors import UsageError
from ckpt_stage.registry import VersionState


@dataclass
class Page(list):
    token: str | None = None

    def __init__(self, items, token=None):
        super().__init__(items)
        self.token = token


@dataclass
class FakeClient:
    runs: list[Any] = field(default_factory=list)
    experiment: str | None = "7"
    calls: int = 0

    aliases: dict[str, str] = field(default_factory=dict)
    """model → version holding the alias (shared with FakeRegistry.alias)."""

    def search_registered_models(self, max_results=1000, page_token=None):
        return Page([SimpleNamespace(name=m, aliases={"validated": v}) for m, v in self.aliases.items()])

    def get_experiment_by_name(self, name):
        return SimpleNamespace(experiment_id=self.experiment) if self.experiment else None

    def search_runs(self, experiment_ids, filter_string="", max_results=1000, page_token=None):
        self.calls += 1
        out = []
        for r in self.runs:
            tags = r.data.tags
            if "'quarantine'" in filter_string and tags.get("ckpt_stage.verdict") != "quarantine":
                continue
            out.append(r)
        return Page(out)


def fake_run(model, version, verdict, reasons=(), *, days_ago=0, total=1.5, nbytes=1000, run_id=None):
    start = int((time.time() - days_ago * 86400) * 1000)
    return SimpleNamespace(
        info=SimpleNamespace(run_id=run_id or f"run-{model}-{version}-{start}", start_time=start),
        data=SimpleNamespace(tags={"ckpt_stage.model": model, "ckpt_stage.version": str(version),
                                   "ckpt_stage.verdict": verdict, "ckpt_stage.reasons": ",".join(reasons)},
                             metrics={"timings_s.total": total, "bytes": nbytes}),
    )


class FakeRegistry:
    """Just what DashboardData and the re-runner call."""

    def __init__(self, states: list[VersionState] | None = None):
        self.states: dict[VersionRef, VersionState] = {s.ref: s for s in states or []}
        self.attempt_runs: dict[VersionRef, list[dict]] = {}
        self.reports_by_run: dict[str, dict] = {}
        self.alias: dict[str, str] = {}
        self.client = FakeClient()
        self.client.aliases = self.alias
        self.list_calls = 0

    def add(self, model, version, status=None, reasons=(), *, attempt=0, summary="", age_s=60, **tags):
        t = {}
        if status:
            t["ckpt_stage.status"] = status
            t["ckpt_stage.reasons"] = ",".join(reasons)
            t["ckpt_stage.attempt"] = str(attempt or 1)
            t["ckpt_stage.summary"] = summary or f"{model} v{version}: {status}"
            at = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=age_s)
            t["ckpt_stage.validated_at"] = at.isoformat(timespec="seconds").replace("+00:00", "Z")
            t["ckpt_stage.run_id"] = f"run-{model}-{version}"
        t.update(tags)
        st = VersionState(VersionRef(model, str(version)), t, created_ms=int(time.time() * 1000) - 3_600_000)
        self.states[st.ref] = st
        return st

    def iter_versions(self, *, model=None, status=None, reason=None):
        self.list_calls += 1
        for st in list(self.states.values()):
            if model and st.ref.name != model:
                continue
            if status and st.tags.get("ckpt_stage.status") != status:
                continue
            if reason and reason not in st.reasons:
                continue
            yield st

    def get(self, ref):
        if ref not in self.states:
            raise UsageError(f"no {ref}")
        return self.states[ref]

    def attempts(self, ref):
        return list(self.attempt_runs.get(ref, []))

    def report_of(self, run_id):
        return self.reports_by_run.get(run_id)

    def alias_version(self, model):
        return self.alias.get(model)

    # what the dashboard reads through the adapter, from the fake client's runs and aliases
    tracking_uri = ""

    def alias_holders(self):
        return {(rm.name, str(v)): [a] for rm in self.client.search_registered_models()
                for a, v in rm.aliases.items()}

    def find_experiment_id(self):
        exp = self.client.get_experiment_by_name("ckpt-stage-validations")
        return exp.experiment_id if exp else None

    def iter_runs(self, *, verdict=None, model=None, since_ms=None):
        if self.find_experiment_id() is None:
            return
        flt = f"'{verdict}'" if verdict else ""
        for r in self.client.search_runs([], filter_string=flt):
            tags = r.data.tags
            if (model and tags.get("ckpt_stage.model") != model) or (since_ms and r.info.start_time < since_ms):
                continue
            yield {"run_id": r.info.run_id, "start_time": r.info.start_time, "tags": dict(tags),
                   "metrics": dict(r.data.metrics)}
