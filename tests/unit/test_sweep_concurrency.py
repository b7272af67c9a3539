"""A sweep validates several versions at once (``CKPT_STAGE_SWEEP_CONCURRENCY``), in threads that
share the clients and the one fork server; outcomes keep the order of the work list."""

from __future__ import annotations

import threading
import time

import pytest

from ckpt_stage import pipeline
from ckpt_stage.config import Settings
from ckpt_stage.domain import VersionRef


@pytest.mark.parametrize("concurrency", [1, 3])
def test_run_many_keeps_order_and_bounds_concurrency(monkeypatch, concurrency):
    lock = threading.Lock()
    active, peak, seen = [0], [0], []

    def fake(ref, *, settings, batch, **kwargs):
        assert batch is True and kwargs == {"owner": "me"}
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        time.sleep(0.05 if int(ref.version) % 2 else 0.01)  # finish out of order
        with lock:
            active[0] -= 1
        return pipeline.Outcome(None, skipped=ref.version)

    monkeypatch.setattr(pipeline, "validate_version_safely", fake)
    refs = [VersionRef("m", str(i)) for i in range(1, 10)]
    outcomes = pipeline.run_many(refs, settings=Settings(sweep_concurrency=concurrency), owner="me",
                                 on_result=lambda ref, o: seen.append(ref.version))
    assert [o.skipped for o in outcomes] == [r.version for r in refs]
    assert sorted(seen, key=int) == [r.version for r in refs]
    assert peak[0] == concurrency


def test_sweep_concurrency_setting(monkeypatch):
    monkeypatch.setenv("CKPT_STAGE_SWEEP_CONCURRENCY", "7")
    assert Settings.from_env().sweep_concurrency == 7
    monkeypatch.setenv("CKPT_STAGE_SWEEP_CONCURRENCY", "0")
    assert Settings.from_env().sweep_concurrency == 1


class _ArtifactClient:
    """Just the MLflow client call ``report_of`` makes, counting downloads."""

    def __init__(self, reports):
        self.reports, self.downloads = reports, 0

    def download_artifacts(self, run_id, path, dst):
        import json
        import os

        self.downloads += 1
        if run_id not in self.reports:
            raise OSError("no such artifact")
        out = os.path.join(dst, path)
        with open(out, "w") as fh:
            json.dump(self.reports[run_id], fh)
        return out


def test_report_of_reads_each_run_once():
    """An attempt's report.json never changes once written: a sweep reads the promoted version's
    report (for drift) once, not once per validated version; a missing one is asked for again."""
    from ckpt_stage.registry import Registry

    client = _ArtifactClient({"r1": {"verdict": "pass", "model_info": {"layers": [1]}}})
    reg = Registry(Settings(), client=client)
    first = reg.report_of("r1")
    first["verdict"] = "changed by a caller"
    assert reg.report_of("r1") == {"verdict": "pass", "model_info": {"layers": [1]}}
    assert client.downloads == 1
    assert reg.report_of("missing") is None and reg.report_of("missing") is None
    assert client.downloads == 3


def test_prompt_check_once_per_model_name():
    """MLflow's client reads the registered model before each tag write; the registry's client does
    it once per model name (a prompt is still refused: the first check of each name is MLflow's)."""
    from ckpt_stage.registry import _prompt_check_once

    calls = []

    class Client:  # the one method of MlflowClient this wraps
        def _raise_if_prompt(self, name):
            calls.append(name)
            if name == "a-prompt":
                raise ValueError("not a model")

    client = _prompt_check_once(Client())
    for name in ("m", "m", "n", "m"):
        client._raise_if_prompt(name)
    assert calls == ["m", "n"]
    for _ in range(2):
        with pytest.raises(ValueError):
            client._raise_if_prompt("a-prompt")
    assert calls == ["m", "n", "a-prompt", "a-prompt"]
