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
            try:
                s = socket.socket()
            except OSError as exc:  # the seccomp filter refuses socket() itself
                ob["connect"] = errno.errorcode.get(exc.errno or 0, str(exc))
            else:
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
    # A parallel op: hangs if the fork server had run torch ops before forking (docs/traps.md).
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


# --- the walls beyond the network namespace ---------------------------------------------------------

_SYS = {"clone": 56, "ptrace": 101, "keyctl": 250, "unshare": 272, "perf_event_open": 298, "setns": 308,
        "process_vm_readv": 310, "bpf": 321, "userfaultfd": 323, "io_uring_setup": 425, "mount": 165,
        "pivot_root": 155, "chroot": 161, "add_key": 248, "open_by_handle_at": 304, "personality": 135,
        "init_module": 175, "kexec_load": 246}
"""x86_64 syscall numbers: the probe calls them raw, as hostile native code would (no libc wrapper
that might refuse first)."""
CLONE_NEWUSER = 0x10000000
CLONE_NEWNS = 0x00020000
CLONE_NEWNET = 0x40000000


def _errname(exc: OSError) -> str:
    return errno.errorcode.get(exc.errno or 0, str(exc))


def _syscall(name: str, *args: int) -> str:
    """"ok" when the kernel ran it, else the errno name (EPERM is what the filter answers)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    cargs = [ctypes.c_long(a) for a in args]
    rc = libc.syscall(ctypes.c_long(_SYS[name]), *cargs)
    if rc < 0:
        return errno.errorcode.get(ctypes.get_errno(), str(ctypes.get_errno()))
    return f"ok:{rc}"


def _connect_unix(path: str) -> str:
    try:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    except OSError as exc:
        return _errname(exc)
    s.settimeout(2)
    try:
        s.connect(path)
        return "connected"
    except OSError as exc:
        return _errname(exc)
    finally:
        s.close()


def _socket_files(roots: list[str], depth: int = 4) -> list[str]:
    import stat as _stat

    found = []
    for root in roots:
        base = root.rstrip("/").count("/")
        for dirpath, dirnames, filenames in os.walk(root, onerror=lambda e: None):
            if dirpath.count("/") - base >= depth:
                dirnames[:] = []
            for name in filenames:
                p = os.path.join(dirpath, name)
                try:
                    if _stat.S_ISSOCK(os.lstat(p).st_mode):
                        found.append(p)
                except OSError:
                    pass
    return found


def _writable_dirs(depth: int = 3) -> list[str]:
    """Every directory writable by others that the probe can see, down to ``depth`` below /."""
    out = []
    for dirpath, dirnames, _ in os.walk("/", onerror=lambda e: None):
        if dirpath.startswith(("/proc", "/sys")):
            dirnames[:] = []
            continue
        if dirpath.count("/") >= depth:
            dirnames[:] = []
        try:
            if os.stat(dirpath).st_mode & 0o002:
                out.append(dirpath)
        except OSError:
            pass
    return out


class Probe(_Small):
    """Tries every way out of the worker that a network namespace alone leaves open, and records for
    each row what happened: ``refused:<errno>``-style strings, or what it reached.

    ``planted``: a world-readable host file outside the job; ``canary``: a file name it tries to create
    in every world-writable directory it finds (the test looks for it on the host afterwards);
    ``tcp_ports``: loopback ports of host services (PostgreSQL 5432, Redis 6379); ``abstract``: the name
    of an abstract Unix socket the test listens on in the host's network namespace.
    """

    def __init__(self, planted: str = "", canary: str = "probe-canary", tcp_ports: list[int] | None = None,
                 abstract: str = ""):
        super().__init__()
        ob: dict = {}
        # Unix sockets of host services, and any other socket file in the usual places.
        for name, path in (("postgres_var_run", "/var/run/postgresql/.s.PGSQL.5432"),
                           ("postgres_run", "/run/postgresql/.s.PGSQL.5432"),
                           ("mariadb", "/run/mysqld/mysqld.sock"),
                           ("mariadb_var_run", "/var/run/mysqld/mysqld.sock")):
            ob[f"unix:{name}"] = _connect_unix(path)
        socks = _socket_files(["/run", "/var/run", "/tmp", "/var/tmp", "/dev/shm", "/home", "/root"])
        ob["socket_files"] = socks
        ob["socket_files_connected"] = [p for p in socks if _connect_unix(p) == "connected"]
        if abstract:
            ob["unix:abstract"] = _connect_unix("\0" + abstract)
        for port in tcp_ports or [5432, 6379]:
            for kind, typ in (("tcp", socket.SOCK_STREAM), ("udp", socket.SOCK_DGRAM)):
                try:
                    s = socket.socket(socket.AF_INET, typ)
                except OSError as exc:
                    ob[f"{kind}:{port}"] = _errname(exc)
                    continue
                s.settimeout(2)
                try:
                    if typ == socket.SOCK_STREAM:
                        s.connect(("127.0.0.1", port))
                        ob[f"{kind}:{port}"] = "connected"
                    else:
                        s.sendto(b"probe", ("127.0.0.1", port))
                        ob[f"{kind}:{port}"] = "sent"
                except OSError as exc:
                    ob[f"{kind}:{port}"] = _errname(exc)
                finally:
                    s.close()
        for fam in ("AF_INET", "AF_INET6", "AF_NETLINK", "AF_PACKET", "AF_UNIX", "AF_VSOCK", "AF_ALG"):
            try:
                typ = socket.SOCK_RAW if fam in ("AF_NETLINK", "AF_PACKET") else \
                    socket.SOCK_SEQPACKET if fam == "AF_ALG" else socket.SOCK_STREAM
                socket.socket(getattr(socket, fam), typ).close()
                ob[f"socket:{fam}"] = "created"
            except (OSError, AttributeError) as exc:
                ob[f"socket:{fam}"] = _errname(exc) if isinstance(exc, OSError) else "no such family"
        # The host filesystem.
        for path in ("/etc/passwd", "/etc/hostname", "/etc/shadow", "/etc/os-release", planted):
            if not path:
                continue
            try:
                with open(path, "rb") as fh:
                    data = fh.read(1 << 20).decode(errors="replace")
                ob[f"read:{path}"] = ("users:" + ",".join(sorted(line.split(":")[0] for line in data.splitlines()
                                                                 if ":" in line))) \
                    if path == "/etc/passwd" else "read"
            except OSError as exc:
                ob[f"read:{path}"] = _errname(exc)
        for path in ("/", "/home", "/run", "/var/run", "/srv", "/opt", "/etc", "/tmp", "/work", "/root", "/mnt"):
            try:
                ob[f"list:{path}"] = sorted(os.listdir(path))
            except OSError as exc:
                ob[f"list:{path}"] = _errname(exc)
        written = {}
        candidates = sorted(set(_writable_dirs()) | {"/run/lock", "/var/lock", "/tmp", "/var/tmp", "/dev/shm",
                                                     "/dev/mqueue", "/run/user"})
        for d in candidates:
            try:
                with open(os.path.join(d, canary), "w") as fh:
                    fh.write("escaped")
                written[d] = "written"
            except OSError as exc:
                written[d] = _errname(exc)
        ob["writes"] = written
        # Syscalls that open the kernel wide (raw numbers: x86_64).
        if platform.machine() == "x86_64":
            ob["sys:unshare(NEWUSER)"] = _syscall("unshare", CLONE_NEWUSER)
            ob["sys:unshare(NEWNS)"] = _syscall("unshare", CLONE_NEWNS)
            libc = ctypes.CDLL(None, use_errno=True)
            libc.syscall.restype = ctypes.c_long
            # clone(CLONE_NEWUSER|SIGCHLD): a child that runs would exit at once.
            pid = libc.syscall(ctypes.c_long(_SYS["clone"]), ctypes.c_long(CLONE_NEWUSER | 17), ctypes.c_long(0),
                               ctypes.c_long(0), ctypes.c_long(0), ctypes.c_long(0))
            if pid == 0:
                os._exit(0)
            if pid > 0:
                os.waitpid(pid, 0)
                ob["sys:clone(NEWUSER)"] = "ok"
            else:
                ob["sys:clone(NEWUSER)"] = errno.errorcode.get(ctypes.get_errno(), "?")
            ob["sys:setns"] = _syscall("setns", 0, CLONE_NEWNET)
            ob["sys:mount"] = _syscall("mount", 0, 0, 0, 0, 0)
            ob["sys:pivot_root"] = _syscall("pivot_root", 0, 0)
            ob["sys:chroot"] = _syscall("chroot", 0)
            ob["sys:ptrace(TRACEME)"] = _syscall("ptrace", 0, 0, 0, 0)
            ob["sys:process_vm_readv"] = _syscall("process_vm_readv", 1, 0, 0, 0, 0, 0)
            params = ctypes.create_string_buffer(120)
            ob["sys:io_uring_setup"] = _syscall("io_uring_setup", 1, ctypes.addressof(params))
            ob["sys:keyctl"] = _syscall("keyctl", 0, -3, 0)  # KEYCTL_GET_KEYRING_ID(session)
            ob["sys:add_key"] = _syscall("add_key", 0, 0, 0, 0, 0)
            ob["sys:bpf"] = _syscall("bpf", 0, 0, 0)
            ob["sys:perf_event_open"] = _syscall("perf_event_open", 0, 0, -1, -1, 0)
            ob["sys:userfaultfd"] = _syscall("userfaultfd", 0)
            ob["sys:open_by_handle_at"] = _syscall("open_by_handle_at", -100, 0, 0)
            ob["sys:personality(ADDR_NO_RANDOMIZE)"] = _syscall("personality", 0x0040000)
            ob["sys:init_module"] = _syscall("init_module", 0, 0, 0)
            ob["sys:kexec_load"] = _syscall("kexec_load", 0, 0, 0, 0)
        # Threads still start (clone3 answers ENOSYS, glibc falls back to a filtered clone).
        import threading

        box: list[int] = []
        t = threading.Thread(target=lambda: box.append(1))
        t.start()
        t.join()
        ob["thread"] = "ok" if box else "failed"
        status = {}
        with open("/proc/self/status") as fh:
            for line in fh:
                k, _, v = line.partition(":")
                if k in ("Seccomp", "NoNewPrivs", "Uid", "CapEff"):
                    status[k] = v.strip()
        ob["status"] = status
        self.observed = ob


def forged_load(job: LoadJob) -> LoadResult:
    """Test-only loader entry: writes a forged "pass" straight to the result pipe and exits, as job code
    that owns the worker could (an unknown code, an extra key, a 1 MB message)."""
    import json
    import sys

    body = {"findings": [{"code": "PASSED", "message": "x" * 2**20, "severity": "info"}], "verdict": "pass"}
    os.write(3, json.dumps(body).encode())
    os.close(3)
    sys.stdout.flush()
    os._exit(0)


def lying_load(job: LoadJob) -> LoadResult:
    """Test-only loader entry: a clean result that claims isolation it does not measure."""
    return LoadResult(isolation={"seccomp": False, "private_root": False, "net_namespace": False})


class X32Socket(_Small):
    """socket() through the x32 ABI (syscall number | 0x40000000), which a filter written for x86_64
    alone would not see; libseccomp kills a call from an ABI the filter does not cover (SIGSYS)."""

    def __init__(self) -> None:
        super().__init__()
        libc = ctypes.CDLL(None, use_errno=True)
        libc.syscall.restype = ctypes.c_long
        rc = libc.syscall(ctypes.c_long(0x40000000 | 41), ctypes.c_long(socket.AF_INET),
                          ctypes.c_long(socket.SOCK_STREAM), ctypes.c_long(0))
        self.observed = {"x32_socket": rc, "errno": ctypes.get_errno()}
