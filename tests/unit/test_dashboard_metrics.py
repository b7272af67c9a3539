"""/metrics in the Prometheus text format, read back by a strict parser."""

from __future__ import annotations

import re

from ckpt_stage.dashboard import metrics

_SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{((?:[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\n]|\\.)*",?)*)\})? '
                     r'(-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?|\+Inf|-Inf|NaN)$')


def parse_prometheus(text: str) -> dict[tuple[str, frozenset], float]:
    """Every line is a comment or a sample of a family declared by a ``# TYPE`` line before it."""
    samples: dict[tuple[str, frozenset], float] = {}
    types: dict[str, str] = {}
    assert text.endswith("\n")
    for line in text.splitlines():
        if line.startswith("# HELP "):
            continue
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ", 3)
            assert kind in ("gauge", "counter", "histogram", "summary", "untyped"), line
            types[name] = kind
            continue
        m = _SAMPLE.match(line)
        assert m, f"not a Prometheus sample line: {line!r}"
        name, labels, value = m.groups()
        family = name if name in types else re.sub(r"_(bucket|sum|count)$", "", name)
        assert family in types, f"{name} has no # TYPE line"
        pairs = frozenset((k, v.encode().decode("unicode_escape"))
                          for k, v in re.findall(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"', labels or ""))
        samples[(name, pairs)] = float(value.replace("+Inf", "inf"))
    return samples


def test_render_parses_and_holds_the_numbers():
    text = metrics.render(
        {"promoted": 5, "quarantined": 2, "none": 1},
        {"quarantined": {"SHAPE_MISMATCH": 2, "UNSAFE_PICKLE": 1}, "error": {}},
        {"durations": [0.2, 3.0, 700.0], "bytes": 123456789.0, "verdicts": {"pass": 5, "quarantine": 3}},
    )
    m = parse_prometheus(text)
    assert m[("ckpt_stage_versions", frozenset({("status", "quarantined")}))] == 2
    assert m[("ckpt_stage_version_reasons", frozenset({("status", "quarantined"), ("reason", "UNSAFE_PICKLE")}))] == 1
    bucket = lambda le: m[("ckpt_stage_validation_duration_seconds_bucket", frozenset({("le", le)}))]  # noqa: E731
    assert (bucket("0.5"), bucket("5"), bucket("600"), bucket("1800"), bucket("+Inf")) == (1, 2, 2, 3, 3)
    assert m[("ckpt_stage_validation_duration_seconds_count", frozenset())] == 3
    assert m[("ckpt_stage_validation_duration_seconds_sum", frozenset())] == 703.2
    assert m[("ckpt_stage_validated_bytes_total", frozenset())] == 123456789
    assert m[("ckpt_stage_validation_attempts_total", frozenset({("verdict", "pass")}))] == 5
    assert "# TYPE ckpt_stage_validation_duration_seconds histogram" in text


def test_label_values_are_escaped():
    text = metrics.render({'we"ird\\\nstatus': 1}, {}, {})
    m = parse_prometheus(text)
    assert m[("ckpt_stage_versions", frozenset({("status", 'we"ird\\\nstatus')}))] == 1


def test_empty_registry_still_exposes_every_family():
    m = parse_prometheus(metrics.render({}, {}, {}))
    assert m[("ckpt_stage_validation_duration_seconds_count", frozenset())] == 0
    assert m[("ckpt_stage_validated_bytes_total", frozenset())] == 0
