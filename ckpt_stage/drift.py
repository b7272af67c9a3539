"""Architecture drift against the promoted version: an informational finding, never a verdict.

``compare`` takes the ``layers`` the worker reports (``LoadResult.info["layers"]``:
``{name: {"shape": [...], "dtype": "float32"}}``) for the promoted version and the candidate, and
says what changed: parameter count, added, removed and reshaped (or retyped) layers.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from ckpt_stage.domain import Finding, Severity

SHOW = 5


def _numel(meta: Any) -> int:
    shape = meta.get("shape") if isinstance(meta, Mapping) else None
    try:
        return math.prod(int(d) for d in shape) if isinstance(shape, (list, tuple)) else 0
    except (TypeError, ValueError):
        return 0


def _names(items: list[str]) -> str:
    return ", ".join(items[:SHOW]) + (", …" if len(items) > SHOW else "")


def compare(previous_layers: Mapping[str, Any], current_layers: Mapping[str, Any],
            previous_version: str) -> Finding | None:
    """An INFO finding describing how ``current_layers`` differ from ``previous_layers``; None when
    neither names nor shapes nor dtypes changed (or either side is unknown)."""
    if not previous_layers or not current_layers:
        return None
    prev, cur = dict(previous_layers), dict(current_layers)
    added = sorted(k for k in cur if k not in prev)
    removed = sorted(k for k in prev if k not in cur)
    reshaped, retyped = [], []
    for k in sorted(prev.keys() & cur.keys()):
        p, c = prev[k] or {}, cur[k] or {}
        if list(p.get("shape", [])) != list(c.get("shape", [])):
            reshaped.append({"name": k, "previous": list(p.get("shape", [])), "current": list(c.get("shape", []))})
        elif p.get("dtype") != c.get("dtype"):
            retyped.append({"name": k, "previous": p.get("dtype"), "current": c.get("dtype")})
    if not (added or removed or reshaped or retyped):
        return None
    before = sum(_numel(v) for v in prev.values())
    after = sum(_numel(v) for v in cur.values())
    delta = after - before
    pct = f" ({delta / before:+.1%})" if before else ""
    parts = [f"parameters {before:,} → {after:,} ({delta:+,}){pct}"]
    if added:
        parts.append(f"{len(added)} added ({_names(added)})")
    if removed:
        parts.append(f"{len(removed)} removed ({_names(removed)})")
    if reshaped:
        shown = ", ".join(f"{r['name']} {r['previous']}→{r['current']}" for r in reshaped[:SHOW])
        parts.append(f"{len(reshaped)} reshaped ({shown}{', …' if len(reshaped) > SHOW else ''})")
    if retyped:
        shown = ", ".join(f"{r['name']} {r['previous']}→{r['current']}" for r in retyped[:SHOW])
        parts.append(f"{len(retyped)} changed dtype ({shown}{', …' if len(retyped) > SHOW else ''})")
    return Finding(
        code=None,
        message=f"architecture changed since version {previous_version}: " + "; ".join(parts),
        hint="expected for a new architecture; otherwise check that the right checkpoint was registered",
        severity=Severity.INFO,
        detail={
            "kind": "drift",
            "previous_version": str(previous_version),
            "param_count": {"previous": before, "current": after, "delta": delta},
            "added": added,
            "removed": removed,
            "reshaped": reshaped,
            "retyped": retyped,
        },
    )
