"""Hostile architectures for the red-team tests of the isolated worker (``test_isolation_redteam``).

Each is an allowed architecture (``CKPT_STAGE_ARCH_MODULES=tests.corpus.redteam_archs``) whose
constructor attacks the walls with plain Python, ctypes and hand-made machine code, as code an
operator allowed (or a torch bug handed an attacker) would, and records what it reached in
``self.observed``: an errno name, or what got through. Attacks that end the process (a syscall the
filter kills) run in a forked child, so one job reports them all.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import mmap
import os
import signal
import stat
import time

from tests.corpus.isolation_archs import _Small

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long

# x86_64 numbers of syscalls that have no (or a refusing) libc wrapper.
NR = {"name_to_handle_at": 303, "open_tree": 428, "move_mount": 429, "fsopen": 430, "fsconfig": 431,
      "fsmount": 432, "fspick": 433, "mount_setattr": 442, "pidfd_open": 434, "pidfd_send_signal": 424,
      "pidfd_getfd": 438, "process_madvise": 440, "memfd_secret": 447, "kcmp": 312, "seccomp": 317,
      "clone3": 435, "landlock_create_ruleset": 444, "quotactl_fd": 443, "statmount": 457,
      "listmount": 458, "unshare": 272, "socket": 41}
CLONE_NEWUSER = 0x10000000
CLONE_NEWNET = 0x40000000


def _err(exc: OSError) -> str:
    return errno.errorcode.get(exc.errno or 0, str(exc))


def _raw(nr: int, *args: int) -> str:
    rc = _libc.syscall(ctypes.c_long(nr), *[ctypes.c_long(a) for a in args])
    if rc < 0:
        return errno.errorcode.get(ctypes.get_errno(), str(ctypes.get_errno()))
    with contextlib.suppress(OSError):
        if rc > 2:
            os.close(rc)  # an fd we got: the test only needs to know it came back
    return f"ok:{rc}"


def _try(fn) -> str:
    try:
        out = fn()
        return "ok" if out is None else f"ok:{out}"
    except OSError as exc:
        return _err(exc)
    except Exception as exc:  # noqa: BLE001
        return f"{type(exc).__name__}: {exc}"[:200]


def _in_child(fn, timeout_s: float = 10.0) -> str:
    """Run ``fn`` (returns a short string) in a forked child; how it ended: its answer, or the signal
    that ended it (SIGSYS is what a seccomp kill looks like)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        try:
            out = str(fn())
        except BaseException as exc:  # noqa: BLE001
            out = f"{type(exc).__name__}: {exc}"
        os.write(w, out.encode()[:500])
        os._exit(0)
    os.close(w)
    deadline = time.monotonic() + timeout_s
    while True:
        got, st = os.waitpid(pid, os.WNOHANG)
        if got:
            break
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            got, st = os.waitpid(pid, 0)
            break
        time.sleep(0.01)
    data = os.read(r, 600).decode(errors="replace")
    os.close(r)
    if os.WIFSIGNALED(st):
        return "killed:" + signal.Signals(os.WTERMSIG(st)).name
    return data or f"exit:{os.WEXITSTATUS(st)}"


def _machine_code(code: bytes):
    """A callable for raw x86_64 bytes (anonymous RWX memory: noexec mounts do not apply)."""
    buf = mmap.mmap(-1, mmap.PAGESIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    buf.write(code)
    addr = ctypes.addressof(ctypes.c_char.from_buffer(buf))
    fn = ctypes.CFUNCTYPE(ctypes.c_long)(addr)
    fn._keep = buf  # type: ignore[attr-defined]
    return fn


def _int80(nr: int, a: int, b: int, c: int) -> bytes:
    """push rbx; mov eax,nr; mov ebx,a; mov ecx,b; mov edx,c; int 0x80; pop rbx; movsxd rax,eax; ret:
    a 32-bit (i386 ABI) syscall from a 64-bit process."""
    le = lambda v: (v & 0xFFFFFFFF).to_bytes(4, "little")  # noqa: E731
    return (b"\x53" + b"\xb8" + le(nr) + b"\xbb" + le(a) + b"\xb9" + le(b) + b"\xba" + le(c)
            + b"\xcd\x80" + b"\x5b" + b"\x48\x63\xc0" + b"\xc3")


def _x32(nr: int, a: int, b: int, c: int) -> bytes:
    """mov rax,nr|0x40000000; mov rdi,a; mov rsi,b; mov rdx,c; syscall; ret (the x32 ABI)."""
    q = lambda v: (v & 0xFFFFFFFFFFFFFFFF).to_bytes(8, "little")  # noqa: E731
    return (b"\x48\xb8" + q(nr | 0x40000000) + b"\x48\xbf" + q(a) + b"\x48\xbe" + q(b) + b"\x48\xba" + q(c)
            + b"\x0f\x05" + b"\xc3")


def _readlinks(d: str) -> dict[str, str]:
    out = {}
    try:
        names = os.listdir(d)
    except OSError as exc:
        return {"*": _err(exc)}
    for n in names:
        try:
            out[n] = os.readlink(f"{d}/{n}")
        except OSError as exc:
            out[n] = _err(exc)
    return out


def _read(path: str, n: int = 4096) -> str:
    try:
        with open(path, "rb") as fh:
            return "read:" + fh.read(n).decode(errors="replace")
    except OSError as exc:
        return _err(exc)


def _write(path: str, data: bytes = b"x") -> str:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    except OSError as exc:
        return _err(exc)
    try:
        os.write(fd, data)
        return "written"
    except OSError as exc:
        return "opened:" + _err(exc)
    finally:
        os.close(fd)


class Breakout(_Small):
    """One constructor, every way out that the first probe (``isolation_archs.Probe``) did not try."""

    def __init__(self, model_file: str = "model.pt") -> None:
        super().__init__()
        ob: dict = {}
        # Inherited descriptors: each should be a pipe or the worker's own /dev/null.
        ob["fds"] = _readlinks("/proc/self/fd")
        fds = {}
        for name in ob["fds"]:
            if not name.isdigit():
                continue
            try:
                st = os.fstat(int(name))
                fds[name] = {"mode": stat.filemode(st.st_mode), "dev": st.st_dev, "ino": st.st_ino}
            except OSError as exc:
                fds[name] = {"err": _err(exc)}
        ob["fd_stat"] = fds
        try:
            st = os.stat("/dev/null")
            ob["devnull"] = {"dev": st.st_dev, "ino": st.st_ino}
        except OSError as exc:
            ob["devnull"] = _err(exc)
        # Through an inherited descriptor to its directory (works only for directory fds).
        ob["fd0_parent"] = _try(lambda: os.listdir("/proc/self/fd/0/.."))
        # Other processes of the namespace (init, root) and our own root/cwd links.
        for what in ("root", "cwd", "environ", "mem", "maps", "fd", "mountinfo", "cmdline", "stack",
                     "syscall", "auxv", "map_files"):
            p = f"/proc/1/{what}"
            ob[f"proc1:{what}"] = _try(lambda p=p: len(os.listdir(p))) if what in ("root", "cwd", "fd", "map_files") \
                else _read(p, 256)
        ob["self_root"] = _try(lambda: sorted(os.listdir("/proc/self/root")))
        ob["self_map_files"] = _try(lambda: len(os.listdir("/proc/self/map_files")))
        ob["mountinfo"] = _read("/proc/self/mountinfo", 65536)
        # Kernel knobs and host views under /proc and /sys.
        for p in ("/proc/sys/kernel/core_pattern", "/proc/sys/kernel/modprobe", "/proc/sysrq-trigger",
                  "/proc/sys/vm/drop_caches", "/proc/self/oom_score_adj", "/proc/1/oom_score_adj",
                  "/proc/self/attr/current", "/proc/self/setgroups", "/proc/self/uid_map"):
            ob[f"write:{p}"] = _write(p, b"0")
        for p in ("/proc/kcore", "/proc/kmsg", "/proc/kallsyms", "/proc/keys", "/proc/1/environ"):
            ob[f"read:{p}"] = _read(p, 64)[:5]
        for p in ("/sys", "/sys/fs", "/sys/fs/cgroup", "/sys/class/net", "/sys/kernel", "/sys/devices",
                  "/dev", "/dev/pts", "/dev/mqueue", "/proc/net"):
            ob[f"list:{p}"] = _try(lambda p=p: sorted(os.listdir(p)))
        ob["cgroup"] = _read("/proc/self/cgroup")
        # The model folder and the root: read-only everywhere.
        model = f"/tmp/model/{model_file}"
        ob["model:write"] = _write(model)
        ob["model:create"] = _write("/tmp/model/new-file")
        ob["model:chmod"] = _try(lambda: os.chmod(model, 0o777))
        ob["model:utime"] = _try(lambda: os.utime(model, (0, 0)))
        ob["model:rename"] = _try(lambda: os.rename(model, "/tmp/model/x"))
        ob["model:link_to_work"] = _try(lambda: os.link(model, "/tmp/work/hardlink"))
        ob["root:create"] = _write("/evil")
        ob["usr:create"] = _write("/usr/evil")
        ob["etc:passwd"] = _write("/etc/passwd")
        ob["dev:create"] = _write("/dev/evil")
        ob["dev:mknod"] = _try(lambda: os.mknod("/tmp/work/null", 0o666 | stat.S_IFCHR, os.makedev(1, 3)))
        # The new mount API and handles (raw: no libc wrapper to refuse first).
        ob["sys:open_tree"] = _raw(NR["open_tree"], -100, ctypes.addressof(ctypes.create_string_buffer(b"/")), 1)
        ob["sys:fsopen"] = _raw(NR["fsopen"], ctypes.addressof(ctypes.create_string_buffer(b"tmpfs")), 0)
        ob["sys:fspick"] = _raw(NR["fspick"], -100, ctypes.addressof(ctypes.create_string_buffer(b"/")), 0)
        ob["sys:move_mount"] = _raw(NR["move_mount"], -1, 0, -100, 0, 0)
        ob["sys:mount_setattr"] = _raw(NR["mount_setattr"], -100, 0, 0, 0, 0)
        ob["sys:fsmount"] = _raw(NR["fsmount"], -1, 0, 0)
        handle = ctypes.create_string_buffer(256)
        ctypes.c_uint.from_buffer(handle).value = 128
        mnt = ctypes.c_int(0)
        ob["sys:name_to_handle_at"] = _raw(NR["name_to_handle_at"], -100,
                                           ctypes.addressof(ctypes.create_string_buffer(b"/tmp/model")),
                                           ctypes.addressof(handle), ctypes.addressof(mnt), 0)
        ob["sys:pidfd_getfd"] = _raw(NR["pidfd_getfd"], 0, 0, 0)
        ob["sys:kcmp"] = _raw(NR["kcmp"], 1, 2, 0, 0, 0)
        ob["sys:clone3"] = _raw(NR["clone3"], 0, 0)
        # Other processes: init is root, and nothing else is in this PID namespace.
        ob["kill:init"] = _try(lambda: os.kill(1, 0))
        ob["kill:init_term"] = _try(lambda: os.kill(1, signal.SIGTERM))
        pidfd = _libc.syscall(ctypes.c_long(NR["pidfd_open"]), ctypes.c_long(1), ctypes.c_long(0))
        ob["pidfd:init"] = "ok" if pidfd >= 0 else errno.errorcode.get(ctypes.get_errno(), "?")
        if pidfd >= 0:
            ob["pidfd:signal_init"] = _raw(NR["pidfd_send_signal"], pidfd, signal.SIGTERM, 0, 0)
            ob["pidfd:madvise_init"] = _raw(NR["process_madvise"], pidfd, 0, 0, 0, 0)
            os.close(pidfd)
        ob["setpgid:init"] = _try(lambda: os.setpgid(1, 0))
        ob["prlimit:init"] = _try(lambda: __import__("resource").prlimit(1, __import__("resource").RLIMIT_NOFILE,
                                                                            (1, 1)))
        ob["pids"] = sorted(int(p) for p in os.listdir("/proc") if p.isdigit())
        # Credentials and privilege: no way back up.
        ob["setuid0"] = _try(lambda: os.setuid(0))
        ob["setgroups"] = _try(lambda: os.setgroups([0]))
        ob["rlimit_raise"] = _try(lambda: __import__("resource").setrlimit(
            __import__("resource").RLIMIT_NOFILE, (4096, 4096)))
        ob["oom_adj_lower"] = _write("/proc/self/oom_score_adj", b"-1000")
        ob["status"] = {k: v for k, _, v in (ln.partition(":\t") for ln in _read("/proc/self/status", 8192)
                                              [5:].splitlines()) if k in ("Uid", "Gid", "CapEff", "CapPrm",
                                                                          "CapBnd", "CapAmb", "NoNewPrivs",
                                                                          "Seccomp", "Groups")}
        # Executables of the host image: run, but under the same walls (nosuid, no_new_privs, filter).
        ob["exec:sh"] = _in_child(lambda: _exec_status(["/bin/sh", "-c", "id -u; exec 3<>/dev/tcp/127.0.0.1/5432"]))
        # Other syscall ABIs: i386 through int 0x80 and x32 (each in a child, a seccomp kill ends it).
        ob["i386:socket"] = _in_child(lambda: _machine_code(_int80(359, 2, 1, 0))())   # socket(AF_INET, STREAM)
        ob["i386:socketcall"] = _in_child(lambda: _machine_code(_int80(102, 1, 0, 0))())
        ob["i386:unshare"] = _in_child(lambda: _machine_code(_int80(310, CLONE_NEWUSER, 0, 0))())
        ob["i386:getpid"] = _in_child(lambda: _machine_code(_int80(20, 0, 0, 0))())
        ob["x32:socket"] = _in_child(lambda: _machine_code(_x32(41, 2, 1, 0))())
        ob["x32:unshare"] = _in_child(lambda: _machine_code(_x32(272, CLONE_NEWUSER, 0, 0))())
        # The syscall instruction itself with the native ABI but a namespace flag in a high bit half.
        ob["unshare:high_bits"] = _raw(NR["unshare"], CLONE_NEWUSER | (1 << 40))
        ob["socket:high_bits"] = _raw(NR["socket"], 2 | (1 << 40), 1, 0)
        # Syscalls no load needs and that a deny-list would let through: newer than it (statmount and
        # listmount in 6.8, open_tree_attr in 6.15, file_getattr in 6.17) or old, rare kernel surface.
        scratch = ctypes.create_string_buffer(4096)
        buf = ctypes.addressof(scratch)
        for name, nr, args in (("statmount", 457, (buf, buf, 4096, 0)), ("listmount", 458, (buf, buf, 16, 0)),
                               ("open_tree_attr", 467, (-100, buf, 0, 0, 0)), ("file_getattr", 468, (-100, buf, buf, 0, 0)),
                               ("modify_ldt", 154, (0, buf, 16)), ("io_setup", 206, (1, buf)),
                               ("mq_open", 240, (buf, 0, 0, 0)), ("migrate_pages", 256, (0, 8, buf, buf)),
                               ("memfd_secret", 447, (0,)), ("process_madvise", 440, (-1, 0, 0, 0, 0))):
            ctypes.memset(buf, 0, 4096)
            ob[f"unlisted:{name}"] = _raw(nr, *args)
        # A second seccomp filter of our own cannot lift the first (and adding one is allowed).
        ob["seccomp_mode"] = _read("/proc/self/status", 8192).count("Seccomp:\t2")
        # A socketpair (allowed: no address) turned towards a host path or an abstract name.
        ob["socketpair:sendto"] = _try(_socketpair_sendto)
        self.observed = ob


def _exec_status(argv: list[str]) -> str:
    import subprocess

    p = subprocess.run(argv, capture_output=True, timeout=5)
    return f"rc={p.returncode} out={p.stdout.decode(errors='replace').strip()} err={p.stderr[-120:]!r}"


def _socketpair_sendto() -> str:
    import socket

    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    out = []
    for addr in ("/var/run/postgresql/.s.PGSQL.5432", "\0ckpt-stage-redteam", "/dev/log"):
        try:
            a.sendto(b"x", addr)
            out.append(f"{addr!r}:sent")
        except OSError as exc:
            out.append(f"{addr!r}:{_err(exc)}")
    a.close()
    b.close()
    return ";".join(out)


class NprocHog(_Small):
    """Takes the shared ``nobody`` task budget (RLIMIT_NPROC counts every task, threads too, of the
    real uid, system wide): starts sleeping threads until the kernel says EAGAIN, holds them for
    ``seconds``, then reports how many it got."""

    def __init__(self, seconds: float = 20.0) -> None:
        super().__init__()
        import threading

        threading.stack_size(64 * 1024)
        stop = threading.Event()
        threads: list[threading.Thread] = []
        why = None
        while len(threads) < 5000:
            t = threading.Thread(target=stop.wait, daemon=True)
            try:
                t.start()
            except RuntimeError as exc:  # "can't start new thread": EAGAIN from clone()
                why = str(exc)
                break
            threads.append(t)
        time.sleep(seconds)
        stop.set()
        for t in threads:  # gone before the loader's own torch op needs threads of its own budget
            t.join()
        self.observed = {"threads": len(threads), "stopped_by": why}


class Lingerer(_Small):
    """Leaves processes behind: a double-forked, setsid'd grandchild that renames itself, ignores
    SIGTERM/SIGHUP, keeps the result and stderr pipes open, and waits; then the job reports normally."""

    def __init__(self, name: str = "ckpt-linger") -> None:
        super().__init__()
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.setsid()
            if os.fork() == 0:
                for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
                    signal.signal(sig, signal.SIG_IGN)
                _libc.prctl(15, name.encode()[:15], 0, 0, 0)  # PR_SET_NAME
                os.write(w, b"up")
                os.close(w)
                time.sleep(600)
                os._exit(0)
            os._exit(0)
        os.close(w)
        os.waitpid(pid, 0)
        self.observed = {"grandchild": os.read(r, 8).decode()}
        os.close(r)


class ShmDropper(_Small):
    """Leaves a file in every writable place it has (/dev/shm, its work dir), or looks for another
    job's: the two jobs run at the same time."""

    def __init__(self, mode: str = "drop", tag: str = "ckpt-redteam", seconds: float = 3.0) -> None:
        super().__init__()
        places = ["/dev/shm", "/tmp/work", "/tmp"]
        ob: dict = {}
        if mode == "drop":
            for d in places:
                ob[d] = _write(os.path.join(d, tag), b"left by the other job")
            time.sleep(seconds)
        else:
            time.sleep(0.5)
            for d in places:
                ob[d] = sorted(os.listdir(d)) if os.path.isdir(d) else "absent"
            ob["pids"] = sorted(int(p) for p in os.listdir("/proc") if p.isdigit())
        self.observed = ob


# --- entries that attack the result channel (test-only loader entries) ---------------------------


def _pass_json() -> bytes:
    return json.dumps({"findings": [], "runtime": {"python": "3.11", "torch": "2.13.0"},
                       "info": {"forged": True}}).encode()


def early_result_then_hang(job):
    """A valid pass on the result pipe, closed, then the worker keeps running past its deadline."""
    os.write(3, _pass_json())
    os.close(3)
    time.sleep(3600)


def result_then_crash(job):
    """A valid pass on the result pipe, then a segfault."""
    os.write(3, _pass_json())
    os.close(3)
    ctypes.string_at(0)


def result_then_selfkill(job):
    """A valid pass, then SIGKILL to itself: "killed from outside" would make a model an
    infrastructure error (retried forever, never quarantined)."""
    os.write(3, _pass_json())
    os.kill(os.getpid(), signal.SIGKILL)


def selfterm(job):
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(5)


def selfkill_group(job):
    os.kill(0, signal.SIGKILL)
    time.sleep(5)


def grandchild_holds_pipes(job):
    """Exits cleanly with a pass while a grandchild keeps the result/stderr pipes open and writes a
    second, different answer after a while."""
    if os.fork() == 0:
        os.setsid()
        time.sleep(0.5)
        with contextlib.suppress(OSError):
            os.write(3, b'{"findings": [], "info": {"late": true}}')
        time.sleep(600)
        os._exit(0)
    from tests.corpus.isolation_archs import stand_in_load

    return stand_in_load(job)


def stop_self_forever(job):
    """SIGSTOP after arming: init must not wait forever for a stopped loader (the deadline holds)."""
    while True:
        os.kill(os.getpid(), signal.SIGSTOP)


def huge_result(job):
    """A result just under the size cap made of millions of tiny containers: cheap to write, costly
    to parse (every ``{}`` becomes a Python dict in the parent)."""
    body = b'{"info": {"x": [' + b"{}," * (10 * 2**20) + b'{}]}}'
    view = memoryview(body)
    while view:
        view = view[os.write(3, view):]
    os._exit(0)


def huge_number_result(job):
    body = b'{"peak_anon_bytes": ' + b"9" * (8 * 2**20) + b"}"
    view = memoryview(body)
    while view:
        view = view[os.write(3, view):]
    os._exit(0)


def overflow_result(job):
    """Writes far more than the result cap, never stopping until the parent gives up."""
    chunk = b" " * 2**20
    for _ in range(200):
        os.write(3, chunk)
    os._exit(0)


def stderr_flood_no_newline(job):
    """Hundreds of MB of stderr without a newline, while the parent must stay within its tail."""
    chunk = b"A" * 2**20
    for _ in range(300):
        os.write(2, chunk)
    os._exit(0)


def peek_paths(job):
    """Test-only loader entry: which of ``job.arch_kwargs["paths"]`` exist in the worker (whatever
    ``job.arch`` names: it is never imported here)."""
    from ckpt_stage.sandbox.job import LoadResult

    return LoadResult(info={"observed": {p: os.path.exists(p) for p in job.arch_kwargs.get("paths", [])}})


# --- architectures that forge the worker's answer -----------------------------------------------


class ForgedPass(_Small):
    """Owns the worker once built: writes a well-formed pass of its own to the result pipe and exits
    cleanly before the loader reads or checks a tensor. ``mode`` says how it dodges the parent's
    cross-check of the tensors it claims to have loaded against the scan:

    * ``no_layers``: leaves the layer table out;
    * ``other_kind``: calls the file something that is not a state_dict (``torch-export``);
    * ``wrong_shape``: reports the scan's names with another shape (a lazy forgery).
    """

    def __init__(self, mode: str = "no_layers") -> None:
        super().__init__()
        info: dict = {}
        if mode == "other_kind":
            info = {"model_kind": "torch-export", "layers": {}}
        elif mode == "wrong_shape":
            info = {"model_kind": "state_dict",
                    "layers": {"fc.weight": {"shape": [9, 9], "dtype": "float32"},
                               "fc.bias": {"shape": [2], "dtype": "float32"}}}
        os.write(3, json.dumps({"findings": [], "runtime": {"python": "3.11", "torch": "2.13.0"},
                                "info": info}).encode())
        os.close(3)
        os._exit(0)
