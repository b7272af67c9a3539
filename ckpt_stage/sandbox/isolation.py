"""Isolation primitives of the worker: environment scrubbing, namespaces, mounts, the private root
(pivot_root), the seccomp filter, privileges, rlimits, memory cgroups and /proc sampling.

Everything here is small and does one thing; ``child.py`` strings the child-side pieces together
and ``runner.py`` the parent-side ones. Every measure is best effort at the call site: a platform
that cannot apply one (not root, no namespaces, no writable cgroup) degrades, and the caller
records which measures were in force (``LoadResult.isolation``).

Linux only. Python 3.11 has no ``os.unshare``/``os.mount`` (``os.unshare`` arrived in 3.12), so
the syscalls go through ``ctypes``.
"""

from __future__ import annotations

import ctypes
import errno
import os
import re
import resource
import signal
import stat
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

# --- environment --------------------------------------------------------------------------------

# Allowlist first: an unknown variable is dropped, because a denylist can never know every way a
# deployment spells a secret (Airflow alone has AIRFLOW_CONN_*, AIRFLOW__DATABASE__SQL_ALCHEMY_CONN,
# ...). What the worker needs: how to find Python and its libraries, locale, thread counts and torch
# knobs. Not the stage's own CKPT_STAGE_* settings: the LoadJob carries everything the worker uses, and
# those settings hold URLs (CKPT_STAGE_AIRFLOW_URL, webhook receivers) that may carry tokens.
_ENV_KEEP_NAMES = frozenset(
    {"PATH", "LANG", "LANGUAGE", "TZ", "TERM", "LD_LIBRARY_PATH", "VIRTUAL_ENV", "CONDA_PREFIX",
     "CUDA_VISIBLE_DEVICES", "SOURCE_DATE_EPOCH",
     "PYTHONPATH", "PYTHONDONTWRITEBYTECODE", "PYTHONNOUSERSITE", "PYTHONSAFEPATH", "PYTHONUNBUFFERED",
     "PYTHONHASHSEED", "PYTHONIOENCODING", "PYTHONUTF8", "PYTHONFAULTHANDLER", "PYTHONWARNINGS",
     "PYTHONMALLOC",
     # set by the runner: transformers in the worker stays offline (load/hf.py)
     "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_DISABLE_TELEMETRY", "HF_HUB_DISABLE_PROGRESS_BARS",
     "TRANSFORMERS_VERBOSITY"}
)
_ENV_KEEP_PREFIXES = ("LC_", "OMP_", "MKL_", "OPENBLAS_", "KMP_", "GOMP_", "NUMEXPR_", "TORCH_", "PYTORCH_")
# Then the denylist, which wins over the allowlist. TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1 silently turns
# weights_only off for every torch.load that does not pass it (torch >= 2.6), so it must never reach
# the worker.
_ENV_DROP_NAMES = frozenset({"TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"})
_ENV_DROP_PREFIXES = ("AWS_", "MLFLOW_", "AZURE_", "GOOGLE_", "AIRFLOW", "GCS_", "S3_")
# A name that says secret (*_TOKEN, *_SECRET, *_PASSWORD, *_KEY, ...), whatever its prefix.
_SECRET_RE = re.compile(r"(TOKEN|SECRET|PASSWORD|PASSWD|CREDENTIAL|_KEY$|_KEY_ID$|APIKEY|AUTH|COOKIE|SESSION)",
                        re.IGNORECASE)
# A value that carries URL userinfo (user:password@ or a bare token@: database URLs, git remotes).
_URL_USERINFO_RE = re.compile(r"://[^/?#\s]*@")
# A query (or fragment) parameter whose name can carry a credential: ?token=, &sig= (Azure SAS),
# X-Amz-Signature/X-Amz-Credential (S3 presigned URLs), X-Goog-*, access_token, api_key, code (OAuth).
_URL_PARAM_RE = re.compile(r"[?&#;]([A-Za-z0-9_.\-]+)=")
_CREDENTIAL_PARAMS = frozenset(
    {"token", "sig", "signature", "key", "apikey", "password", "passwd", "pwd", "pass", "secret", "code",
     "auth", "authorization", "credential", "credentials", "session", "sessionid", "jwt", "ticket",
     "otp", "sas", "se", "sp", "sv", "hmac", "private_token", "client_secret", "access_token",
     "refresh_token", "id_token", "api_key", "auth_token"})
_CREDENTIAL_PARAM_PREFIXES = ("x-amz-", "x-goog-", "x-ms-", "x-oss-")
_CREDENTIAL_PARAM_SUFFIXES = ("token", "secret", "password", "_key", "-key", "signature", "_sig")


def carries_credential(value: str) -> bool:
    """Whether an environment value may hold a credential: URL userinfo, or a URL parameter named like
    one (matched as a name, so ``?page=2`` or ``?zipcode=`` do not count)."""
    if _URL_USERINFO_RE.search(value):
        return True
    for m in _URL_PARAM_RE.finditer(value):
        name = m.group(1).lower()
        if (name in _CREDENTIAL_PARAMS or name.startswith(_CREDENTIAL_PARAM_PREFIXES)
                or name.endswith(_CREDENTIAL_PARAM_SUFFIXES)):
            return True
    return False


def scrub_env(env: Mapping[str, str]) -> dict[str, str]:
    """The environment a worker may see: allowlisted names, minus secret-looking names and values."""
    out: dict[str, str] = {}
    for key, value in env.items():
        up = key.upper()
        if not (up in _ENV_KEEP_NAMES or up.startswith(_ENV_KEEP_PREFIXES)):
            continue
        if up in _ENV_DROP_NAMES or up.startswith(_ENV_DROP_PREFIXES):
            continue
        if _SECRET_RE.search(up) or carries_credential(value):
            continue
        out[key] = value
    return out


def env_is_clean(env: Mapping[str, str]) -> bool:
    return scrub_env(env) == dict(env)


# --- syscalls through ctypes ---------------------------------------------------------------------

CLONE_NEWNS = 0x00020000
CLONE_NEWCGROUP = 0x02000000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000

MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_REMOUNT = 0x20
MS_BIND = 0x1000
MS_REC = 0x4000
MS_PRIVATE = 0x40000

PR_SET_PDEATHSIG = 1
PR_SET_DUMPABLE = 4
PR_SET_NO_NEW_PRIVS = 38

_libc: ctypes.CDLL | None = None


def _lib() -> ctypes.CDLL:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    return _libc


def _check(rc: int, what: str) -> None:
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def unshare(flags: int) -> None:
    _check(_lib().unshare(ctypes.c_int(flags)), f"unshare({flags:#x})")


def _enc(s: str | None) -> bytes | None:
    return s.encode() if s is not None else None


def mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    _check(_lib().mount(_enc(source), _enc(target), _enc(fstype), ctypes.c_ulong(flags), _enc(data)),
           f"mount {source} on {target}")


def prctl(option: int, arg: int) -> None:
    _check(_lib().prctl(ctypes.c_int(option), ctypes.c_ulong(arg), ctypes.c_ulong(0), ctypes.c_ulong(0),
                        ctypes.c_ulong(0)), f"prctl({option})")


def set_parent_death_signal(sig: int = signal.SIGKILL) -> None:
    # Note PR_SET_PDEATHSIG fires when the parent *thread* exits; only use it under a
    # single-threaded parent (the fork server, and our own forks below it).
    prctl(PR_SET_PDEATHSIG, sig)


def unshare_best_effort(wanted: Iterable[int]) -> dict[int, bool]:
    """Enter as many of the wanted namespaces as the platform allows: all at once (one syscall),
    else one by one, recording which worked."""
    wanted = list(wanted)
    flags = 0
    for f in wanted:
        flags |= f
    try:
        unshare(flags)
        return {f: True for f in wanted}
    except OSError:
        pass
    out = {}
    for f in wanted:
        try:
            unshare(f)
            out[f] = True
        except OSError:
            out[f] = False
    return out


# --- mounts --------------------------------------------------------------------------------------


def traversable_by_others(path: str) -> bool:
    try:
        return bool(os.stat(path).st_mode & stat.S_IXOTH)
    except OSError:
        return False


def plan_masks(needed: Iterable[str]) -> dict[str, list[str]]:
    """Directories an unprivileged worker needs (the interpreter's prefix, sys.path) that sit below
    a directory it cannot traverse (``/root`` is 0700 on this machine and pyenv lives in it).

    Returns ``{blocked ancestor: [needed dirs below it]}``: the child masks each blocked ancestor with
    an empty tmpfs (mode 0755) and binds back only the needed dirs, so the worker can import the
    standard library but still sees nothing else of, say, ``/root`` (no ``~/.aws``, no ``~/.netrc``).
    """
    dirs = sorted({os.path.realpath(p) for p in needed if p and os.path.isdir(p)})
    # Keep outermost only: binding /a binds /a/b too.
    outer: list[str] = []
    for d in dirs:
        if not any(d == o or d.startswith(o.rstrip("/") + "/") for o in outer):
            outer.append(d)
    plan: dict[str, list[str]] = {}
    for d in outer:
        parts = Path(d).parts
        for i in range(1, len(parts)):  # ancestors, not d itself
            anc = str(Path(*parts[:i]))
            if anc != "/" and not traversable_by_others(anc):
                plan.setdefault(anc, []).append(d)
                break
    # A blocked ancestor below another blocked ancestor is covered by the outer mask.
    for anc in sorted(plan, key=len, reverse=True):
        for other in plan:
            if other != anc and anc.startswith(other.rstrip("/") + "/"):
                plan[other].extend(plan.pop(anc))
                break
    return plan


def apply_masks(plan: Mapping[str, list[str]]) -> list[str]:
    """In a private mount namespace: tmpfs over each blocked ancestor, needed dirs bound back
    read-only. Returns the masked ancestors."""
    done = []
    for anc, keep in plan.items():
        fds = [(d, os.open(d, os.O_PATH | os.O_DIRECTORY)) for d in keep]
        try:
            mount("tmpfs", anc, "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755,size=1m")
            for d, fd in fds:
                os.makedirs(d, mode=0o755, exist_ok=True)
                bind_readonly(f"/proc/self/fd/{fd}", d, recursive=True)
        finally:
            for _, fd in fds:
                os.close(fd)
        done.append(anc)
    return done


def bind_readonly(source: str, target: str, *, recursive: bool = False, noexec: bool = False) -> None:
    rec = MS_REC if recursive else 0
    mount(source, target, None, MS_BIND | rec)
    # A bind mount takes the flags of its first mount; read-only needs a second, remount, call.
    extra = MS_NOEXEC if noexec else 0
    mount(None, target, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV | extra)


# --- private root --------------------------------------------------------------------------------

MNT_DETACH = 2
_SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41, "riscv64": 41, "ppc64le": 203, "s390x": 217}

SYSTEM_DIRS = ("/usr", "/lib", "/lib64", "/lib32", "/libx32", "/bin", "/sbin")
"""Host directories the interpreter and its native libraries live in, bound read-only into the
worker's root (a top-level symlink, as on merged-/usr systems, is recreated as the same symlink)."""
ETC_FILES = ("ld.so.cache", "localtime")
"""The only host files of /etc the worker sees: the dynamic loader's cache (torch's extension
libraries are found through it) and the time zone. passwd, group and nsswitch.conf are written
fresh (root and nobody only): getpwuid works, the host's account list stays out."""
DEV_NODES = ("null", "zero", "full", "random", "urandom")
SYS_DIRS = ("/sys/devices/system/cpu",)
"""torch's cpuinfo and OpenMP read the CPU topology here; nothing else of /sys (no /sys/fs/cgroup)."""
NEVER_BIND = frozenset({"/", "/tmp", "/var", "/var/tmp", "/dev", "/dev/shm", "/proc", "/sys", "/run",
                        "/var/run", "/etc", "/home", "/root", "/srv", "/opt", "/mnt", "/media"})
"""Shared host directories that a sys.path entry may name but the worker never gets whole; what lives
below them (a venv in /opt/venv, pyenv in /root/.pyenv) is bound on its own."""
def _etc_synth(uid: int, gid: int) -> dict[str, str]:
    # The unprivileged account is called nobody whatever its number (each job has a uid of its own).
    return {
        "passwd": f"root:x:0:0:root:/root:/usr/sbin/nologin\nnobody:x:{uid}:{gid}:nobody:/tmp/work:/usr/sbin/nologin\n",
        "group": f"root:x:0:\nnogroup:x:{gid}:\n",
        "nsswitch.conf": "passwd: files\ngroup: files\nhosts: files\n",
        "hosts": "127.0.0.1 localhost\n",
    }


def _below_any(path: str, bases: Iterable[str]) -> bool:
    return any(path == b or path.startswith(b.rstrip("/") + "/") for b in bases)


def package_entries(directory: str, packages: Iterable[str]) -> list[str]:
    """What of ``directory`` (a sys.path entry) the import system needs to import each top-level name
    of ``packages``: the package dir, the module file, an extension module (``name.*.so``)."""
    out: list[str] = []
    try:
        names = os.listdir(directory)
    except OSError:
        return out
    for top in packages:
        for n in names:
            if n == top or n == top + ".py" or (n.startswith(top + ".") and n.endswith(".so")):
                p = os.path.join(directory, n)
                if not os.path.islink(p) and (os.path.isdir(p) or os.path.isfile(p)):
                    out.append(p)
    return sorted(set(out))


def umount2(target: str, flags: int) -> None:
    _check(_lib().umount2(_enc(target), ctypes.c_int(flags)), f"umount {target}")


def pivot_root(new_root: str, put_old: str) -> None:
    # glibc has no wrapper (and Python 3.11 no os.pivot_root): the raw syscall.
    import platform

    nr = _SYS_PIVOT_ROOT.get(platform.machine())
    if nr is None:
        raise OSError(errno.ENOSYS, f"pivot_root: unknown syscall number on {platform.machine()}")
    lib = _lib()
    lib.syscall.restype = ctypes.c_long
    _check(int(lib.syscall(ctypes.c_long(nr), _enc(new_root), _enc(put_old))), "pivot_root")


def _bind_into(new_root: str, source: str, target: str | None = None, *, noexec: bool = False,
               dev: bool = False) -> None:
    dest = new_root + (target or source)
    if os.path.isdir(source):
        os.makedirs(dest, mode=0o755, exist_ok=True)
    else:
        os.makedirs(os.path.dirname(dest), mode=0o755, exist_ok=True)
        with open(dest, "a"):
            pass
    mount(source, dest, None, MS_BIND | MS_REC)
    flags = MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | (0 if dev else MS_NODEV) | (MS_NOEXEC if noexec or dev else 0)
    mount(None, dest, None, flags)


def build_private_root(new_root: str, needed: Iterable[str], *, model_fd: int, model: str, work: str,
                       work_opts: str, shm_bytes: int, ids: tuple[int, int] = (65534, 65534),
                       whole: Iterable[str] = (), packages: Iterable[str] | None = None) -> None:
    """Assemble the worker's whole filesystem on a tmpfs at ``new_root`` (in a private mount
    namespace, as root): system dirs, ``needed`` (interpreter prefixes, sys.path) and the model
    read-only, a private tmpfs at ``work``, a minimal /dev, a fresh /proc (the caller's PID namespace),
    a few /etc files. Nothing else of the host is reachable once ``enter_root`` pivots into it:
    no /run or /var/run (database Unix sockets), /tmp, /home, /etc, /srv, /opt.

    ``needed`` dirs below one of ``whole`` (the interpreter's prefixes: stdlib, site-packages) are
    bound whole; any other is bound only for the top-level ``packages`` it holds (when given)."""
    packages = None if packages is None else sorted(set(packages))
    mount("tmpfs", new_root, "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755,size=4m")
    bound: list[str] = []
    links: list[tuple[str, str]] = []
    for d in SYSTEM_DIRS:
        if os.path.islink(d):
            links.append((d, os.readlink(d)))
        elif os.path.isdir(d):
            _bind_into(new_root, d)
            bound.append(d)
    whole_dirs = [os.path.realpath(p) for p in whole]
    for d in sorted({os.path.realpath(p) for p in needed}):
        if d in NEVER_BIND and packages is None:
            continue  # a script's dir on sys.path may be /tmp itself: never hand that over whole
        if not os.path.isdir(d) or any(d == b or d.startswith(b.rstrip("/") + "/") for b in bound):
            continue
        if packages is None or _below_any(d, whole_dirs):
            _bind_into(new_root, d)
            bound.append(d)
            continue
        # Any other sys.path entry (a source checkout, an Airflow dags or plugins folder, a script's
        # dir, a home directory) is bound package by package: only the top-level packages the worker
        # imports, never the folder's other files (configs, .env, .git, DAG files with connections).
        os.makedirs(new_root + d, mode=0o755, exist_ok=True)
        for entry in package_entries(d, packages):
            _bind_into(new_root, entry)
    for d in SYS_DIRS:
        if os.path.isdir(d):
            _bind_into(new_root, d)
    # Symlinks last: a relative target resolves inside the new root; an absolute one is only
    # followed after the pivot, also inside it.
    for d, target in links:
        if not os.path.lexists(new_root + d):
            os.symlink(target, new_root + d)
    etc = new_root + "/etc"
    os.makedirs(etc, mode=0o755, exist_ok=True)
    for name in ETC_FILES:
        src = "/etc/" + name
        if os.path.islink(src):
            os.symlink(os.readlink(src), f"{etc}/{name}")
        elif os.path.isfile(src):
            _bind_into(new_root, src)
    for name, text in _etc_synth(*ids).items():
        with open(f"{etc}/{name}", "w") as fh:
            fh.write(text)
        os.chmod(f"{etc}/{name}", 0o644)
    dev = new_root + "/dev"
    os.makedirs(dev, mode=0o755)
    mount("tmpfs", dev, "tmpfs", MS_NOSUID | MS_NOEXEC, "mode=0755,size=64k")
    for name in DEV_NODES:
        if os.path.exists("/dev/" + name):
            _bind_into(new_root, "/dev/" + name, dev=True)
    for name, target in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"),
                         ("stdout", "/proc/self/fd/1"), ("stderr", "/proc/self/fd/2")):
        os.symlink(target, f"{dev}/{name}")
    os.makedirs(dev + "/shm")
    mount("tmpfs", dev + "/shm", "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, f"mode=1777,size={shm_bytes}")
    mount(None, dev, None, MS_REMOUNT | MS_NOSUID | MS_NOEXEC | MS_RDONLY, "mode=0755,size=64k")
    os.makedirs(new_root + "/proc", mode=0o555)
    mount("proc", new_root + "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    os.makedirs(new_root + os.path.dirname(model), mode=0o755, exist_ok=True)
    _bind_into(new_root, f"/proc/self/fd/{model_fd}", model, noexec=True)
    os.makedirs(new_root + work, mode=0o700)
    mount("tmpfs", new_root + work, "tmpfs", MS_NOSUID | MS_NODEV, work_opts)


def enter_root(new_root: str) -> None:
    """pivot_root into ``new_root`` and detach the old root, so no path leads back to the host
    (a chroot alone would leave the old root reachable through a second chroot or an fd)."""
    os.chdir(new_root)
    # pivot_root(".", "."): the old root is stacked on top of the new one, then detached (no
    # put_old directory is needed, as in runc).
    pivot_root(".", ".")
    umount2(".", MNT_DETACH)
    os.chdir("/")
    # The root tmpfs (mount points, the synthetic /etc files) read-only: the worker writes only to
    # its work dir and /dev/shm.
    mount(None, "/", None, MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV, "mode=0755,size=4m")


# --- seccomp -------------------------------------------------------------------------------------

SECCOMP_DENY = (
    # network: no socket of any family (the loader needs none; socketpair stays, it has no address)
    "socket",
    # io_uring can open sockets and files without the syscalls filtered here
    "io_uring_setup", "io_uring_enter", "io_uring_register",
    # namespaces and mounts: a user namespace hands fake root and a large kernel surface to the model
    "unshare", "setns", "mount", "umount2", "pivot_root", "chroot", "fsopen", "fsconfig", "fsmount",
    "fspick", "move_mount", "open_tree", "mount_setattr",
    # other processes' memory and files
    "ptrace", "process_vm_readv", "process_vm_writev", "pidfd_getfd", "kcmp",
    # kernel interfaces with a history of privilege-escalation bugs
    "bpf", "perf_event_open", "userfaultfd", "keyctl", "add_key", "request_key",
    "kexec_load", "kexec_file_load", "init_module", "finit_module", "delete_module",
    "open_by_handle_at", "name_to_handle_at", "fanotify_init", "lookup_dcookie",
    # host administration
    "mknod", "mknodat", "swapon", "swapoff", "reboot", "syslog", "acct", "quotactl", "quotactl_fd",
    "settimeofday", "clock_settime", "clock_adjtime", "adjtimex", "iopl", "ioperm", "vhangup",
    "sethostname", "setdomainname", "nfsservctl", "uselib",
)
SECCOMP_ALLOW = (
    # files and descriptors (x86_64 and aarch64 names; a name the architecture lacks is skipped)
    "read", "write", "readv", "writev", "pread64", "pwrite64", "preadv", "pwritev", "preadv2", "pwritev2",
    "open", "openat", "openat2", "creat", "close", "close_range", "lseek", "stat", "fstat", "lstat",
    "newfstatat", "statx", "statfs", "fstatfs", "access", "faccessat", "faccessat2", "readlink", "readlinkat",
    "getdents", "getdents64", "dup", "dup2", "dup3", "fcntl", "flock", "fsync", "fdatasync", "sync",
    "syncfs", "sync_file_range", "ftruncate", "truncate", "fallocate", "fadvise64", "readahead", "mkdir",
    "mkdirat", "rmdir", "unlink", "unlinkat", "rename", "renameat", "renameat2", "link", "linkat",
    "symlink", "symlinkat", "chmod", "fchmod", "fchmodat", "fchmodat2", "chown", "fchown", "lchown",
    "fchownat", "umask", "utime", "utimes", "utimensat", "futimesat", "getcwd", "chdir", "fchdir",
    "copy_file_range", "sendfile", "splice", "tee", "pipe", "pipe2", "getxattr", "lgetxattr", "fgetxattr",
    "listxattr", "llistxattr", "flistxattr", "setxattr", "lsetxattr", "fsetxattr", "removexattr",
    "lremovexattr", "fremovexattr", "ioctl", "poll", "ppoll", "select", "pselect6", "epoll_create",
    "epoll_create1", "epoll_ctl", "epoll_wait", "epoll_pwait", "epoll_pwait2", "eventfd", "eventfd2",
    "inotify_init", "inotify_init1", "inotify_add_watch", "inotify_rm_watch", "signalfd", "signalfd4",
    "timerfd_create", "timerfd_settime", "timerfd_gettime", "memfd_create",
    # memory
    "mmap", "munmap", "mprotect", "mremap", "madvise", "brk", "msync", "mincore", "mlock", "mlock2",
    "munlock", "mlockall", "munlockall", "get_mempolicy", "set_mempolicy", "mbind", "membarrier",
    "pkey_alloc", "pkey_free", "pkey_mprotect", "remap_file_pages", "mseal", "map_shadow_stack",
    # processes, threads, signals, time (clone and personality: argument rules below)
    "fork", "vfork", "execve", "execveat", "exit", "exit_group", "wait4", "waitid", "kill", "tkill",
    "tgkill", "getpid", "getppid", "gettid", "getpgid", "setpgid", "getpgrp", "getsid", "setsid",
    "getuid", "geteuid", "getgid", "getegid", "getresuid", "getresgid", "getgroups", "setuid", "setgid",
    "setreuid", "setregid", "setresuid", "setresgid", "setgroups", "setfsuid", "setfsgid", "capget",
    "capset", "prctl", "arch_prctl", "set_tid_address", "set_robust_list", "get_robust_list", "rseq",
    "futex", "futex_waitv", "sched_yield", "sched_getaffinity", "sched_setaffinity", "sched_getparam",
    "sched_setparam", "sched_getscheduler", "sched_setscheduler", "sched_get_priority_max",
    "sched_get_priority_min", "sched_rr_get_interval", "sched_getattr", "sched_setattr", "getpriority",
    "setpriority", "ioprio_get", "ioprio_set", "getrlimit", "setrlimit", "prlimit64", "getrusage", "times",
    "sysinfo", "uname", "getcpu", "seccomp", "landlock_create_ruleset", "landlock_add_rule",
    "landlock_restrict_self", "pidfd_open", "pidfd_send_signal", "restart_syscall", "pause", "nanosleep",
    "clock_nanosleep", "clock_gettime", "clock_getres", "gettimeofday", "time", "alarm", "getitimer",
    "setitimer", "timer_create", "timer_settime", "timer_gettime", "timer_getoverrun", "timer_delete",
    "rt_sigaction", "rt_sigprocmask", "rt_sigreturn", "rt_sigsuspend", "rt_sigpending", "rt_sigtimedwait",
    "rt_sigqueueinfo", "rt_tgsigqueueinfo", "sigaltstack", "getrandom", "uretprobe",
    # a socketpair's ends (socket() itself is refused) and System V IPC (the job's own IPC namespace)
    "socketpair", "sendmsg", "recvmsg", "sendto", "recvfrom", "sendmmsg", "recvmmsg", "shutdown",
    "getsockopt", "setsockopt", "getsockname", "getpeername", "shmget", "shmat", "shmdt", "shmctl",
    "semget", "semop", "semctl", "semtimedop", "msgget", "msgsnd", "msgrcv", "msgctl",
)
"""What the worker may call (seccomp's default is to refuse): what CPython, torch, numpy, safetensors,
transformers and MLflow's readers use to load a file, plus ordinary process, thread, memory and time
calls. Not here, hence refused with ENOSYS: everything the kernel adds later (a deny-list lets each new
syscall through: ``listmount``/``statmount`` in 6.8, ``open_tree_attr`` in 6.15 on this 6.18 kernel),
and old or rare interfaces no load needs (``modify_ldt``, AIO's ``io_setup``, ``mq_open``,
``move_pages``/``migrate_pages``, ``process_madvise``, ``memfd_secret``, ``bind``/``listen``/``connect``
on inherited sockets). ENOSYS rather than EPERM for those: library code takes it for an old kernel and
falls back (glibc's ``clone3`` → ``clone``, ``statx`` → ``fstatat``)."""
_CLONE_NS_FLAGS = (0x00020000, 0x02000000, 0x04000000, 0x08000000, 0x10000000, 0x20000000, 0x40000000)
"""CLONE_NEWNS, NEWCGROUP, NEWUTS, NEWIPC, NEWUSER, NEWPID, NEWNET: clone() with any is refused."""
_PERSONALITY_LINUX = 0
"""personality(PER_LINUX) is all the worker may ask for: READ_IMPLIES_EXEC, ADDR_NO_RANDOMIZE and the
other personas weaken the process's memory protections. seccomp compares one argument once per rule,
so "anything but 0 or the 0xffffffff query" cannot be written: the query is refused too."""


def install_seccomp() -> list[str]:
    """Load the worker's syscall filter: an allowlist (``SECCOMP_ALLOW``; anything else fails with
    ENOSYS), with the dangerous calls refused by name with EPERM (``SECCOMP_DENY``, the clear answer
    the tests and a reader expect). Needs no_new_privs (or CAP_SYS_ADMIN). Returns the refused
    syscalls this kernel/libseccomp knows.

    clone3 passes its flags in a struct seccomp cannot read: it fails with ENOSYS, so glibc
    (>= 2.34) falls back to clone(), whose flags are filtered. A filter for another ABI (i386 via
    int 0x80, x32) is not added: libseccomp kills a call from an ABI the filter does not cover.
    """
    import pyseccomp as sc

    f = sc.SyscallFilter(sc.ERRNO(errno.ENOSYS))
    f.set_attr(sc.Attr.CTL_TSYNC, 1)
    eperm = sc.ERRNO(errno.EPERM)
    denied: list[str] = []

    def rule(action: int, name: str, *args: object) -> bool:
        nr = sc.resolve_syscall(sc.Arch.NATIVE, name)
        if nr < 0:
            return False  # not a syscall on this architecture (iopl on aarch64, ...)
        f.add_rule(action, nr, *args)
        return True

    for name in SECCOMP_ALLOW:
        rule(sc.ALLOW, name)
    for name in SECCOMP_DENY:
        if rule(eperm, name):
            denied.append(name)
    if sc.resolve_syscall(sc.Arch.NATIVE, "clone3") >= 0:  # not allowed: the default's ENOSYS
        denied.append("clone3")
    ns_mask = 0
    for bit in _CLONE_NS_FLAGS:
        ns_mask |= bit
    clone_rules = [rule(eperm, "clone", sc.Arg(0, sc.MASKED_EQ, bit, bit)) for bit in _CLONE_NS_FLAGS]
    rule(sc.ALLOW, "clone", sc.Arg(0, sc.MASKED_EQ, ns_mask, 0))
    if all(clone_rules):
        denied.append("clone(CLONE_NEW*)")
    if rule(eperm, "personality", sc.Arg(0, sc.GT, _PERSONALITY_LINUX)):
        rule(sc.ALLOW, "personality", sc.Arg(0, sc.EQ, _PERSONALITY_LINUX))
        denied.append("personality(!=PER_LINUX)")
    f.load()
    return denied


def proc_status(pid: int | str) -> dict[str, str]:
    """Fields of /proc/<pid>/status (Uid, Seccomp, NoNewPrivs, CapEff, RssAnon, ...)."""
    out: dict[str, str] = {}
    try:
        with open(f"/proc/{pid}/status", "rb") as fh:
            for line in fh:
                k, _, v = line.decode(errors="replace").partition(":")
                out[k] = v.strip()
    except OSError:
        return {}
    return out


def measured_facts(status: Mapping[str, str]) -> dict[str, object]:
    """Isolation facts read off a process's /proc status by someone else (never its own word)."""
    facts: dict[str, object] = {}
    try:
        uids = [int(x) for x in status.get("Uid", "").split()]
        facts["uid"] = uids[0] if uids else None
        facts["unprivileged_user"] = bool(uids) and all(u != 0 for u in uids)
        facts["no_new_privs"] = status.get("NoNewPrivs") == "1"
        facts["seccomp"] = status.get("Seccomp") == "2"  # 2 = filter mode
        facts["capabilities_effective"] = int(status.get("CapEff", "0") or "0", 16) != 0
    except ValueError:
        pass
    return facts


# --- privileges and limits -----------------------------------------------------------------------

FSIZE_BYTES = 64 * 2**20
NOFILE = 256
NPROC = 1024
"""RLIMIT_NPROC counts every task (threads too) of the *real uid*, system wide: the runner gives each
job a uid of its own (``runner.JOB_UID_BASE``), so this is one job's budget, not one shared by every
concurrent worker; torch starts one OpenMP thread per core. 1024 stops a fork bomb without starving a
big node's thread pools."""


def set_rlimits(cpu_s: float, *, nproc: bool) -> dict[str, int]:
    """RLIMIT_AS/RLIMIT_DATA are deliberately absent: they break torch.load(mmap=True), which maps
    the file privately-writable; memory is capped by the cgroup instead."""
    soft_cpu = max(1, int(-(-cpu_s // 1)))
    limits = {
        "RLIMIT_CPU": (soft_cpu, soft_cpu + 2),  # SIGXCPU at soft, SIGKILL at hard
        "RLIMIT_FSIZE": (FSIZE_BYTES, FSIZE_BYTES),
        "RLIMIT_NOFILE": (NOFILE, NOFILE),
        "RLIMIT_CORE": (0, 0),
    }
    if nproc:
        limits["RLIMIT_NPROC"] = (NPROC, NPROC)
    for name, value in limits.items():
        resource.setrlimit(getattr(resource, name), value)
    return {k: v[0] for k, v in limits.items()}


CAP_SETGID = 6
CAP_SETUID = 7
CAP_SYS_ADMIN = 21


def has_caps(*caps: int) -> bool:
    """Whether this process holds the given effective capabilities (a root in a container may not:
    the pod template grants SYS_ADMIN, SETUID, SETGID and KILL only; another platform may grant none)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("CapEff:"):
                    eff = int(line.split()[1], 16)
                    return all(eff >> c & 1 for c in caps)
    except (OSError, ValueError):
        pass
    return False


def drop_privileges(uid: int, gid: int) -> None:
    os.setgroups([])
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)
    if os.getuid() != uid or os.geteuid() != uid or os.getgid() != gid:
        raise OSError(errno.EPERM, "privileges were not dropped")
    # Changing credentials already sets dumpable to fs.suid_dumpable (normally 0); make it explicit:
    # a non-dumpable process cannot be ptraced by another process of the same uid (a concurrent job).
    prctl(PR_SET_DUMPABLE, 0)


def close_fds_except(keep: Iterable[int]) -> None:
    keep = set(keep)
    try:
        fds = [int(x) for x in os.listdir("/proc/self/fd")]
    except OSError:
        fds = list(range(3, 4096))
    for fd in fds:
        if fd not in keep:
            try:
                os.close(fd)
            except OSError:
                pass


def write_oom_score_adj(value: int, pid: int | str = "self") -> bool:
    try:
        with open(f"/proc/{pid}/oom_score_adj", "w") as fh:
            fh.write(str(value))
        return True
    except OSError:
        return False


# --- /proc sampling ------------------------------------------------------------------------------


def rss_anon(pid: int) -> int | None:
    """RssAnon of a process in bytes (anonymous resident memory: what a load really allocates;
    RSS would also count the mmapped checkpoint file's page cache)."""
    try:
        with open(f"/proc/{pid}/status", "rb") as fh:
            for line in fh:
                if line.startswith(b"RssAnon:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def children_of(ppid: int) -> list[int]:
    """Children of a process. This kernel has no CONFIG_PROC_CHILDREN (no /proc/PID/task/TID/children),
    so scan /proc/*/stat; called once per job, not per sample."""
    out = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as fh:
                data = fh.read()
        except OSError:
            continue
        # comm may contain spaces and parentheses: fields resume after the last ')'.
        rest = data[data.rfind(b")") + 2:].split()
        if len(rest) > 1 and int(rest[1]) == ppid:
            out.append(int(name))
    return out


# --- memory cgroups ------------------------------------------------------------------------------

CGROUP_ROOT = "/sys/fs/cgroup"


@dataclass
class MemoryCgroup:
    """One job's memory cgroup (v1 ``memory`` controller, or v2 ``memory.max``).

    ``create`` returns None plus a reason when cgroups are not writable here; the job then runs
    without a memory cap and the report says so (``isolation.cgroup_memory = false``).
    """

    path: Path
    version: int
    limit: int
    notes: list[str] = field(default_factory=list)

    @property
    def procs_file(self) -> str:
        return str(self.path / "cgroup.procs")

    @classmethod
    def create(cls, name: str, limit: int, parent: str = "") -> tuple[MemoryCgroup | None, str]:
        try:
            base, version = _cgroup_parent(parent)
        except OSError as exc:
            return None, str(exc)
        path = base / name
        try:
            base.mkdir(exist_ok=True)
            if version == 2:
                _enable_v2_memory(base)
            path.mkdir()
        except OSError as exc:
            return None, f"cannot create {path}: {exc.strerror or exc}"
        cg = cls(path, version, limit)
        try:
            if version == 1:
                _write(path / "memory.limit_in_bytes", limit)
                # memsw = memory + swap; without it a job could spill into swap past its limit.
                # EINVAL/ENOENT when the kernel has no swap accounting (swapaccount=0): fine.
                if (path / "memory.memsw.limit_in_bytes").exists():
                    try:
                        _write(path / "memory.memsw.limit_in_bytes", limit)
                    except OSError as exc:
                        cg.notes.append(f"memsw not limited: {exc.strerror}")
                try:
                    _write(path / "memory.swappiness", 0)
                except OSError:
                    pass
            else:
                _write(path / "memory.max", limit)
                try:
                    _write(path / "memory.swap.max", 0)
                except OSError:
                    pass
        except OSError as exc:
            cg.remove()
            return None, f"cannot set the memory limit in {path}: {exc.strerror or exc}"
        return cg, ""

    def oom_kills(self) -> int:
        """How many processes the cgroup's OOM killer killed (kernel >= 4.13 for v1's counter)."""
        try:
            if self.version == 1:
                text = (self.path / "memory.oom_control").read_text()
                m = re.search(r"^oom_kill (\d+)", text, re.M)
                if m:
                    return int(m.group(1))
                # Older kernels: no counter. Hitting the limit with the worker SIGKILLed is the sign.
                return 1 if int((self.path / "memory.failcnt").read_text()) > 0 else 0
            text = (self.path / "memory.events").read_text()
            m = re.search(r"^oom_kill (\d+)", text, re.M)
            return int(m.group(1)) if m else 0
        except (OSError, ValueError):
            return 0

    def peak(self) -> int:
        """Peak usage charged to the cgroup (includes page cache: not the contract's RssAnon)."""
        name = "memory.max_usage_in_bytes" if self.version == 1 else "memory.peak"
        try:
            return int((self.path / name).read_text())
        except (OSError, ValueError):
            return 0

    def pids(self) -> list[int]:
        try:
            return [int(x) for x in Path(self.procs_file).read_text().split()]
        except (OSError, ValueError):
            return []

    def kill_all(self) -> None:
        if self.version == 2 and (self.path / "cgroup.kill").exists():
            try:
                _write(self.path / "cgroup.kill", 1)
                return
            except OSError:
                pass
        for pid in self.pids():
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass

    def remove(self, wait_s: float = 3.0) -> bool:
        """Kill what is left and rmdir; a dying task keeps the cgroup busy for a moment (EBUSY)."""
        deadline = time.monotonic() + wait_s
        while True:
            self.kill_all()
            try:
                self.path.rmdir()
                return True
            except FileNotFoundError:
                return True
            except OSError:
                if time.monotonic() > deadline:
                    return False
                time.sleep(0.02)


def sweep_stale_cgroups(parent: str = "") -> int:
    """Remove per-job cgroups (``<pid>-<job id>``) whose parent process is gone (a crashed stage)."""
    try:
        base, _ = _cgroup_parent(parent)
        entries = list(base.iterdir()) if base.is_dir() else []
    except OSError:
        return 0
    removed = 0
    for d in entries:
        owner = d.name.partition("-")[0]
        stale = d.is_dir() and owner.isdigit() and not os.path.exists(f"/proc/{owner}")
        if stale and MemoryCgroup(d, 1 if (d / "memory.limit_in_bytes").exists() else 2, 0).remove(wait_s=0.5):
            removed += 1
    return removed


def _write(path: Path, value: object) -> None:
    with open(path, "w") as fh:
        fh.write(str(value))


def _cgroup_parent(configured: str) -> tuple[Path, int]:
    """Where per-job cgroups go. Configured (CKPT_STAGE_WORKER_CGROUP) wins; otherwise
    ``<memory v1 mount>/ckpt-stage`` on v1/hybrid hosts, ``/sys/fs/cgroup/ckpt-stage`` on unified
    (v2) hosts such as Kubernetes nodes (a pod with a cgroup namespace sees its own subtree there)."""
    if configured:
        p = Path(configured)
        version = 2 if (p.parent / "cgroup.controllers").exists() or (p / "cgroup.controllers").exists() else 1
        return p, version
    root = Path(CGROUP_ROOT)
    if (root / "cgroup.controllers").exists():
        if "memory" not in (root / "cgroup.controllers").read_text().split():
            raise OSError(errno.ENOTSUP, "cgroup v2 without the memory controller")
        return root / "ckpt-stage", 2
    v1 = root / "memory"
    if (v1 / "memory.limit_in_bytes").exists():
        if not os.access(v1, os.W_OK):
            raise OSError(errno.EACCES, f"{v1} is not writable (not root?)")
        return v1 / "ckpt-stage", 1
    raise OSError(errno.ENOENT, "no memory cgroup controller mounted")


def _enable_v2_memory(base: Path) -> None:
    # Per-job children need +memory in the parent's and ckpt-stage's subtree_control. Fails with
    # EBUSY when processes live in the parent (cgroup v2's no-internal-process rule): then the
    # operator must point CKPT_STAGE_WORKER_CGROUP at a delegated, empty subtree.
    for d in (base.parent, base):
        ctl = d / "cgroup.subtree_control"
        if "memory" not in ctl.read_text().split():
            _write(ctl, "+memory")
