"""Drift against the version that holds the alias: what changed in the architecture and in the weights.

The one home of drift: the pipeline calls ``compare`` for every verdict, the dashboard and ``ckpt-stage
show`` read its findings back from the report, and ``diff_layers`` is the one comparison of two layer
tables that all of them use. Both sides are ``model_info.layers`` of a report, as the worker writes it
(``load/checks.layers_info``)::

    {name: {"shape": [...], "dtype": "float32", "norm": 12.3, "sample": "<base64 float32>"}}

``norm`` is the tensor's exact L2 norm, ``sample`` its values at the first positions of a fixed sequence
(the same positions in every version of the same shape). So two versions compare tensor by tensor from
their reports alone: no second download, no memory beyond the reports.

The relative L2 change of a tensor, ``‖current − previous‖ / ‖previous‖``, is exact when the sample
holds the whole tensor (up to 256 elements: biases, norms, small layers); otherwise it is estimated from
the sampled positions (``n / k`` times their squared differences), and never below the exact lower bound
``|‖current‖ − ‖previous‖| / ‖previous‖`` (the triangle inequality), which catches a change the sample
misses. "Same weights" means every tensor has the same name, shape, dtype, L2 norm (to 1e-9, summation
order may differ) and sampled values.

Drift is information, never a verdict by itself; an operator who wants a gate sets
``CKPT_STAGE_DRIFT_MAX_CHANGE`` (a fraction: 0.5 = 50 %), and a tensor that moved further than that is a
``PARAMETER_DRIFT`` finding, which quarantines.
"""

from __future__ import annotations

import base64
import binascii
import math
import statistics
from array import array
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ckpt_stage.domain import Finding, ReasonCode, Severity

SHOW = 5
"""How many names a message lists before ``…``."""
KEEP = 20
"""How many tensors, largest change first, a weight-drift finding keeps in its detail."""
NORM_RTOL = 1e-9
MAX_CHANGE_SETTING = "CKPT_STAGE_DRIFT_MAX_CHANGE"
#: ``detail["kind"]`` of the two findings.
ARCHITECTURE = "drift"
WEIGHTS = "weight_drift"
KINDS = (ARCHITECTURE, WEIGHTS)


def _numel(meta: Any) -> int:
    shape = meta.get("shape") if isinstance(meta, Mapping) else None
    try:
        return math.prod(int(d) for d in shape) if isinstance(shape, (list, tuple)) else 0
    except (TypeError, ValueError):
        return 0


def _names(items: list[str]) -> str:
    return ", ".join(items[:SHOW]) + (", …" if len(items) > SHOW else "")


def _meta(layers: Mapping[str, Any], name: str) -> dict[str, Any]:
    m = layers.get(name)
    return m if isinstance(m, dict) else {}


def diff_layers(previous: Mapping[str, Any] | None, current: Mapping[str, Any] | None) -> dict[str, list]:
    """Names added and removed, and tensors whose shape or dtype changed, of two layer tables::

        {"added": [{"name", "shape", "dtype"}], "removed": [...],
         "changed": [{"name", "previous": {"shape", "dtype"}, "current": {"shape", "dtype"}}]}
    """
    prev, cur = dict(previous or {}), dict(current or {})

    def meta(layers: dict[str, Any], name: str) -> dict[str, Any]:
        m = _meta(layers, name)
        return {"shape": list(m.get("shape") or []), "dtype": m.get("dtype")}

    changed = [{"name": k, "previous": meta(prev, k), "current": meta(cur, k)}
               for k in sorted(prev.keys() & cur.keys()) if meta(prev, k) != meta(cur, k)]
    return {
        "added": [{"name": k, **meta(cur, k)} for k in sorted(cur.keys() - prev.keys())],
        "removed": [{"name": k, **meta(prev, k)} for k in sorted(prev.keys() - cur.keys())],
        "changed": changed,
    }


def _architecture(prev: Mapping[str, Any], cur: Mapping[str, Any], previous_version: str,
                  diff: dict[str, list]) -> Finding | None:
    if not any(diff.values()):
        return None
    before = sum(_numel(v) for v in prev.values())
    after = sum(_numel(v) for v in cur.values())
    delta = after - before
    pct = f" ({delta / before:+.1%})" if before else ""
    parts = [f"parameters {before:,} → {after:,} ({delta:+,}){pct}"]
    added, removed = [a["name"] for a in diff["added"]], [r["name"] for r in diff["removed"]]
    # The recorded detail keeps its fields (reports already hold them): reshaped, then retyped.
    reshaped = [{"name": c["name"], "previous": c["previous"]["shape"], "current": c["current"]["shape"]}
                for c in diff["changed"] if c["previous"]["shape"] != c["current"]["shape"]]
    retyped = [{"name": c["name"], "previous": c["previous"]["dtype"], "current": c["current"]["dtype"]}
               for c in diff["changed"] if c["previous"]["shape"] == c["current"]["shape"]]
    if added:
        parts.append(f"{len(added)} added ({_names(added)})")
    if removed:
        parts.append(f"{len(removed)} removed ({_names(removed)})")
    for items, word in ((reshaped, "reshaped"), (retyped, "changed dtype")):
        if items:
            shown = ", ".join(f"{r['name']} {r['previous']}→{r['current']}" for r in items[:SHOW])
            parts.append(f"{len(items)} {word} ({shown}{', …' if len(items) > SHOW else ''})")
    return Finding(
        code=None,
        message=f"architecture changed since version {previous_version}: " + "; ".join(parts),
        hint="expected for a new architecture; otherwise check that the right checkpoint was registered",
        severity=Severity.INFO,
        detail={
            "kind": ARCHITECTURE,
            "previous_version": str(previous_version),
            "param_count": {"previous": before, "current": after, "delta": delta},
            "added": added,
            "removed": removed,
            "reshaped": reshaped,
            "retyped": retyped,
        },
    )


# -- weights -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Change:
    name: str
    rel_l2: float | None
    """``‖current − previous‖ / ‖previous‖``; None when the previous tensor was all zeros and this one is not."""
    exact: bool
    """The sample held the whole tensor (otherwise the value is an estimate)."""

    @property
    def unchanged(self) -> bool:
        return self.rel_l2 == 0.0

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "rel_l2": self.rel_l2, "exact": self.exact}

    def text(self) -> str:
        value = "from zero" if self.rel_l2 is None else f"{self.rel_l2:.1%}"
        return f"{self.name} {'' if self.exact else '≈'}{value}"


def _sample(meta: Mapping[str, Any]) -> array | None:
    raw = meta.get("sample")
    if not isinstance(raw, str) or not raw or len(raw) > 8192:
        return None
    try:
        data = base64.b64decode(raw, validate=True)
    except (binascii.Error, ValueError):
        return None
    if len(data) % 4:
        return None
    values = array("f")
    values.frombytes(data)
    if values.itemsize != 4:  # pragma: no cover - every CPython platform has a 4-byte float
        return None
    if array("H", [1]).tobytes() != b"\x01\x00":  # pragma: no cover - big-endian hosts
        values.byteswap()
    return values


def _norm(meta: Mapping[str, Any]) -> float | None:
    n = meta.get("norm")
    return float(n) if isinstance(n, (int, float)) and not isinstance(n, bool) and math.isfinite(n) and n >= 0 \
        else None


def tensor_change(name: str, previous: Mapping[str, Any], current: Mapping[str, Any]) -> Change | None:
    """The relative L2 change of one tensor from two fingerprints; None when they do not compare (another
    shape, no fingerprint, a sample that does not decode)."""
    if list(previous.get("shape") or []) != list(current.get("shape") or []):
        return None
    n = _numel(previous)
    p_norm, c_norm = _norm(previous), _norm(current)
    p_s, c_s = _sample(previous), _sample(current)
    if n <= 0 or p_norm is None or c_norm is None or p_s is None or c_s is None:
        return None
    k = min(len(p_s), len(c_s), n)
    if k == 0:
        return None
    diff_sq = math.fsum((float(c_s[i]) - float(p_s[i])) ** 2 for i in range(k))
    exact = k == n
    same_norm = math.isclose(p_norm, c_norm, rel_tol=NORM_RTOL, abs_tol=0.0)
    if diff_sq == 0.0 and same_norm:
        return Change(name, 0.0, exact)
    if p_norm == 0.0:
        return Change(name, None, exact)
    estimate = math.sqrt(diff_sq * (n / k)) / p_norm
    bound = abs(c_norm - p_norm) / p_norm
    return Change(name, max(estimate, bound), exact)


def _weights(prev: Mapping[str, Any], cur: Mapping[str, Any], previous_version: str,
             max_change: float, diff: dict[str, list]) -> list[Finding]:
    changes = [c for name in sorted(prev.keys() & cur.keys())
               if (c := tensor_change(name, _meta(prev, name), _meta(cur, name))) is not None]
    if not changes:
        return []
    moved = sorted((c for c in changes if not c.unchanged),
                   key=lambda c: (-(math.inf if c.rel_l2 is None else c.rel_l2), c.name))
    # Tensors without a fingerprint (integer buffers) count through their name, shape and dtype.
    identical = not moved and not any(diff.values())
    finite = [c.rel_l2 for c in moved if c.rel_l2 is not None]
    detail: dict[str, Any] = {
        "kind": WEIGHTS,
        "previous_version": str(previous_version),
        "identical": identical,
        "compared": len(changes),
        "changed": len(moved),
        "median_rel_l2": statistics.median(finite) if finite else 0.0,
        "max_rel_l2": (None if moved and moved[0].rel_l2 is None else (moved[0].rel_l2 if moved else 0.0)),
        "tensors": [c.as_dict() for c in moved[:KEEP]],
    }
    if identical:
        out = [Finding(None, f"same weights as version {previous_version}: every one of its {len(changes)} "
                             "tensors has the same shape, dtype, L2 norm and sampled values",
                       "a retrained model should differ from the one it replaces: check that the new weights "
                       "were registered, not the old ones again", severity=Severity.INFO, detail=detail)]
    elif not moved:
        out = [Finding(None, f"weights unchanged since version {previous_version} in the {len(changes)} "
                             "tensors both versions share", severity=Severity.INFO, detail=detail)]
    else:
        shown = ", ".join(c.text() for c in moved[:SHOW]) + (", …" if len(moved) > SHOW else "")
        median = f" (median relative L2 change {detail['median_rel_l2']:.1%})" if finite else ""
        out = [Finding(None, f"weights changed since version {previous_version}: {len(moved)} of {len(changes)} "
                             f"tensors moved{median}; largest: {shown}",
                       f"information only; set {MAX_CHANGE_SETTING} to hold back versions whose weights moved "
                       "further than expected", severity=Severity.INFO, detail=detail)]
    if max_change > 0:
        over = [c for c in moved if c.rel_l2 is None or c.rel_l2 > max_change]
        if over:
            shown = ", ".join(c.text() for c in over[:SHOW]) + (", …" if len(over) > SHOW else "")
            out.append(Finding(
                ReasonCode.PARAMETER_DRIFT,
                f"{len(over)} of {len(changes)} tensors moved more than {max_change:.0%} (relative L2) since "
                f"version {previous_version}: {shown}",
                "check the training run that produced these weights; if the change is intended, ask the operator "
                f"to raise {MAX_CHANGE_SETTING} and re-run the version",
                detail={"kind": WEIGHTS, "previous_version": str(previous_version), "max_change": max_change,
                        "tensors": [c.as_dict() for c in over[:KEEP]]},
            ))
    return out


def compare(previous_layers: Mapping[str, Any] | None, current_layers: Mapping[str, Any] | None,
            previous_version: str, *, max_change: float = 0.0) -> list[Finding]:
    """The drift findings of ``current_layers`` against ``previous_layers`` (the alias holder's): how the
    architecture changed (INFO, when it did), how the weights moved or that they are the same (INFO, when
    both reports carry fingerprints), and ``PARAMETER_DRIFT`` for tensors past ``max_change`` (> 0)."""
    if not previous_layers or not current_layers:
        return []
    prev, cur = dict(previous_layers), dict(current_layers)
    diff = diff_layers(prev, cur)
    arch = _architecture(prev, cur, previous_version, diff)
    return ([arch] if arch else []) + _weights(prev, cur, previous_version, max_change, diff)


def findings_of(report: Mapping[str, Any] | None) -> list[dict[str, Any]]:
    """The drift findings recorded in a report (both kinds), as the report holds them."""
    return [f for f in (report or {}).get("findings") or []
            if isinstance(f, dict) and (f.get("detail") or {}).get("kind") in KINDS]
