"""Parent side of the worker: run one ``LoadJob`` in a throw-away isolated process, always return a
``LoadResult``.

``run_job(job, settings)`` never raises and is thread-safe (Airflow/Celery may call it from several
threads at once); each call gets its own process tree, pipes and cgroup. The fork server
(``forkserver.py``) starts lazily on first use, is restarted once if it died, and is stopped by
``shutdown()`` (idempotent, registered atexit).

Lifecycle of one job::

    idle      pipes, spec memfd, fallback work dir and memory cgroup prepared; job.root made
              world-readable (a+r files, a+rx dirs) for the unprivileged loader
    forked    the fork server forked the supervisor: setsid, joins the cgroup, new namespaces
              (deadline starts here, not at fork-server start-up)
    rooted    init (PID 1 of the new PID namespace, root) built the private root on a tmpfs and
              pivoted into it (no path leads back to the host); reported the measures in force
              (``isolated``); timings_s.worker_start ends when it forks the loader (``loading``)
    armed     the loader set rlimits, dropped to a uid of its own (``JOB_UID_BASE``) with
              no_new_privs, loaded its seccomp filter and stopped itself; init read
              Uid/NoNewPrivs/Seccomp off its /proc status (``armed``, timings_s.worker_armed) and
              let it go on: these facts are measured, never the loader's word
    loading   the loader runs ``load_and_check``; the parent samples its RssAnon (and its status)
    reported  the loader's result (JSON, size-capped) and init's record of its exit status arrived,
              or the deadline passed and the process group and cgroup were SIGKILLed
    checked   the result parsed against the schema (``parse_result``: known keys, contract codes,
              capped and escaped strings, bounded numbers) and cross-checked against the parent's
              scan (``cross_check``); a violation is WORKER_CRASH, never a pass
    reaped    the fork server reaped the supervisor; ``stop()``: kill whatever is left, remove the
              cgroup, close every fd, remove the work dir. ``stop()`` never raises and always runs.

Outcomes are classified here, in the parent, which always survives (``_SupervisedJob.classify`` takes
the first row of the table ``OUTCOMES`` that holds, in priority order): cgroup OOM kill → RESOURCE_LIMIT, deadline or CPU limit → TIMEOUT, SEGV/BUS/ILL/ABRT/FPE →
WORKER_CRASH, another SIGKILL/SIGTERM (an operator, the host) → WORKER_LOST, a non-zero exit →
INTERNAL_ERROR with the stderr tail, a result that breaks the schema or contradicts the scan →
WORKER_CRASH (job code may have written it).
"""

from __future__ import annotations

import atexit
import json
import logging
import math
import os
import pwd
import re
import secrets
import selectors
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import ckpt_stage
from ckpt_stage.config import Settings, format_size
from ckpt_stage.domain import Finding, ReasonCode, Severity
from ckpt_stage.sandbox import child, isolation
from ckpt_stage.sandbox.forkserver import ForkServer, ServerGone, ServerStartError
from ckpt_stage.sandbox.job import LoadJob, LoadResult

log = logging.getLogger(__name__)

DEFAULT_ENTRY = "ckpt_stage.load.loader:load_and_check"
RESULT_CAP = 32 * 2**20
"""A result bigger than this is malformed (layer tables of huge models fit well below it)."""
STDERR_TAIL = 64 * 2**10
STATUS_CAP = 256 * 2**10
TMP_BYTES = 256 * 2**20
"""Size of the worker's private /tmp (tmpfs, charged to its memory cgroup)."""
SAMPLE_S = 0.02
KILL_GRACE_S = 5.0
PID_TIMEOUT_S = 30.0

_CRASH_SIGNALS = {signal.SIGSEGV, signal.SIGBUS, signal.SIGILL, signal.SIGABRT, signal.SIGFPE,
                  signal.SIGSYS, signal.SIGTRAP, signal.SIGPIPE}

_lock = threading.Lock()
_servers: dict[tuple, ForkServer] = {}
_active: dict[str, _SupervisedJob] = {}


def run_job(job: LoadJob, settings: Settings, *, entry: str | None = None) -> LoadResult:
    """Run ``job`` in a fresh isolated worker; never raises.

    ``entry`` (``module:function`` taking a LoadJob, returning a LoadResult) is for tests only; the
    production path is always ``ckpt_stage.load.loader:load_and_check``.
    """
    run = _SupervisedJob(job, settings, entry or DEFAULT_ENTRY)
    try:
        return run.execute()
    except Exception as exc:  # noqa: BLE001 - the contract: a result, never an exception
        log.exception("worker runner failed")
        return run.fail(ReasonCode.INTERNAL_ERROR, f"the worker runner failed: {type(exc).__name__}: {exc}",
                        "this is a bug in ckpt-stage; the version stays eligible for a re-run")
    finally:
        run.stop()


def shutdown() -> None:
    """Stop every fork server. Idempotent; registered atexit. The next run_job starts a new one."""
    with _lock:
        servers = list(_servers.values())
        _servers.clear()
    for server in servers:
        server.stop()


atexit.register(shutdown)


def active_workers() -> list[dict[str, Any]]:
    """Jobs in flight (diagnostics, tests): job id, supervisor/init/loader pids, cgroup."""
    with _lock:
        runs = list(_active.values())
    return [r.describe() for r in runs]


def fork_server_pids() -> list[int]:
    with _lock:
        return [s.pid for s in _servers.values() if s.pid]


# --- fork server management ----------------------------------------------------------------------


def _worker_pythonpath(python: str, settings: Settings) -> list[str]:
    """Where the worker finds ckpt_stage and the operator's architecture packages (the repo's
    ``tests`` package in tests). The worker's cwd is an empty private dir, so the parent's sys.path
    entries that are not the interpreter's own go along; never the cwd (from a bare ``-m`` run) and
    never anything under the cache dir, which holds untrusted files."""
    prefixes = {os.path.realpath(p) for p in (sys.prefix, sys.base_prefix, sys.exec_prefix)}
    cache = os.path.realpath(str(settings.cache_dir))
    cwd = os.path.realpath(os.getcwd())
    pkg_parent = os.path.dirname(os.path.dirname(os.path.realpath(ckpt_stage.__file__)))

    def ok(p: str) -> bool:
        rp = os.path.realpath(p)
        return os.path.isdir(rp) and not _inside(rp, cache) and "site-packages" not in rp.split(os.sep) \
            and not any(_inside(rp, b) for b in prefixes)

    out = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    if ok(pkg_parent):
        out.append(pkg_parent)
    if os.path.realpath(python) == os.path.realpath(sys.executable):
        out += [p for p in sys.path if p and os.path.realpath(p) != cwd and ok(p)]
    return list(dict.fromkeys(os.path.realpath(p) for p in out))


def _inside(path: str, base: str) -> bool:
    return path == base or path.startswith(base.rstrip("/") + "/")


def _server_env(pythonpath: list[str]) -> dict[str, str]:
    env = isolation.scrub_env(os.environ)
    env.update(PYTHONPATH=os.pathsep.join(pythonpath), PYTHONDONTWRITEBYTECODE="1", PYTHONNOUSERSITE="1",
               PYTHONSAFEPATH="1")
    # numpy's OpenBLAS starts a thread pool at import; fork() copies only the forking thread, so a lock
    # one of those threads held would stay locked in every worker. One BLAS thread: no pool, and the
    # fork server is single-threaded as fork() wants (torch's own pools start lazily, at the first op).
    env.setdefault("OPENBLAS_NUM_THREADS", "1")
    # transformers (Hugging Face folders, load/hf.py) must never reach the Hub from the worker: no
    # download, no telemetry, no cache writes. The worker has no network anyway (and seccomp refuses
    # socket()); these make huggingface_hub not try, instead of failing or waiting on it.
    # (isolation's allowlist keeps exactly these names; HF_TOKEN and the like never pass.)
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1",
               HF_HUB_DISABLE_PROGRESS_BARS="1", TRANSFORMERS_VERBOSITY="error")
    return env


def _server_key(settings: Settings) -> tuple:
    python = settings.worker_python or sys.executable
    return (python, tuple(_worker_pythonpath(python, settings)))


def _get_server(key: tuple) -> ForkServer:
    with _lock:
        server = _servers.get(key)
        if server is not None and server.alive():
            return server
        if server is not None:
            server.stop()
        python, pythonpath = key
        if not _servers:
            isolation.sweep_stale_cgroups()  # left behind by a stage process that crashed mid-job
        # Only the production loader is preloaded; a test entry is imported by the worker itself.
        server = ForkServer(python, _server_env(list(pythonpath)), [DEFAULT_ENTRY])
        t0 = time.monotonic()
        server.start()
        log.info("fork server %s started in %.1f s (%s)", server.pid, time.monotonic() - t0, python)
        _servers[key] = server
        return server


def prewarm(settings: Settings) -> None:
    """Start the fork server in the background, if it is not running, and return at once.

    Its start (``import torch`` and the loader, about a second) then overlaps the download and the
    scan instead of following them; the first ``run_job`` waits on ``_lock`` for the same server
    rather than starting a second one. A failure is left for that ``run_job`` to report.
    """
    key = _server_key(settings)
    with _lock:
        server = _servers.get(key)
        if server is not None and server.alive():
            return

    def start() -> None:
        try:
            _get_server(key)
        except Exception as exc:  # noqa: BLE001 - run_job retries the start and reports it
            log.warning("starting the fork server in the background failed: %s", exc)

    threading.Thread(target=start, name="ckpt-stage-forkserver-start", daemon=True).start()


def _restart_server(key: tuple, dead: ForkServer) -> None:
    with _lock:
        if _servers.get(key) is dead:
            del _servers[key]
    dead.stop()


# --- one job -------------------------------------------------------------------------------------


JOB_UID_BASE = 0x6F000000
JOB_UID_SPAN = 2**24
"""Each job drops to a uid of its own, drawn from [JOB_UID_BASE, JOB_UID_BASE + JOB_UID_SPAN) (the top
of the range systemd sets aside for containers' uid blocks, never for accounts), never the shared ``nobody``:
RLIMIT_NPROC counts every task of a *real uid* system wide, so under one shared uid a job that starts
threads up to the limit left every concurrent job (and the host's own ``nobody`` services) unable to
start one (libgomp: "Thread creation failed", an INTERNAL_ERROR for an innocent version). A uid of its
own also means no other process anywhere shares the job's credentials (signals, ptrace, file modes)."""


def _job_ids(run: _SupervisedJob) -> tuple[int, int] | None:
    """A uid/gid pair no other job of this process holds (registers ``run`` as active, so two threads
    never draw the same); None when there is nothing to drop or no way to."""
    if os.geteuid() != 0:
        return None  # already unprivileged: nothing to drop
    if not isolation.has_caps(isolation.CAP_SETUID, isolation.CAP_SETGID):
        return None  # root without CAP_SETUID/SETGID cannot drop: recorded as unprivileged_user=false
    with _lock:
        taken = {r.ids[0] for r in _active.values() if r.ids}
        for _ in range(64):
            uid = JOB_UID_BASE + secrets.randbelow(JOB_UID_SPAN)
            if uid in taken:
                continue
            try:
                pwd.getpwuid(uid)  # an account the host does use: draw again
            except KeyError:
                run.ids = (uid, uid)
                _active[run.id] = run
                return run.ids
    return None


def _make_readable(root: str) -> None:
    """The unprivileged loader reads job.root through a read-only bind; a file written 0600 (mkstemp
    and rename) would be unreadable to it. The parent owns these files; adding read bits is safe."""
    for dirpath, dirnames, filenames in os.walk(root):
        for name, bits in [(d, 0o555) for d in dirnames] + [(f, 0o444) for f in filenames] + [("", 0o555)]:
            p = os.path.join(dirpath, name) if name else dirpath
            try:
                st = os.lstat(p)
                if not os.path.islink(p) and st.st_mode & bits != bits:
                    os.chmod(p, st.st_mode | bits)
            except OSError:
                pass


class _SupervisedJob:
    """One job in flight, seen from the parent: the worker it started, the pipes and cgroup it watches,
    what came back, and how it ended (``classify``)."""

    def __init__(self, job: LoadJob, settings: Settings, entry: str):
        self.job, self.settings, self.entry = job, settings, entry
        self.id = uuid.uuid4().hex[:12]
        self.fds: dict[str, int] = {}
        self.reply: socket.socket | None = None
        self.cgroup: isolation.MemoryCgroup | None = None
        self.cgroup_note = ""
        self.ids: tuple[int, int] | None = None
        self.workdir = ""
        self.server: ForkServer | None = None
        self.supervisor_pid: int | None = None
        self.init_pid: int | None = None
        self.worker_pid: int | None = None
        self.supervisor_status: int | None = None
        self.server_lost = False
        self.events: list[dict[str, Any]] = []
        self.result_buf = bytearray()
        self.result_overflow = False
        self.status_buf = bytearray()
        self.stderr_tail = bytearray()
        self.peak_anon = 0
        self.baseline_anon = 0
        self.t_start = time.monotonic()
        self.t_forked = 0.0
        self.t_loading = 0.0
        self.t_armed = 0.0
        self.seen: dict[str, bool] = {}
        self.deadline_hit = False
        self.killed_at = 0.0
        self.stuck = False

    # -- lifecycle --

    def execute(self) -> LoadResult:
        drop_to = _job_ids(self)
        if drop_to:
            _make_readable(self.job.root)
        self.workdir = tempfile.mkdtemp(prefix="ckpt-stage-job-")
        os.chmod(self.workdir, 0o711)
        fallback = os.path.join(self.workdir, "work")
        os.mkdir(fallback, 0o700)
        if drop_to:
            try:
                os.chown(fallback, *drop_to)  # only used without a mount namespace
            except OSError:
                os.chmod(fallback, 0o777)  # no CAP_CHOWN (the pod template drops it)
        self.cgroup, self.cgroup_note = isolation.MemoryCgroup.create(
            f"{os.getpid()}-{self.id}", int(self.job.memory_bytes), self.settings.worker_cgroup)
        spec = {
            "job": {**self.job.to_dict(), "root": os.path.realpath(self.job.root)},
            "entry": self.entry,
            "cgroup_procs": self.cgroup.procs_file if self.cgroup else None,
            "drop_to": list(drop_to) if drop_to else None,
            "tmp_bytes": TMP_BYTES,
            "fallback_dir": fallback,
            "namespaces": True,
        }
        key = _server_key(self.settings)
        with _lock:
            _active[self.id] = self
        for attempt in (1, 2):
            try:
                self.server = _get_server(key)
            except ServerStartError as exc:
                return self.fail(ReasonCode.INTERNAL_ERROR, str(exc),
                                 "check CKPT_STAGE_WORKER_PYTHON and that it can import torch and ckpt_stage")
            try:
                self._launch(spec)
                break
            except ServerGone as exc:
                log.warning("fork server %s gone (%s); %s", self.server.pid, exc,
                            "restarting it" if attempt == 1 else "giving up")
                self._close_fds()
                if self.cgroup:
                    self.cgroup.kill_all()
                _restart_server(key, self.server)
                if attempt == 2:
                    return self.fail(ReasonCode.WORKER_LOST, f"the worker fork server died twice: {exc}",
                                     "the validation will be retried")
        self._wait()
        return self.classify()

    def _launch(self, spec: dict[str, Any]) -> None:
        spec_fd = os.memfd_create("ckpt-stage-job", os.MFD_CLOEXEC)
        self.fds["spec"] = spec_fd
        os.write(spec_fd, json.dumps(spec).encode())
        for name in ("result", "status", "stderr"):
            r, w = os.pipe()
            self.fds[name], self.fds[name + "_w"] = r, w
        assert self.server is not None
        self.reply = self.server.submit(
            [spec_fd, self.fds["result_w"], self.fds["status_w"], self.fds["stderr_w"]])
        # Our copies of the write ends go, so EOF arrives when the worker's side is done.
        for name in ("result_w", "status_w", "stderr_w", "spec"):
            os.close(self.fds.pop(name))
        self.reply.settimeout(PID_TIMEOUT_S)
        try:
            msg = self.reply.recv(4096)
        except OSError as exc:
            raise ServerGone(f"no answer from the fork server: {exc}") from None
        if not msg:
            raise ServerGone("the fork server closed the job's socket before forking")
        self.supervisor_pid = int(json.loads(msg)["pid"])
        self.t_forked = time.monotonic()
        self.reply.setblocking(False)

    def _wait(self) -> None:
        sel = selectors.DefaultSelector()
        streams = {"result": self.fds["result"], "status": self.fds["status"], "stderr": self.fds["stderr"]}
        for name, fd in streams.items():
            os.set_blocking(fd, False)
            sel.register(fd, selectors.EVENT_READ, name)
        assert self.reply is not None
        sel.register(self.reply, selectors.EVENT_READ, "reply")
        deadline = self.t_forked + float(self.job.timeout_s)
        exited_at = 0.0
        try:
            while True:
                now = time.monotonic()
                if not self.killed_at and now >= deadline:
                    self.deadline_hit = True
                    self.kill()
                if self.killed_at and now >= self.killed_at + KILL_GRACE_S:
                    self.stuck = True  # unkillable (D state?): classify with what we have
                    break
                ended = self.supervisor_status is not None or self.server_lost
                if ended and not exited_at:
                    exited_at = now
                open_streams = [k.data for k in sel.get_map().values() if k.data in streams]
                if ended and (not open_streams or now >= exited_at + 1.0):
                    break  # a straggler holding a pipe (no PID namespace) does not hold us up
                timeout = SAMPLE_S if self.killed_at else max(0.0, min(SAMPLE_S, deadline - now))
                for key, _ in sel.select(timeout):
                    self._read(sel, key)
                self._sample()
        finally:
            sel.close()

    def _read(self, sel: selectors.BaseSelector, key: selectors.SelectorKey) -> None:
        name = key.data
        if name == "reply":
            try:
                msg = self.reply.recv(4096) if self.reply else b""
            except BlockingIOError:
                return
            except OSError:
                msg = b""
            if not msg:
                sel.unregister(key.fileobj)
                if self.supervisor_status is None:
                    self.server_lost = True  # the fork server died mid-job; its children went with it
                return
            data = json.loads(msg)
            if "exit" in data:
                self.supervisor_status = int(data["exit"])
            return
        try:
            chunk = os.read(key.fd, 1 << 16)
        except BlockingIOError:
            return
        except OSError:
            chunk = b""
        if not chunk:
            sel.unregister(key.fd)
            return
        if name == "result":
            if len(self.result_buf) + len(chunk) > RESULT_CAP:
                self.result_overflow = True  # keep draining so the worker is not blocked; drop it
            else:
                self.result_buf += chunk
        elif name == "stderr":
            self.stderr_tail += chunk
            if len(self.stderr_tail) > STDERR_TAIL:
                del self.stderr_tail[:-STDERR_TAIL]
        elif name == "status" and len(self.status_buf) < STATUS_CAP:
            self.status_buf += chunk
            *lines, rest = self.status_buf.split(b"\n")
            self.status_buf = bytearray(rest)
            for line in lines:
                try:
                    self._event(json.loads(line))
                except ValueError:
                    pass

    def _event(self, ev: dict[str, Any]) -> None:
        self.events.append(ev)
        kind = ev.get("ev")
        if kind == "supervisor":
            self.init_pid = int(ev["init_pid"])
        elif kind == "loading":
            self.t_loading = time.monotonic()
        elif kind == "armed":
            self.t_armed = time.monotonic()

    def _sample(self) -> None:
        if self.worker_pid is None and self.t_loading and self.init_pid:
            self.worker_pid = self._find_worker()
        if self.worker_pid is not None:
            st = isolation.proc_status(self.worker_pid)
            anon = _kib(st.get("RssAnon", ""))
            if st and self.t_armed:
                # After the loader armed its filter (init's "armed" event): what /proc shows now.
                facts = isolation.measured_facts(st)
                self.seen["seccomp"] = self.seen.get("seccomp", False) or bool(facts.get("seccomp"))
                self.seen["no_new_privs"] = self.seen.get("no_new_privs", False) or bool(facts.get("no_new_privs"))
                self.seen["root"] = self.seen.get("root", False) or facts.get("uid") == 0
            if anon:
                self.baseline_anon = self.baseline_anon or anon
                self.peak_anon = max(self.peak_anon, anon)

    def _find_worker(self) -> int | None:
        # Its pid in our namespace (inside its own PID namespace it is 2): the cgroup's member that is
        # neither supervisor nor init, else init's child.
        skip = {self.supervisor_pid, self.init_pid}
        if self.cgroup:
            pids = [p for p in self.cgroup.pids() if p not in skip]
            if pids:
                return min(pids)
        kids = isolation.children_of(self.init_pid) if self.init_pid else []
        return kids[0] if kids else None

    def kill(self) -> None:
        self.killed_at = time.monotonic()
        if self.supervisor_pid and self.supervisor_status is None:
            try:
                os.killpg(self.supervisor_pid, signal.SIGKILL)
            except OSError:
                pass
        if self.cgroup:
            self.cgroup.kill_all()

    def stop(self) -> None:
        """Never raises, always runs: kill what is left, remove the cgroup, close fds, remove dirs."""
        for step in (self._stop_processes, self._close_fds, self._remove_cgroup, self._remove_workdir):
            try:
                step()
            except Exception:  # noqa: BLE001
                log.debug("worker stop step %s failed", step.__name__, exc_info=True)
        with _lock:
            _active.pop(self.id, None)

    def _stop_processes(self) -> None:
        if self.supervisor_pid and self.supervisor_status is None and not self.server_lost:
            self.kill()
        elif self.cgroup:
            self.cgroup.kill_all()

    def _close_fds(self) -> None:
        for name in list(self.fds):
            try:
                os.close(self.fds.pop(name))
            except OSError:
                pass
        if self.reply is not None:
            # Closing the reply socket also tells the fork server to kill the job if it still runs.
            self.reply.close()
            self.reply = None

    def _remove_cgroup(self) -> None:
        if self.cgroup and not self.cgroup.remove():
            log.warning("could not remove cgroup %s", self.cgroup.path)

    def _remove_workdir(self) -> None:
        if self.workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def describe(self) -> dict[str, Any]:
        return {"job_id": self.id, "supervisor_pid": self.supervisor_pid, "init_pid": self.init_pid,
                "worker_pid": self.worker_pid, "cgroup": str(self.cgroup.path) if self.cgroup else None}

    # -- outcome --

    def isolation_info(self) -> dict[str, Any]:
        info: dict[str, Any] = {"net_namespace": False, "pid_namespace": False, "mount_namespace": False,
                                "unprivileged_user": False, "rlimits": False, "no_new_privs": False}
        for ev in self.events:
            if ev.get("ev") == "isolated":
                info.update(ev.get("iso") or {})
        # Measured, not claimed: init read these off the stopped loader's /proc status before any job
        # code ran; the parent's own samples of the same file can only add (a filter is never lifted).
        armed = next((e for e in self.events if e.get("ev") == "armed"), None)
        facts = dict(armed.get("facts") or {}) if armed else {}
        info["seccomp"] = bool(facts.get("seccomp")) or self.seen.get("seccomp", False)
        info["no_new_privs"] = bool(facts.get("no_new_privs")) or self.seen.get("no_new_privs", False)
        if "unprivileged_user" in facts:
            info["unprivileged_user"] = bool(facts["unprivileged_user"]) and not self.seen.get("root", False)
        if not facts:
            info.setdefault("notes", []).append("the loader's /proc status could not be read before it ran")
        if info["seccomp"]:
            info["seccomp_refused"] = list(isolation.SECCOMP_DENY) + [
                "clone3 (ENOSYS)", "clone(CLONE_NEW*)", "personality(!=PER_LINUX)",
                "any syscall outside the allowlist (ENOSYS)"]
        info["env_stripped"] = True
        info["cgroup_memory"] = bool(self.cgroup) and bool(info.get("cgroup_memory"))
        if self.cgroup:
            info["memory_limit_bytes"] = self.cgroup.limit
            info["cgroup_version"] = self.cgroup.version
        elif self.cgroup_note:
            info.setdefault("notes", []).append(f"no memory cgroup: {self.cgroup_note}")
        if self.server is not None and self.server.hello.get("masks"):
            info.setdefault("masked_paths", self.server.hello["masks"])
        return info

    def _base(self) -> dict[str, Any]:
        timings = {}
        if self.t_loading:
            timings["worker_start"] = self.t_loading - self.t_start
        if self.t_armed:
            timings["worker_armed"] = self.t_armed - self.t_start  # + root, privilege drop, seccomp
        runtime = dict(self.server.hello.get("runtime") or {}) if self.server else {}
        return {"runtime": runtime, "timings_s": timings, "peak_anon_bytes": self.peak_anon,
                "isolation": self.isolation_info(),
                "info": {"worker_baseline_anon_bytes": self.baseline_anon} if self.baseline_anon else {}}

    def fail(self, code: ReasonCode, message: str, hint: str = "", **detail: Any) -> LoadResult:
        base = self._base()
        tail = self.stderr_text()
        if tail:
            detail.setdefault("stderr_tail", clean_text(tail[-2000:], multiline=True))
        # Messages quote the worker's stderr, which job code writes: escaped like its result.
        return LoadResult(findings=(Finding(code, clean_text(message), clean_text(hint), detail=detail),), **base)

    def stderr_text(self) -> str:
        return bytes(self.stderr_tail).decode(errors="replace").strip()

    def classify(self) -> LoadResult:
        """The job's outcome: the first row of ``OUTCOMES`` whose condition holds."""
        end = _Ending.of(self)
        return next(build(end) for _name, holds, build in OUTCOMES if holds(end))

    def _merge(self, result: LoadResult) -> LoadResult:
        base = self._base()
        # Only the parent's (and init's) view of the isolation: parse_result drops the loader's claims.
        isolation_info = dict(base["isolation"])
        info = {**result.info, **base["info"]}
        return LoadResult(
            findings=result.findings + tuple(cross_check(self.job, result)),
            runtime=result.runtime or base["runtime"],
            recorded=result.recorded,
            timings_s={**base["timings_s"], **result.timings_s},
            peak_anon_bytes=max(result.peak_anon_bytes, self.peak_anon),
            isolation=isolation_info,
            info=info,
        )


# --- how a job ended: the outcome table ------------------------------------------------------------


class _Ending:
    """What the parent knows once the worker is gone: its run, init's exit event (if any)."""

    __slots__ = ("run", "exit")

    def __init__(self, run: _SupervisedJob, exit_ev: dict[str, Any] | None):
        self.run, self.exit = run, exit_ev

    @classmethod
    def of(cls, run: _SupervisedJob) -> _Ending:
        return cls(run, next((e for e in reversed(run.events) if e.get("ev") == "exit"), None))

    @property
    def signal(self) -> int | None:
        """The signal that ended the worker, per init's exit event."""
        return int(self.exit["signal"]) if self.exit is not None and "signal" in self.exit else None

    @property
    def cpu_s(self) -> float:
        return float((self.exit or {}).get("cpu_s") or 0.0)

    def fail(self, code: ReasonCode, message: str, hint: str = "", **detail: Any) -> LoadResult:
        return self.run.fail(code, message, hint, **detail)


def _reported(end: _Ending) -> bool:
    run = end.run
    return end.exit is not None and end.exit.get("code") == 0 and bool(run.result_buf) and not run.result_overflow


def _from_result(end: _Ending) -> LoadResult:
    try:
        result = parse_result(bytes(end.run.result_buf))
    except ResultInvalid as exc:
        # Never a pass: the answer is what job code (an allowed architecture, model code) could
        # have written itself.
        return end.fail(ReasonCode.WORKER_CRASH, clean_text(f"the worker's result is malformed: {exc}", 500),
                        "the loader or code it ran (an architecture package, model code) wrote a "
                        "result that breaks the schema; load the version with the serving runtime "
                        "to see why")
    return end.run._merge(result)


def _oom_killed(end: _Ending) -> bool:
    return bool(end.run.cgroup.oom_kills() if end.run.cgroup else 0)


def _out_of_memory(end: _Ending) -> LoadResult:
    run, job = end.run, end.run.job
    peak = run.cgroup.peak() if run.cgroup else 0
    return end.fail(
        ReasonCode.RESOURCE_LIMIT,
        f"the worker was killed by the out-of-memory killer at its memory limit of "
        f"{format_size(job.memory_bytes)} (peak usage {format_size(peak)}, "
        f"peak anonymous memory {format_size(run.peak_anon)})",
        "the model needs more memory than its worker class allows: add a larger class to "
        "CKPT_STAGE_WORKER_CLASSES, or shrink/shard the checkpoint",
        limit_bytes=int(job.memory_bytes), peak_bytes=peak)


def _past_deadline(end: _Ending) -> LoadResult:
    return end.fail(
        ReasonCode.TIMEOUT,
        f"loading ran past its {end.run.job.timeout_s:g} s deadline; the worker was killed",
        "the checkpoint or its architecture loops or blocks; if it is legitimately slow, raise "
        "CKPT_STAGE_WORKER_TIMEOUT_S", timeout_s=end.run.job.timeout_s)


def _cpu_spent(end: _Ending) -> bool:
    return end.signal == signal.SIGXCPU or (end.signal == signal.SIGKILL
                                            and end.cpu_s >= float(end.run.job.cpu_s) - 0.5)


def _out_of_cpu(end: _Ending) -> LoadResult:
    name, cpu = _signame(end.signal or 0), end.cpu_s
    return end.fail(
        ReasonCode.TIMEOUT,
        f"the worker used up its CPU budget of {end.run.job.cpu_s:g} s ({name} after {cpu:.1f} s of CPU)",
        "the checkpoint or its architecture computes without end; if it is legitimately slow, "
        "raise CKPT_STAGE_WORKER_CPU_S", signal=name, cpu_s=cpu)


def _file_too_large(end: _Ending) -> LoadResult:
    return end.fail(
        ReasonCode.RESOURCE_LIMIT,
        f"the worker tried to write a file larger than {format_size(isolation.FSIZE_BYTES)}",
        "loading a checkpoint must not write large files", signal=_signame(end.signal or 0))


def _crashed(end: _Ending) -> LoadResult:
    sig = end.signal or 0
    name = _signame(sig)
    return end.fail(
        ReasonCode.WORKER_CRASH,
        f"the worker died by signal {name} ({sig}) while loading and checking the model",
        "the checkpoint or its architecture crashes the runtime (native code, a corrupt "
        "tensor); load it with the serving runtime to see the crash", signal=name)


def _killed_from_outside(end: _Ending) -> LoadResult:
    name = _signame(end.signal or 0)
    return end.fail(
        ReasonCode.WORKER_LOST,
        f"the worker was killed by {name} from outside the stage (not by its own limits)",
        "an operator or the host killed the worker; the validation will be retried", signal=name)


def _no_result(end: _Ending) -> LoadResult:
    why = f"its result exceeded {format_size(RESULT_CAP)}" if end.run.result_overflow else "no result"
    return end.fail(ReasonCode.INTERNAL_ERROR, f"the worker exited cleanly with {why}",
                    "this is a bug in ckpt-stage or the loader")


def _exit_status(end: _Ending) -> LoadResult:
    assert end.exit is not None  # the row's condition
    code: Any = end.exit.get("code")
    what = {child.SETUP_FAILED: "could not set up its isolation",
            child.LOADER_RAISED: "raised instead of reporting"}.get(code, f"exited with status {code}")
    return end.fail(ReasonCode.INTERNAL_ERROR,
                    f"the worker {what}: {end.run.stderr_text()[-500:] or 'no output'}",
                    "this is a bug in ckpt-stage or the loader, or the platform refuses an "
                    "isolation measure", exit_status=code)


def _errors(end: _Ending) -> list[str]:
    return [e.get("msg", "") for e in end.run.events if e.get("ev") == "error"]


def _worker_error(end: _Ending) -> LoadResult:
    return end.fail(ReasonCode.INTERNAL_ERROR, f"the worker failed: {_errors(end)[-1]}"[:500],
                    "the platform refused an isolation measure, or this is a bug in ckpt-stage")


def _supervisor_signaled(end: _Ending) -> bool:
    st = end.run.supervisor_status
    return st is not None and os.WIFSIGNALED(st)


def _supervisor_killed(end: _Ending) -> LoadResult:
    name = _signame(os.WTERMSIG(end.run.supervisor_status or 0))
    return end.fail(ReasonCode.WORKER_LOST,
                    f"the worker was killed by {name} from outside the stage before it reported",
                    "an operator or the host killed the worker; the validation will be retried",
                    signal=name)


def _unreported(end: _Ending) -> LoadResult:
    return end.fail(ReasonCode.INTERNAL_ERROR,
                    f"the worker ended without reporting: {end.run.stderr_text()[-500:] or 'no output'}",
                    "this is a bug in ckpt-stage")


#: How a job ended, in priority order: ``_SupervisedJob.classify`` takes the first row whose condition holds.
#: A clean exit with a result wins; then the stage's own limits (memory, wall clock, CPU, file size),
#: which a killed worker's signal alone would misreport; then crashes, outside kills and the
#: stage's own failures. The last row always holds.
OUTCOMES: tuple[tuple[str, Callable[[_Ending], bool], Callable[[_Ending], LoadResult]], ...] = (
    ("result", _reported, _from_result),
    ("out of memory", _oom_killed, _out_of_memory),
    ("deadline", lambda end: end.run.deadline_hit, _past_deadline),
    ("CPU budget", lambda end: end.signal is not None and _cpu_spent(end), _out_of_cpu),
    ("file size limit", lambda end: end.signal == signal.SIGXFSZ, _file_too_large),
    ("crash signal", lambda end: end.signal in _CRASH_SIGNALS, _crashed),
    ("killed", lambda end: end.signal is not None, _killed_from_outside),
    ("clean exit, no result", lambda end: end.exit is not None and end.exit.get("code") == 0, _no_result),
    ("exit status", lambda end: end.exit is not None, _exit_status),
    ("worker error", lambda end: bool(_errors(end)), _worker_error),
    ("unkillable", lambda end: end.run.stuck, lambda end: end.fail(
        ReasonCode.WORKER_LOST, "the worker could not be killed and did not report",
        "the host may be overloaded; the validation will be retried")),
    ("fork server lost", lambda end: end.run.server_lost, lambda end: end.fail(
        ReasonCode.WORKER_LOST, "the worker's fork server died during the job",
        "the host or an operator killed it; the validation will be retried")),
    ("supervisor killed", _supervisor_signaled, _supervisor_killed),
    ("no report", lambda end: True, _unreported),
)


# --- the worker's answer is untrusted input ------------------------------------------------------

MAX_FINDINGS = 200
MAX_TEXT = 2000
"""Longest message, hint or other string kept from a worker (longer ones are cut, marked with …)."""
MAX_KEY = 300
MAX_ITEMS = 200_000
"""Most entries in any one list or mapping of ``info`` (a layer table of a very large model)."""
MAX_DEPTH = 8
MAX_NODES = 2_000_000
"""Most JSON values (counted before parsing as the bytes ``[``, ``{`` and ``,``, an upper bound) in one
result. The byte cap alone is not enough: 30 MiB of ``{},{},...`` parsed into ten million dicts took
the parent from 230 MiB to 1 GiB before any schema check could refuse it (and jobs run concurrently in
one stage process). A layer table of 200,000 tensors needs about 1.2 million."""
MAX_NUMBER = 2.0**63
_TOP_KEYS = frozenset({"findings", "runtime", "recorded", "timings_s", "peak_anon_bytes", "isolation", "info"})
_FINDING_KEYS = frozenset({"code", "message", "hint", "file", "severity", "detail"})
_CONTROL_RE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")
_CONTROL_MULTILINE_RE = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


class ResultInvalid(ValueError):
    """The worker's result does not follow the schema (a bug, or job code forging a verdict)."""


def clean_text(value: object, limit: int = MAX_TEXT, *, multiline: bool = False) -> str:
    """A string safe to copy into a report, a tag or a terminal: control characters (ANSI escapes,
    bidi overrides, NUL, and newlines unless ``multiline``) escaped as ``\\xNN``/``\\uNNNN``, at
    most ``limit`` characters."""
    text = str(value)
    text = (_CONTROL_MULTILINE_RE if multiline else _CONTROL_RE).sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), text)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _text(value: object, where: str, limit: int = MAX_TEXT) -> str:
    if not isinstance(value, str):
        raise ResultInvalid(f"{where} is {type(value).__name__}, not a string")
    return clean_text(value, limit)


def _number(value: object, where: str, *, lo: float = -MAX_NUMBER, hi: float = MAX_NUMBER) -> float | int:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ResultInvalid(f"{where} is {type(value).__name__}, not a number")
    if isinstance(value, float) and not math.isfinite(value):
        raise ResultInvalid(f"{where} is not finite")
    if not lo <= value <= hi:
        raise ResultInvalid(f"{where} = {value} is out of range")
    return value


def _mapping(value: object, where: str, limit: int = MAX_ITEMS) -> dict:
    if not isinstance(value, dict):
        raise ResultInvalid(f"{where} is {type(value).__name__}, not an object")
    if len(value) > limit:
        raise ResultInvalid(f"{where} has {len(value)} entries (at most {limit})")
    return value


def _json_value(value: object, where: str, depth: int = 0) -> Any:
    """Free-form JSON (``info``, a finding's ``detail``) with every string cleaned and size bounds."""
    if depth > MAX_DEPTH:
        raise ResultInvalid(f"{where} nests deeper than {MAX_DEPTH}")
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, (int, float)):
        if isinstance(value, float) and not math.isfinite(value):
            return str(value)  # a NaN statistic is a fact, but not a JSON number
        return _number(value, where)
    if isinstance(value, str):
        return clean_text(value, multiline=True)  # tracebacks keep their lines
    if isinstance(value, list):
        if len(value) > MAX_ITEMS:
            raise ResultInvalid(f"{where} has {len(value)} items (at most {MAX_ITEMS})")
        return [_json_value(v, where, depth + 1) for v in value]
    if isinstance(value, dict):
        return {clean_text(k, MAX_KEY): _json_value(v, f"{where}.{clean_text(k, 40)}", depth + 1)
                for k, v in _mapping(value, where).items()}
    raise ResultInvalid(f"{where} holds a {type(value).__name__}")


def _finding(data: object, i: int) -> Finding:
    where = f"findings[{i}]"
    data = _mapping(data, where, len(_FINDING_KEYS))
    unknown = set(data) - _FINDING_KEYS
    if unknown:
        raise ResultInvalid(f"{where} has unknown keys {sorted(unknown)}")
    code = data.get("code")
    try:
        rc = ReasonCode(code) if code is not None else None
        severity = Severity(data.get("severity", "error"))
    except ValueError:
        raise ResultInvalid(f"{where}: {clean_text(code, 60)!r} or its severity is not a reason code/severity") from None
    file = data.get("file")
    return Finding(rc, _text(data.get("message", ""), f"{where}.message"),
                   _text(data.get("hint", "") or "", f"{where}.hint"),
                   _text(file, f"{where}.file", 1000) if file is not None else None, severity,
                   _json_value(data.get("detail") or {}, f"{where}.detail") or {})


def parse_result(raw: bytes) -> LoadResult:
    """The worker's result JSON → LoadResult, or ResultInvalid. Only known keys; reason codes must be
    the contract's; every string is capped and escaped; numbers finite and bounded. The worker's own
    ``isolation`` claims are dropped: the parent measures those."""
    nodes = raw.count(b"[") + raw.count(b"{") + raw.count(b",")
    if nodes > MAX_NODES:
        raise ResultInvalid(f"it holds about {nodes} JSON values (at most {MAX_NODES})")
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise ResultInvalid(f"not JSON ({type(exc).__name__})") from None
    data = _mapping(data, "the result", len(_TOP_KEYS))
    unknown = set(data) - _TOP_KEYS
    if unknown:
        raise ResultInvalid(f"unknown keys {sorted(clean_text(k, 40) for k in unknown)}")
    findings = data.get("findings") or []
    if not isinstance(findings, list) or len(findings) > MAX_FINDINGS:
        raise ResultInvalid(f"findings must be a list of at most {MAX_FINDINGS}")

    def versions(key: str) -> dict[str, str]:
        m = _mapping(data.get(key) or {}, key, 16)
        return {_text(k, key, 64): _text(v, f"{key}.{k}", 200) for k, v in m.items()}

    timings = _mapping(data.get("timings_s") or {}, "timings_s", 32)
    return LoadResult(
        findings=tuple(_finding(f, i) for i, f in enumerate(findings)),
        runtime=versions("runtime"),
        recorded=versions("recorded"),
        timings_s={_text(k, "timings_s", 64): float(_number(v, f"timings_s.{k}", lo=0, hi=1e7))
                   for k, v in timings.items()},
        peak_anon_bytes=int(_number(data.get("peak_anon_bytes") or 0, "peak_anon_bytes", lo=0, hi=2**60)),
        isolation={},
        info=_json_value(_mapping(data.get("info") or {}, "info"), "info"),
    )


def cross_check(job: LoadJob, result: LoadResult) -> list[Finding]:
    """What the worker says it loaded against what the parent's scan read from the same bytes
    (``job.expected``): a different tensor set, shape or dtype means the worker did not load what was
    scanned, or lies about it. Either way it cannot pass."""
    tensors = (job.expected or {}).get("tensors")
    if not tensors:
        return []
    layers = result.info.get("layers")
    problems = []
    # A Hugging Face folder is a state_dict too (its layers are the tensors read, before transformers ran).
    # Where the scan read a plain state_dict, a result that would pass must say it loaded one: a worker
    # that leaves out its layer table, or calls the file something else, would skip the comparison.
    if not isinstance(layers, dict) or result.info.get("model_kind") not in ("state_dict", "hf-folder"):
        if any(f.blocking for f in result.findings):
            return []  # not a pass anyway: the loader stopped before it read the tensors
        layers = layers if isinstance(layers, dict) else {}
        problems.append(f"the scan read a state_dict of {len(tensors)} tensors, the worker reported "
                        f"{clean_text(result.info.get('model_kind'), 40)!r} with "
                        f"{len(layers)} layers")
    missing, extra = sorted(set(tensors) - set(layers)), sorted(set(layers) - set(tensors))
    if missing or extra:
        problems.append(f"tensor names differ (not reported: {missing[:5]}, not in the file: {extra[:5]})")
    for name in sorted(set(tensors) & set(layers)):
        want, got = tensors[name], layers[name] if isinstance(layers[name], dict) else {}
        if list(want.get("shape", [])) != list(got.get("shape", [])) or want.get("dtype") != got.get("dtype"):
            problems.append(f"{name}: scanned {want.get('dtype')}{list(want.get('shape', []))}, "
                            f"worker reported {got.get('dtype')}{got.get('shape')}")
            if len(problems) >= 5:
                break
    if not problems:
        return []
    return [Finding(ReasonCode.WORKER_CRASH,
                    clean_text("the worker's report does not match the static scan of the same files: "
                               + "; ".join(problems), 500),
                    "the loader or code it ran (an architecture package, model code) misreported what it "
                    "loaded; treat the version as hostile and load it with the serving runtime to see why")]


def _kib(field: str) -> int:
    try:
        return int(field.split()[0]) * 1024
    except (ValueError, IndexError):
        return 0


def _signame(sig: int) -> str:
    try:
        return signal.Signals(sig).name
    except ValueError:
        return f"signal {sig}"
