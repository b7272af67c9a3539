"""The import-only fork server, and the handle the parent keeps on it.

Forking from a process that has run torch ops leaves the child's intra-op thread pool in a state
where its next parallel op hangs (the OpenMP/pthreadpool workers of the parent do not exist in the
child; see pytorch/pytorch#17199, #91547). Spawning a fresh interpreter per job avoids that but
costs seconds of ``import torch``. So a dedicated server process imports torch and the loader once,
never runs a torch op, and forks one child per job (a few ms of page-table copy).

Server side (``main``, run as ``python -c ... forkserver.main``): single-threaded select loop on
  * the control socket (SOCK_SEQPACKET, inherited from the parent): each message ``b"run"`` carries
    five fds by SCM_RIGHTS: the job's reply socket, the spec memfd, and the result, status and
    stderr pipes. The server forks a supervisor (``child.supervisor_main``), closes its copies and
    answers ``{"pid": N}`` on the reply socket, later ``{"exit": wait_status}`` once it reaped it.
    EOF on the control socket (the parent died or shut it down) ends the server; the supervisors
    have PR_SET_PDEATHSIG and go with it.
  * the reply sockets: EOF there means the parent abandoned the job → kill that job's group.
  * a wakeup pipe fed by SIGCHLD → reap.
Protocol replies are small JSON documents; one message per datagram, so no framing.

The server starts with a scrubbed environment (``isolation.scrub_env``): its children inherit it and
``/proc/<server>/environ`` shows it, so no credential may ever be in it.
"""

from __future__ import annotations

import contextlib
import json
import os
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any, cast

from ckpt_stage.errors import ServerGone, ServerStartError

READY_TIMEOUT_S = 180.0
_MAX_FDS = 8


# --- server side ---------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    ctrl = socket.socket(fileno=int(argv[0]))
    preload = json.loads(argv[1]) if len(argv) > 1 else []
    hello = _preload(preload)
    ctrl.send(json.dumps(hello).encode())
    _serve(ctrl)


def _preload(entries: list[str]) -> dict[str, Any]:
    """Import torch and the loader — and nothing that runs a torch op."""
    import importlib
    import importlib.metadata
    import platform

    from ckpt_stage.sandbox import child, isolation

    hello: dict[str, Any] = {"pid": os.getpid(), "preload_errors": {}}
    runtime = {"python": platform.python_version()}
    try:
        import torch

        runtime["torch"] = torch.__version__  # as the loader reports it (2.13.0+cpu)
    except Exception as exc:  # noqa: BLE001 - reported, the job then fails with the loader's error
        hello["preload_errors"]["torch"] = f"{type(exc).__name__}: {exc}"
    try:
        runtime["mlflow"] = importlib.metadata.version("mlflow")  # no import: mlflow is heavy
    except importlib.metadata.PackageNotFoundError:
        pass
    try:
        # libseccomp is opened now, by the server, rather than by each worker after its pivot.
        import pyseccomp  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - the worker then runs without a filter, and says so
        hello["preload_errors"]["pyseccomp"] = f"{type(exc).__name__}: {exc}"
    for entry in entries:
        mod = entry.partition(":")[0]
        try:
            importlib.import_module(mod)
        except Exception as exc:  # noqa: BLE001
            hello["preload_errors"][mod] = f"{type(exc).__name__}: {exc}"
    hello["runtime"] = runtime
    # What an unprivileged loader must be able to read, planned while still root.
    needed = [p for p in sys.path if p] + [sys.prefix, sys.base_prefix, sys.exec_prefix]
    child.NEEDED_PATHS = sorted({os.path.realpath(p) for p in needed if os.path.isdir(p)})
    child.PREFIXES = sorted({os.path.realpath(p) for p in (sys.prefix, sys.base_prefix, sys.exec_prefix)})
    child.MASK_PLAN = isolation.plan_masks(child.NEEDED_PATHS)
    hello["masks"] = sorted(child.MASK_PLAN)
    hello["threads"] = len(os.listdir("/proc/self/task"))
    return hello


def _serve(ctrl: socket.socket) -> None:
    from ckpt_stage.sandbox import child

    me = os.getpid()
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_r, False)
    os.set_blocking(wake_w, False)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    sel = selectors.DefaultSelector()
    sel.register(ctrl, selectors.EVENT_READ, "ctrl")
    sel.register(wake_r, selectors.EVENT_READ, "wake")
    jobs: dict[int, socket.socket] = {}

    while True:
        for key, _ in sel.select(timeout=1.0):
            if key.data == "ctrl":
                try:
                    msg, fds, _, _ = socket.recv_fds(ctrl, 64, _MAX_FDS)
                except OSError:
                    msg, fds = b"", []
                if not msg:
                    _shutdown(jobs)
                    # Straight out: finalizing an interpreter that imported torch takes seconds
                    # (module teardown, torch's atexit hooks), and the parent's stop() waits for us.
                    for stream in (sys.stdout, sys.stderr):
                        with contextlib.suppress(Exception):
                            stream.flush()
                    os._exit(0)
                if msg != b"run" or len(fds) != 5:
                    for fd in fds:
                        os.close(fd)
                    continue
                reply_fd, spec, result_w, status_w, stderr_w = fds
                pid = os.fork()
                if pid == 0:
                    child.supervisor_main(spec, result_w, status_w, stderr_w, me)  # never returns
                for fd in (spec, result_w, status_w, stderr_w):
                    os.close(fd)
                reply = socket.socket(fileno=reply_fd)
                try:
                    reply.send(json.dumps({"pid": pid}).encode())
                except OSError:
                    _killpg(pid)
                jobs[pid] = reply
                sel.register(reply, selectors.EVENT_READ, pid)
            elif key.data == "wake":
                try:
                    while os.read(wake_r, 512):
                        pass
                except BlockingIOError:
                    pass
            else:
                # The parent never writes after the request: readable means closed (abandoned).
                pid = key.data
                try:
                    data = cast(socket.socket, key.fileobj).recv(64)
                except OSError:
                    data = b""
                if not data:
                    _killpg(pid)
                    sel.unregister(key.fileobj)
        _reap(jobs, sel)


def _reap(jobs: dict[int, socket.socket], sel: selectors.BaseSelector) -> None:
    while True:
        try:
            pid, st = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        reply = jobs.pop(pid, None)
        if reply is None:
            continue
        try:
            reply.send(json.dumps({"exit": st}).encode())
        except OSError:
            pass
        try:
            sel.unregister(reply)
        except (KeyError, ValueError):
            pass
        reply.close()


def _killpg(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except OSError:
        pass


def _shutdown(jobs: dict[int, socket.socket]) -> None:
    for pid in list(jobs):
        _killpg(pid)
    deadline = time.monotonic() + 5
    while jobs and time.monotonic() < deadline:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            break
        if pid == 0:
            time.sleep(0.02)
        else:
            jobs.pop(pid, None)


# --- parent side ---------------------------------------------------------------------------------


class ForkServer:
    """Parent's handle on one fork server process. Thread-safe: ``submit`` may run concurrently."""

    def __init__(self, python: str, env: dict[str, str], preload: list[str]):
        self.python = python
        self.env = env
        self.preload = preload
        self.hello: dict[str, Any] = {}
        self._lock = threading.Lock()
        self._ctrl: socket.socket | None = None
        self._proc: subprocess.Popen | None = None
        self._dir = ""

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def start(self, timeout_s: float = READY_TIMEOUT_S) -> None:
        # Private (0700) dir: the server's cwd and log; nothing of it is visible to the workers.
        self._dir = tempfile.mkdtemp(prefix="ckpt-stage-forkserver-")
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        log = open(os.path.join(self._dir, "server.log"), "wb")  # noqa: SIM115 - closed below, after Popen
        code = "import sys; from ckpt_stage.sandbox.forkserver import main; main(sys.argv[1:])"
        env = dict(self.env, HOME=self._dir)
        try:
            self._proc = subprocess.Popen(
                [self.python, "-s", "-c", code, str(theirs.fileno()), json.dumps(self.preload)],
                pass_fds=[theirs.fileno()], env=env, cwd=self._dir, stdin=subprocess.DEVNULL,
                stdout=log, stderr=log, start_new_session=True,
            )
        except OSError as exc:
            ours.close()
            raise ServerStartError(f"cannot start the fork server with {self.python}: {exc}") from None
        finally:
            theirs.close()
            log.close()
        ours.settimeout(timeout_s)
        try:
            raw = ours.recv(1 << 20)
            self.hello = json.loads(raw) if raw else {}
        except (OSError, ValueError):
            self.hello = {}
        if not self.hello:
            ours.close()
            self._kill()
            raise ServerStartError(f"the fork server ({self.python}) did not start: {self.log_tail()}")
        ours.settimeout(None)
        self._ctrl = ours

    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None and self._ctrl is not None

    def submit(self, fds: list[int]) -> socket.socket:
        """Hand one job (spec, result_w, status_w, stderr_w) over; returns the job's reply socket."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            with self._lock:
                if self._ctrl is None:
                    raise ServerGone("the fork server is stopped")
                socket.send_fds(self._ctrl, [b"run"], [theirs.fileno(), *fds])
        except OSError as exc:
            ours.close()
            raise ServerGone(f"the fork server is gone ({exc})") from None
        except ServerGone:
            ours.close()
            raise
        finally:
            theirs.close()
        return ours

    def log_tail(self, n: int = 2000) -> str:
        try:
            with open(os.path.join(self._dir, "server.log"), "rb") as fh:
                fh.seek(0, os.SEEK_END)
                fh.seek(max(0, fh.tell() - n))
                return fh.read().decode(errors="replace").strip()
        except OSError:
            return ""

    def stop(self) -> None:
        """Never raises. Closing the control socket is the stop request; kill if it lingers."""
        with self._lock:
            ctrl, self._ctrl = self._ctrl, None
        if ctrl is not None:
            try:
                ctrl.close()
            except OSError:
                pass
        if self._proc is not None:
            try:
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._kill()
            except Exception:  # noqa: BLE001
                pass
        if self._dir:
            shutil.rmtree(self._dir, ignore_errors=True)

    def _kill(self) -> None:
        if self._proc is None:
            return
        try:
            os.killpg(self._proc.pid, signal.SIGKILL)
        except OSError:
            pass
        try:
            self._proc.wait(timeout=5)
        except Exception:  # noqa: BLE001
            pass
