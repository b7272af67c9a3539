"""``/metrics`` in the Prometheus text exposition format (version 0.0.4), written by hand.

prometheus_client is not a dependency of the stage, and every value here is derived from MLflow at
scrape time (tags for the gauges, attempt runs for durations and bytes), so there is no in-process
registry to keep: the format is a few lines of text.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
DURATION_BUCKETS = (0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0)


def _label_value(v: str) -> str:
    return str(v).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(labels: Mapping[str, str]) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{_label_value(v)}"' for k, v in labels.items()) + "}"


def _num(v: float) -> str:
    if v == float("inf"):
        return "+Inf"
    return str(int(v)) if float(v).is_integer() else repr(float(v))


def _family(name: str, kind: str, help_text: str, samples: Iterable[tuple[str, Mapping[str, str], float]]) -> list[str]:
    lines = [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
    lines += [f"{sample}{_labels(labels)} {_num(value)}" for sample, labels, value in samples]
    return lines


def render(counts: Mapping[str, int], reasons: Mapping[str, Mapping[str, int]], runs: Mapping[str, Any]) -> str:
    """``counts``: versions per status; ``reasons``: {status: {code: versions}}; ``runs``: run_stats()."""
    lines: list[str] = []
    lines += _family("ckpt_stage_versions", "gauge",
                     "Model versions by their current ckpt_stage.status tag (none: never validated).",
                     [("ckpt_stage_versions", {"status": s}, n) for s, n in counts.items()])
    lines += _family("ckpt_stage_version_reasons", "gauge",
                     "Model versions whose current verdict carries this reason code, by status.",
                     [("ckpt_stage_version_reasons", {"status": s, "reason": c}, n)
                      for s, per in reasons.items() for c, n in per.items()])
    durations = sorted(float(d) for d in runs.get("durations") or ())
    hist: list[tuple[str, dict[str, str], float]] = []
    for le in (*DURATION_BUCKETS, float("inf")):
        hist.append(("ckpt_stage_validation_duration_seconds_bucket", {"le": _num(le)},
                     sum(1 for d in durations if d <= le)))
    hist.append(("ckpt_stage_validation_duration_seconds_sum", {}, round(sum(durations), 6)))
    hist.append(("ckpt_stage_validation_duration_seconds_count", {}, len(durations)))
    lines += _family("ckpt_stage_validation_duration_seconds", "histogram",
                     "Wall time of recorded validation attempts (timings_s.total of each attempt run).", hist)
    lines += _family("ckpt_stage_validated_bytes_total", "counter",
                     "Bytes of model files checked by recorded validation attempts.",
                     [("ckpt_stage_validated_bytes_total", {}, float(runs.get("bytes") or 0.0))])
    lines += _family("ckpt_stage_validation_attempts_total", "counter",
                     "Recorded validation attempts by verdict.",
                     [("ckpt_stage_validation_attempts_total", {"verdict": v}, n)
                      for v, n in sorted((runs.get("verdicts") or {}).items())])
    return "\n".join(lines) + "\n"
