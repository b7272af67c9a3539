"""Corpus cases for the isolated worker: a plain state_dict whose declared (allowlisted) architecture
misbehaves when the worker builds it (see ``isolation_archs``). Small limits through ``Built.env``
keep each case to a few seconds.

The memory hog is only listed where a memory cgroup can be created (root with a writable memory
controller): without one, nothing would stop it but its own safety cap, and the case would measure the
host, not the stage. ``tests/integration/test_isolation.py`` skips with the reason in that case.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from tests.corpus import Built, Case

_ARCHS = "tests.corpus.isolation_archs"
_ENV = {
    "CKPT_STAGE_ARCH_MODULES": _ARCHS,
    # Only the busy loop needs the short deadline; the others get room for a loaded CI machine, so a
    # slow hog is still killed by the memory limit (RESOURCE_LIMIT), not by the clock (TIMEOUT).
    "CKPT_STAGE_WORKER_TIMEOUT_S": "60",
    "CKPT_STAGE_WORKER_CLASSES": "small=1GiB",
}


def _weights(workdir: Path) -> Path:
    from tests.corpus.isolation_archs import state_dict

    path = workdir / "model.pt"
    torch.save(state_dict(), path)
    return path


def _with_arch(cls: str, *, timeout_s: int | None = None, **kwargs):
    def build(workdir: Path, canary: Path) -> Built:
        kw = {k: (str(canary) if v == "<canary>" else v) for k, v in kwargs.items()}
        env = dict(_ENV)
        if timeout_s is not None:
            env["CKPT_STAGE_WORKER_TIMEOUT_S"] = str(timeout_s)
        return Built([_weights(workdir)], arch=f"{_ARCHS}:{cls}", arch_kwargs=kw or None, env=env)

    build.__name__ = f"build_{cls.lower()}"
    return build


def _memory_cgroup_available() -> bool:
    if os.geteuid() != 0:
        return False
    from ckpt_stage.sandbox.isolation import MemoryCgroup

    cg, _ = MemoryCgroup.create(f"corpus-probe-{os.getpid()}", 2**30)
    if cg is None:
        return False
    cg.remove()
    return True


CASES: list[Case] = [
    Case("isolation_busy_loop_in_constructor", _with_arch("BusyLoop", timeout_s=5), "quarantine", ("TIMEOUT",),
         ("deadline",), hostile=True),
    Case("isolation_segfault_in_constructor", _with_arch("Segfault"), "quarantine", ("WORKER_CRASH",),
         ("SIGSEGV",), hostile=True),
    Case("isolation_spy_cannot_write_the_canary", _with_arch("Spy", canary_dir="<canary>"), "pass",
         hostile=True),
]
if _memory_cgroup_available():
    CASES.insert(0, Case("isolation_memory_hog_in_constructor", _with_arch("MemoryHog"), "quarantine",
                         ("RESOURCE_LIMIT",), ("memory limit of 1.0 GiB",), hostile=True))
