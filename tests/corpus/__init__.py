"""Generated checkpoints, good and bad, each with the verdict and reason codes it must get.

No binary blob is committed: every case is built on demand into a temporary folder. Cases live in
the modules listed in ``_MODULES``; each module exposes ``CASES: list[Case]``.

Hostile cases bake a payload that, if it ever ran, would create a file in the ``canary`` folder
(or open a socket to it): tests assert the folder stays empty.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class Built:
    """What a case's builder produced: the paths to pass to ``ckpt-stage inspect``."""

    paths: list[Path]
    arch: str | None = None
    arch_kwargs: dict | None = None
    env: dict[str, str] = field(default_factory=dict)
    """Extra environment for the inspect run (e.g. ``CKPT_STAGE_ARCH_MODULES``)."""


@dataclass(frozen=True)
class Case:
    name: str
    build: Callable[[Path, Path], Built]
    """``build(workdir, canary_dir) -> Built``: write the case's files under workdir."""
    verdict: str
    """``pass``, ``quarantine`` or ``error``."""
    codes: tuple[str, ...] = ()
    """Reason codes that must all appear among the report's reasons (exactly, for ``pass``: none)."""
    message_contains: tuple[str, ...] = ()
    """Substrings the first matching reason's message (or hint) must contain: the concrete problem."""
    hostile: bool = False
    slow: bool = False


_MODULES = ("tests.corpus.static_cases", "tests.corpus.load_cases", "tests.corpus.isolation_cases")


def all_cases() -> list[Case]:
    cases: list[Case] = []
    for mod in _MODULES:
        try:
            m = importlib.import_module(mod)
        except ModuleNotFoundError as exc:
            if exc.name == mod:
                continue
            raise
        cases.extend(m.CASES)
    names = [c.name for c in cases]
    dupes = {n for n in names if names.count(n) > 1}
    assert not dupes, f"duplicate corpus case names: {sorted(dupes)}"
    return cases
