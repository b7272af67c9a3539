"""``sweep`` and ``rerun`` without ``--json``: a table of what was decided on stdout; ``--json`` unchanged."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from ckpt_stage.cli import main
from ckpt_stage.domain import Decision, Finding, ReasonCode as R, Verdict, VersionRef
from ckpt_stage.pipeline import Outcome, build_report
from ckpt_stage.policy import OTHER_FLAVOR, decide
from tests.unit.dashboard_fakes import FakeRegistry

HINT = ("set the ckpt_stage.arch tag to the class the weights belong to (package.module:Class) and "
        "ckpt_stage.arch_kwargs to its constructor arguments as a JSON object")


def outcome(model, version, findings, *, skip=False, attempt=1):
    from ckpt_stage.config import Settings

    decision = decide(findings, Settings(other_flavors="skip" if skip else "quarantine"))
    report = build_report(None, decision, model=VersionRef(model, str(version)), attempt=attempt,
                          findings=findings, timings={"total": 0.5})
    return Outcome(report, run_id=f"run-{model}-{version}")


OUTCOMES = [
    (VersionRef("clf", "1"), outcome("clf", 1, [])),
    (VersionRef("clf", "2"), outcome("clf", 2, [Finding(R.PARTIAL_CHECKPOINT, "model.pt holds a state_dict but no "
                                                        "architecture was declared to load it into", HINT)])),
    (VersionRef("sk", "1"), outcome("sk", 1, [Finding(R.UNSUPPORTED_FORMAT, "sklearn flavor (served through "
                                                      "mlflow.sklearn): ckpt-stage validates PyTorch models",
                                                      "register PyTorch models", file="MLmodel",
                                                      detail={"kind": OTHER_FLAVOR})], skip=True)),
    (VersionRef("net", "4"), outcome("net", 4, [Finding(R.STORAGE_UNAVAILABLE, "S3 kept failing", "try later")],
                                     attempt=0)),
    (VersionRef("busy", "7"), Outcome(None, skipped="busy/7 is being validated by another worker (lease held)")),
]


@pytest.fixture
def fake_sweep(monkeypatch):
    import ckpt_stage.pipeline as pipeline

    def sweep(*, settings=None, on_result=None, **_):
        for ref, o in OUTCOMES:
            if on_result:
                on_result(ref, o)
        return [o for _, o in OUTCOMES]

    monkeypatch.setattr(pipeline, "sweep", sweep)


def test_sweep_prints_a_table_of_decisions_on_stdout(fake_sweep):
    result = CliRunner(env={"COLUMNS": "100"}).invoke(main, ["sweep"])
    assert result.exit_code == 3, result.output  # one version ended in error
    out = result.stdout
    assert max(len(line) for line in out.splitlines()) <= 100
    words = set(out.replace("│", " ").split())
    for text in ("model", "status", "reasons", "summary", "clf", "promoted", "quarantined", "PARTIAL_CHECKPOINT",
                 "sk", "skipped", "UNSUPPORTED_FORMAT", "net", "busy", "untouched"):
        assert text in words, text
    assert "error, not recorded" in out
    # The summary is wrapped in its column, never cut: every word of it is printed whole, to the last one.
    for o in [o for _, o in OUTCOMES if o.report]:
        assert set(o.report.summary.split()) <= words, o.report.summary
    assert "(lease" in words and "held)" in words
    flat = " ".join(out.split())
    assert "5 versions: 1 promoted, 1 quarantined, 1 skipped, 1 error, 1 held by another worker" in flat
    assert "{" not in out  # no JSON without --json


def test_sweep_json_is_unchanged(fake_sweep):
    result = CliRunner().invoke(main, ["sweep", "--json"])
    doc = json.loads(result.stdout)
    assert doc["count"] == 5 and doc["errors"] == 1
    assert doc["results"][1] == {"model": "clf", "version": "2", "verdict": "quarantine",
                                 "reasons": ["PARTIAL_CHECKPOINT"], "attempt": 1, "run_id": "run-clf-2",
                                 "summary": OUTCOMES[1][1].report.summary}
    assert doc["results"][4] == {"model": None, "verdict": None, "skipped": OUTCOMES[4][1].skipped}


def test_an_empty_sweep_says_so(monkeypatch):
    import ckpt_stage.pipeline as pipeline

    monkeypatch.setattr(pipeline, "sweep", lambda **_: [])
    result = CliRunner().invoke(main, ["sweep"])
    assert result.exit_code == 0 and "Nothing to validate" in result.stdout


@pytest.fixture
def fake_rerun(monkeypatch):
    import ckpt_stage.pipeline as pipeline
    import ckpt_stage.registry as registry

    reg = FakeRegistry()
    reg.add("sk", 1, "skipped", ["UNSUPPORTED_FORMAT"])
    reg.add("clf", 2, "quarantined", ["PARTIAL_CHECKPOINT"])
    calls = []
    by_ref = dict(OUTCOMES)

    def validate(ref, **kwargs):
        calls.append((ref, kwargs.get("force")))
        return by_ref[ref]

    monkeypatch.setattr(registry, "Registry", lambda settings: reg)
    monkeypatch.setattr(pipeline, "validate_version_safely", validate)
    return calls


def test_rerun_of_skipped_versions_prints_a_table(fake_rerun):
    result = CliRunner(env={"COLUMNS": "80"}).invoke(main, ["rerun", "--status", "skipped"])
    assert result.exit_code == 0, result.output
    assert fake_rerun == [(VersionRef("sk", "1"), True)]
    assert "sk" in result.stdout and "skipped" in result.stdout and "Not validated" in result.stdout
    assert max(len(line) for line in result.stdout.splitlines()) <= 80
    one = CliRunner().invoke(main, ["rerun", "--model", "clf", "--version", "2", "--json"])
    assert json.loads(one.stdout)["results"][0]["verdict"] == "quarantine"


def test_rerun_names_every_status_it_accepts():
    result = CliRunner().invoke(main, ["rerun", "--status", "pending"])
    assert result.exit_code == 2 and "skipped" in result.output


def test_decision_table_skip_verdict_never_promotes():
    d = Decision(Verdict.SKIP, ())
    assert d.verdict.exit_code == 4
