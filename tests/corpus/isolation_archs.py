"""Allowed test architectures (``nn.Module`` subclasses) that misbehave when the worker builds them.

They are real, allowlisted architectures (``CKPT_STAGE_ARCH_MODULES=tests.corpus.isolation_archs``)
for a plain state_dict of ``fc.weight``/``fc.bias``; the misbehaviour sits in the constructor by
default, because the loader builds the declared architecture for every bare state_dict while a forward
pass only runs when there is an input example. The loader builds on the meta device, so the
misbehaviour uses plain Python and ctypes, never tensors (a meta tensor allocates nothing).

``stand_in_load`` is a test-only loader entry (``module:function`` taking a LoadJob) that builds
``job.arch`` and reports what the architecture observed, so the sandbox tests do not depend on the
real loader's internals.
"""

from __future__ import annotations

import ctypes
import errno
import importlib
import os
import platform
import socket
import time

import torch
from torch import nn

from ckpt_stage.sandbox.job import LoadJob, LoadResult


class _Small(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(2, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


def state_dict() -> dict[str, torch.Tensor]:
    """The weights every architecture here accepts."""
    return _Small().state_dict()


class MemoryHog(_Small):
    """Allocates (and touches) memory in chunks until something stops it. ``cap_bytes`` is a safety
    net for a platform without a memory cgroup: past it the hog gives up with MemoryError."""

    def __init__(self, cap_bytes: int = 6 * 2**30, chunk_bytes: int = 32 * 2**20, when: str = "init"):
        super().__init__()
        self.cap_bytes, self.chunk_bytes = cap_bytes, chunk_bytes
        if when == "init":
            self.hog()

    def hog(self) -> None:
        blocks, total = [], 0
        while total < self.cap_bytes:
            blocks.append(bytearray(b"\x01") * self.chunk_bytes)  # written, so resident
            total += self.chunk_bytes
        raise MemoryError(f"MemoryHog allocated {total} bytes and nothing stopped it")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.hog()
        return super().forward(x)


class BusyLoop(_Small):
    """Spins forever (pure Python, holds the GIL, burns CPU)."""

    def __init__(self, when: str = "init"):
        super().__init__()
        if when == "init":
            self.spin()

    @staticmethod
    def spin() -> None:
        n = 0
        while True:
            n += 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.spin()
        return super().forward(x)


class Segfault(_Small):
    """Reads address 0 through ctypes: SIGSEGV in native code."""

    def __init__(self, when: str = "init"):
        super().__init__()
        if when == "init":
            ctypes.string_at(0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ctypes.string_at(0)
        return super().forward(x)


class Abort(_Small):
    """abort(3): SIGABRT, as a failed assertion in native code would."""

    def __init__(self) -> None:
        super().__init__()
        os.abort()


class Sleeper(_Small):
    """Sleeps (blocks without CPU): only the wall-clock deadline or an outside kill ends it."""

    def __init__(self, seconds: float = 3600.0):
        super().__init__()
        time.sleep(seconds)


class Spy(_Small):
    """Looks for everything the sandbox must hide and records what it found in ``self.observed``.

    ``secrets``: substrings that must not be visible anywhere; ``pids``: processes of the parent side
    (the runner, the fork server) whose ``/proc/<pid>/environ`` it tries to read; ``port``: a loopback
    listener of the test; ``canary_dir``: a host directory it tries to write into.
    """

    def __init__(self, port: int = 0, canary_dir: str = "", pids: list[int] | None = None,
                 secrets: list[str] | None = None):
        super().__init__()
        secrets = list(secrets or [])
        ob: dict = {
            "uid": os.getuid(), "euid": os.geteuid(), "gid": os.getgid(), "groups": os.getgroups(),
            "pid": os.getpid(), "ppid": os.getppid(), "cwd": os.getcwd(), "home": os.environ.get("HOME"),
            "cwd_listing": sorted(os.listdir(".")),
            "mlflow_pickle": os.environ.get("MLFLOW_ALLOW_PICKLE_DESERIALIZATION"),
            "env_keys": sorted(os.environ),
            "env_hits": sorted(k for k, v in os.environ.items()
                               if k.startswith(("AWS_", "TORCH_FORCE_NO_WEIGHTS"))
                               or (k.startswith("MLFLOW_") and k != "MLFLOW_ALLOW_PICKLE_DESERIALIZATION")
                               or any(s in v or s in k for s in secrets)),
        }
        environs = {}
        for pid in dict.fromkeys([os.getppid(), 1, *(pids or [])]):
            try:
                with open(f"/proc/{pid}/environ", "rb") as fh:
                    data = fh.read().decode(errors="replace")
                environs[str(pid)] = "secret" if any(s in data for s in secrets) else "readable"
            except OSError as exc:
                environs[str(pid)] = errno.errorcode.get(exc.errno or 0, str(exc))
        ob["proc_environ"] = environs
        try:
            ob["proc_pids"] = sorted(int(p) for p in os.listdir("/proc") if p.isdigit())
        except OSError as exc:
            ob["proc_pids"] = str(exc)
        if port:
            s = socket.socket()
            s.settimeout(2)
            try:
                s.connect(("127.0.0.1", port))
                ob["connect"] = "connected"
            except OSError as exc:
                ob["connect"] = errno.errorcode.get(exc.errno or 0, str(exc))
            finally:
                s.close()
        if canary_dir:
            try:
                with open(os.path.join(canary_dir, "spy-was-here"), "w") as fh:
                    fh.write("escaped")
                ob["canary"] = "written"
            except OSError as exc:
                ob["canary"] = errno.errorcode.get(exc.errno or 0, str(exc))
        home = os.environ.get("HOME") or "."
        try:
            with open(os.path.join(home, "scratch"), "w") as fh:
                fh.write("ok")
            ob["home_writable"] = True
        except OSError:
            ob["home_writable"] = False
        self.observed = ob


def stand_in_load(job: LoadJob) -> LoadResult:
    """Test-only loader entry: build ``job.arch`` (allowlisted prefixes only), read every file, try to
    write next to them, run a multi-threaded torch op, report what it saw."""
    t0 = time.perf_counter()
    info: dict = {}
    if job.arch:
        mod, _, cls = job.arch.partition(":")
        if not any(mod == p or mod.startswith(p + ".") for p in job.arch_modules):
            raise ValueError(f"{mod} is not under {job.arch_modules}")
        model = getattr(importlib.import_module(mod), cls)(**job.arch_kwargs)
        info["observed"] = getattr(model, "observed", {})
    sizes = {}
    for rel, _fmt in job.files:
        with open(os.path.join(job.root, rel), "rb") as fh:
            sizes[rel] = len(fh.read())
    info["files_read"] = sizes
    try:
        with open(os.path.join(job.root, "written-by-worker"), "w") as fh:
            fh.write("x")
        info["root_writable"] = True
    except OSError:
        info["root_writable"] = False
    # A parallel op: hangs if the fork server had run torch ops before forking (TRAPS.md).
    a = torch.ones(512, 512)
    info["matmul"] = float((a @ a)[0, 0])
    info["torch_threads"] = torch.get_num_threads()
    return LoadResult(
        runtime={"python": platform.python_version(), "torch": torch.__version__},
        timings_s={"load": time.perf_counter() - t0},
        info=info,
    )


def raising_load(job: LoadJob) -> LoadResult:
    """Test-only loader entry that breaks the loader's never-raise promise."""
    raise RuntimeError("boom from the loader")


def noisy_load(job: LoadJob) -> LoadResult:
    """Test-only loader entry that floods stdout and stderr (10 MiB each) before reporting."""
    import sys

    chunk = "x" * 65536 + "\n"
    for _ in range(160):
        sys.stdout.write(chunk)
        sys.stderr.write(chunk)
    return LoadResult(info={"noisy": True})


def not_a_result(job: LoadJob):
    """Test-only loader entry that returns something that is not a LoadResult."""
    return {"findings": "not a list"}
