"""The static scan on input built to exhaust it (tests/corpus/pickle_bombs.py): every scan finishes in
bounded time and memory, never passes the file, and keeps the first findings with a count of the rest.

Timing bounds are generous (this machine is shared); the tests assert work counters and tracemalloc
peaks where they can, and pytest-timeout stops a regression to quadratic work."""

from __future__ import annotations

import inspect
import time
import tracemalloc
from pathlib import Path

import pytest

from ckpt_stage.config import Settings
from ckpt_stage.policy import decide
from ckpt_stage.scan import budget, scan_version
from ckpt_stage.scan.pickles import MAX_EXTRA_STATES, MAX_GLOBALS_KEPT, Call, nesting_depth, scan_stream
from tests.corpus import pickle_bombs as bombs

S = Settings()

#: Bounds per input: the scan's own deadline (plus slack for the shared machine) and a tracemalloc
#: peak. The inputs are a twentieth of the generators' defaults so the unit suite stays quick; the
#: linearity test and ``python -m tests.corpus.pickle_bombs`` cover the full sizes.
DEADLINE_S = 20.0
SECONDS = DEADLINE_S + 20.0
PEAK = 200 * 2**20


def _scan(tmp_path: Path, data: bytes, settings: Settings = S, name: str = "model.pt"):
    (tmp_path / name).write_bytes(data)
    tracemalloc.start()
    t0 = time.perf_counter()
    try:
        result = scan_version(tmp_path, [name], settings)
        elapsed = time.perf_counter() - t0
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    return result, elapsed, peak


def _small(gen):
    params = inspect.signature(gen).parameters
    for key in ("n", "size"):
        if key in params:
            return gen(**{key: max(1, params[key].default // 20)})
    return gen()


@pytest.mark.timeout(180)
@pytest.mark.parametrize("name", sorted(bombs.PICKLES) + sorted(bombs.ARCHIVES))
def test_bomb_is_bounded_and_never_passes(name, tmp_path):
    settings = Settings(scan_deadline_s=DEADLINE_S)
    data = _small(bombs.PICKLES.get(name) or bombs.ARCHIVES[name])
    result, elapsed, peak = _scan(tmp_path, data, settings)
    decision = decide(result.findings, settings)
    assert decision.verdict.value == "quarantine", [f.to_dict() for f in result.findings]
    assert not any(f.code and f.code.value == "INTERNAL_ERROR" for f in result.findings)
    assert elapsed < SECONDS, f"{name}: {elapsed:.1f} s"
    assert peak < PEAK, f"{name}: peak {peak / 2**20:.0f} MiB"


def test_build_chain_keeps_a_bounded_number_of_states():
    rep = scan_stream(bombs.build_append_chain(20_000), 0, S)
    call = rep.result
    assert isinstance(call, Call) and len(call.extra) == MAX_EXTRA_STATES + 1
    assert any("BUILD applied more than" in a.message for a in rep.anomalies)
    assert call.items is not None and len(call.items.items) == 20_000


def test_build_chain_is_linear():
    # Twice the input, about twice the time (a quadratic walk would take four times as long).
    def run(n):
        data = bombs.build_append_chain(n)
        t0 = time.perf_counter()
        scan_stream(data, 0, S)
        return time.perf_counter() - t0
    run(10_000)
    small, large = min(run(50_000) for _ in range(2)), min(run(200_000) for _ in range(2))
    assert large < 10 * small, (small, large)


def test_million_unsafe_globals_are_counted_not_kept(tmp_path):
    rep = scan_stream(bombs.unsafe_globals_flood(), 0, S)
    assert rep.unsafe_count == 1_000_000 and [g.full for g in rep.globals] == ["posix.system"]
    tracemalloc.start()
    try:
        scan_stream(bombs.unsafe_globals_flood(200_000), 0, S)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 * 2**20, peak  # one object per import made 1 M of them 265 MB
    (tmp_path / "model.pt").write_bytes(bombs.unsafe_globals_flood(100_000))
    result = scan_version(tmp_path, ["model.pt"], S)
    (f,) = [f for f in result.findings if f.code and f.code.value == "UNSAFE_PICKLE" and "imports" in f.message]
    assert "posix.system" in f.message and "100,000 refused imports" in f.message
    assert f.detail["unsafe_imports"] == 100_000


def test_distinct_globals_are_capped():
    rep = scan_stream(bombs.distinct_unsafe_globals(MAX_GLOBALS_KEPT + 500), 0, S)
    assert len(rep.globals) == MAX_GLOBALS_KEPT and rep.globals_dropped == 500
    assert rep.unsafe_count == MAX_GLOBALS_KEPT + 500 and rep.hostile


def test_anomalies_are_counted():
    rep = scan_stream(bombs.memo_overwrite_flood(10_000), 0, S)
    assert len(rep.anomalies) == 50 and rep.anomaly_count == 9_999


def test_shared_dag_depth_is_linear():
    rep = scan_stream(bombs.shared_dag(2_000), 0, S)
    assert nesting_depth(rep.result) > 1000  # 2^2000 paths, measured in 2000 steps


def test_deadline_in_the_walker_is_resource_limit(tmp_path):
    settings = Settings(scan_deadline_s=1e-9)
    result, _, _ = _scan(tmp_path, bombs.appends_chain(50_000), settings)
    codes = {c.value for c in decide(result.findings, settings).codes}
    assert "RESOURCE_LIMIT" in codes
    f = next(f for f in result.findings if f.code and f.code.value == "RESOURCE_LIMIT")
    assert "deadline" in f.message and "CKPT_STAGE_SCAN_DEADLINE_S" in f.hint


def test_deadline_in_archive_loops_is_resource_limit(tmp_path):
    settings = Settings(scan_deadline_s=1e-9)
    result, _, _ = _scan(tmp_path, bombs.zip_many_pickles(2_000), settings)
    f = next(f for f in result.findings if f.code and f.code.value == "RESOURCE_LIMIT")
    assert "deadline" in f.message


def test_deadline_keeps_what_was_found_first():
    # An unsafe global before the deadline is still reported alongside the limit.
    data = bombs.P.proto(2) + bombs.P.glob("posix", "system") + bombs.P.POP + (bombs.P.NONE + bombs.P.POP) * 100_000
    with budget.deadline(60):
        rep = scan_stream(data + bombs.P.NONE + bombs.P.STOP, 0, S)
    assert rep.unsafe_count == 1 and rep.limit is None
    import ckpt_stage.scan.budget as b

    d = b._Deadline(60)
    d.at = 0  # already expired
    token = b._CURRENT.set(d)
    try:
        rep = scan_stream(data + bombs.P.NONE + bombs.P.STOP, 0, S)
    finally:
        b._CURRENT.reset(token)
    assert rep.deadline and "deadline" in (rep.limit or "")


def test_no_deadline_outside_a_scan():
    budget.tick()  # the worker's pickle_globals runs without one
    with budget.deadline(0):
        budget.tick()


def test_allowance_grows_with_size():
    assert budget.allowance(60, 0) == 60
    assert budget.allowance(60, 140 * 10**9) > 600  # a 140 GB shard is read and CRC-checked, not timed out


def test_node_cap_is_the_scanners_limit(monkeypatch, tmp_path):
    from ckpt_stage.scan import pickles

    monkeypatch.setattr(pickles, "MAX_NODES", 1_000)
    rep = scan_stream(bombs.nested_tuples(5_000), 0, S)
    assert rep.limit and "containers and calls" in rep.limit
    result, _, _ = _scan(tmp_path, bombs.nested_tuples(5_000))
    assert "RESOURCE_LIMIT" in {f.code.value for f in result.findings if f.code}
