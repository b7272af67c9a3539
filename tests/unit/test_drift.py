"""Drift against the alias holder: the worker's fingerprints (``load/checks``) and ``ckpt_stage.drift``."""

from __future__ import annotations

import base64
import copy
import math

import pytest
import torch

from ckpt_stage import drift
from ckpt_stage.config import Settings
from ckpt_stage.domain import ReasonCode, Severity, Verdict
from ckpt_stage.errors import ConfigError
from ckpt_stage.load import checks
from ckpt_stage.policy import decide


def fingerprint(state: dict[str, torch.Tensor]) -> dict:
    """The layer table the worker reports for ``state`` (the same two calls as the loader)."""
    norms: dict[str, float] = {}
    assert checks.nonfinite(state, file=None, norms=norms) is None
    layers, _ = checks.layers_info(state, norms)
    return layers


def model_state(seed: int, hidden: int = 64) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(32, hidden), torch.nn.BatchNorm1d(hidden), torch.nn.Linear(hidden, 4))
    return {k: v.clone() for k, v in net.state_dict().items()}


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm((a - b).double()) / torch.linalg.vector_norm(b.double()))


def weight_finding(findings):
    return next(f for f in findings if f.detail.get("kind") == drift.WEIGHTS and f.code is None)


# -- fingerprints -------------------------------------------------------------------------------------


def test_sample_positions_are_distinct_spread_and_nested():
    n = 1_000_003
    first = checks.sample_positions(n, 256)
    assert len(set(first)) == 256 and min(first) >= 0 and max(first) < n
    assert max(first) > n // 2  # spread over the tensor, not its head
    assert checks.sample_positions(n, 16) == first[:16]  # a smaller budget is a prefix: reports still compare
    assert sorted(checks.sample_positions(100, 256)) == list(range(100))  # small tensors: every element
    assert checks.sample_positions(0, 8) == []


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_one_pass_gives_finiteness_and_the_exact_norm(dtype):
    t = torch.randn(3 * checks.FINITE_CHUNK + 5).to(dtype)  # several pieces
    finite, norm = checks.finite_and_norm(t)
    assert finite
    assert norm == pytest.approx(float(torch.linalg.vector_norm(t.double())), rel=1e-9)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_values_are_still_found(bad):
    t = torch.ones(checks.FINITE_CHUNK + 10)
    t[-3] = bad
    assert checks.finite_and_norm(t) == (False, None)
    norms: dict[str, float] = {}
    found = checks.nonfinite({"w": t, "ok": torch.ones(3)}, file="m.pt", norms=norms)
    assert found is not None and found.code is ReasonCode.NONFINITE_WEIGHTS and "w (" in found.message
    assert set(norms) == {"ok"}  # no norm recorded for the broken tensor


def test_huge_finite_float64_values_are_finite_with_an_unknown_norm():
    assert checks.finite_and_norm(torch.tensor([1e200, -1e200], dtype=torch.float64)) == (True, None)


def test_float8_and_complex_tensors_are_checked():
    f8 = torch.ones(10).to(torch.float8_e4m3fn)
    assert checks.finite_and_norm(f8) == (True, pytest.approx(math.sqrt(10)))
    c = torch.tensor([3 + 4j, 0j], dtype=torch.complex64)
    assert checks.finite_and_norm(c) == (True, pytest.approx(5.0))
    layers = fingerprint({"c": c})
    assert layers["c"]["norm"] == pytest.approx(5.0) and layers["c"]["sample"]


def test_layer_table_carries_norm_and_sample_within_the_report_budget():
    state = {f"t{i}": torch.randn(1000) for i in range(2000)} | {"steps": torch.tensor(7)}
    layers = fingerprint(state)
    assert "norm" not in layers["steps"] and "sample" not in layers["steps"]  # integer buffers: no fingerprint
    per = len(base64.b64decode(layers["t0"]["sample"])) // 4
    assert per == checks.SAMPLE_BUDGET // 2000
    assert sum(len(base64.b64decode(v["sample"])) // 4 for v in layers.values() if "sample" in v) \
        <= checks.SAMPLE_BUDGET
    many = fingerprint({f"t{i}": torch.randn(10) for i in range(checks.SAMPLE_BUDGET // checks.SAMPLE_MIN + 1)})
    assert all("sample" not in v and "norm" in v for v in many.values())  # too many tensors: norms only


# -- comparisons ---------------------------------------------------------------------------------------


def test_same_weights_as_the_alias_holder_are_named():
    a = fingerprint(model_state(0))
    b = fingerprint(model_state(0))
    findings = drift.compare(a, b, "1")
    assert len(findings) == 1
    f = findings[0]
    assert f.severity is Severity.INFO and f.code is None
    assert f.message.startswith("same weights as version 1")
    assert f.detail["identical"] is True and f.detail["changed"] == 0


def test_retrained_weights_report_each_tensors_relative_l2_change_largest_first():
    old = model_state(0, hidden=512)  # 0.weight has 16,384 elements: estimated from its sample
    new = copy.deepcopy(old)
    new["0.weight"] += 0.05 * torch.randn_like(new["0.weight"]) * new["0.weight"].abs().mean()
    new["2.bias"] += 0.5  # 4 elements: exact
    f = weight_finding(drift.compare(fingerprint(old), fingerprint(new), "3"))
    got = {t["name"]: t for t in f.detail["tensors"]}
    assert set(got) == {"0.weight", "2.bias"}
    assert got["2.bias"]["exact"] is True
    assert got["2.bias"]["rel_l2"] == pytest.approx(rel_l2(new["2.bias"], old["2.bias"]), rel=1e-5)
    assert got["0.weight"]["exact"] is False
    assert got["0.weight"]["rel_l2"] == pytest.approx(rel_l2(new["0.weight"], old["0.weight"]), rel=0.25)
    assert [t["name"] for t in f.detail["tensors"]][0] == max(got, key=lambda k: got[k]["rel_l2"])
    assert f.detail["identical"] is False and f.detail["changed"] == 2
    assert "weights changed since version 3: 2 of" in f.message and "≈" in f.message
    assert "CKPT_STAGE_DRIFT_MAX_CHANGE" in f.hint


def test_a_change_the_sample_misses_is_caught_by_the_norm():
    old = {"emb": torch.randn(100_000)}
    new = {"emb": old["emb"].clone()}
    missed = sorted(set(range(100_000)) - set(checks.sample_positions(100_000, checks.SAMPLE_MAX)))[:10]
    new["emb"][missed] += 3.0  # ten rows fine-tuned, none of them sampled
    f = weight_finding(drift.compare(fingerprint(old), fingerprint(new), "1"))
    assert f.detail["changed"] == 1 and f.detail["identical"] is False
    assert f.detail["tensors"][0]["rel_l2"] > 0


def test_a_threshold_turns_large_moves_into_parameter_drift_that_quarantines():
    old = model_state(0)
    new = model_state(1)  # a different initialisation: every tensor moved a lot
    findings = drift.compare(fingerprint(old), fingerprint(new), "2", max_change=0.5)
    blocking = [f for f in findings if f.code is ReasonCode.PARAMETER_DRIFT]
    assert len(blocking) == 1 and blocking[0].blocking
    assert "moved more than 50% (relative L2) since version 2" in blocking[0].message
    assert "CKPT_STAGE_DRIFT_MAX_CHANGE" in blocking[0].hint
    assert decide(findings).verdict is Verdict.QUARANTINE
    assert decide(drift.compare(fingerprint(old), fingerprint(new), "2")).verdict is Verdict.PASS  # default: info


def test_drift_max_change_setting_is_read_and_checked():
    assert Settings.from_env({"CKPT_STAGE_DRIFT_MAX_CHANGE": "0.25"}).drift_max_change == 0.25
    assert Settings.from_env({}).drift_max_change == 0.0
    with pytest.raises(ConfigError, match="CKPT_STAGE_DRIFT_MAX_CHANGE"):
        Settings.from_env({"CKPT_STAGE_DRIFT_MAX_CHANGE": "a lot"})


def test_architecture_changes_and_weight_changes_are_reported_together():
    old = model_state(0, hidden=64)
    new = model_state(0, hidden=64)
    new["extra.scale"] = torch.ones(3)
    new["2.bias"] = new["2.bias"] * 2
    findings = drift.compare(fingerprint(old), fingerprint(new), "1")
    kinds = [f.detail["kind"] for f in findings]
    assert kinds == [drift.ARCHITECTURE, drift.WEIGHTS]
    assert findings[0].detail["added"] == ["extra.scale"]
    assert weight_finding(findings).detail["tensors"][0]["name"] == "2.bias"
    assert weight_finding(findings).detail["identical"] is False


def test_reports_without_fingerprints_compare_their_layers_only():
    old = {k: {"shape": v["shape"], "dtype": v["dtype"]} for k, v in fingerprint(model_state(0)).items()}
    new = fingerprint(model_state(1))
    assert drift.compare(old, new, "1") == []  # same layers, no fingerprints in the old report: nothing to say
    old["gone"] = {"shape": [2], "dtype": "float32"}
    assert [f.detail["kind"] for f in drift.compare(old, new, "1")] == [drift.ARCHITECTURE]


@pytest.mark.parametrize("sample", ["not base64!", "AAA", 12, "A" * 9000, ""])
def test_a_broken_or_hostile_fingerprint_is_ignored(sample):
    old = fingerprint({"w": torch.ones(8)})
    new = copy.deepcopy(old)
    new["w"]["sample"] = sample
    assert drift.compare(old, new, "1") == []
    new["w"]["sample"], new["w"]["norm"] = old["w"]["sample"], float("nan")
    assert drift.compare(old, new, "1") == []


def test_weights_from_zero_are_reported_as_such():
    old = fingerprint({"w": torch.zeros(8)})
    new = fingerprint({"w": torch.ones(8)})
    f = weight_finding(drift.compare(old, new, "1"))
    assert f.detail["tensors"] == [{"name": "w", "rel_l2": None, "exact": True}]
    assert "w from zero" in f.message
    blocking = [x for x in drift.compare(old, new, "1", max_change=10.0) if x.code is ReasonCode.PARAMETER_DRIFT]
    assert blocking  # from zero is further than any threshold
