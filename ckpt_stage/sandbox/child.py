"""Child side of the worker: the three processes forked for one job, below the fork server.

::

    fork server (root, stripped env, torch imported, never ran a torch op)
      └─ supervisor   setsid; joins the job's memory cgroup; unshare(net, pid, mount, ipc, uts)
           └─ init    PID 1 of the new PID namespace, still root: builds the worker's private root
                      (a tmpfs: system dirs, interpreter and sys.path read-only, the model read-only
                      and noexec at /tmp/model, a private tmpfs work dir, a minimal /dev, a fresh
                      /proc, a few /etc files) and pivot_roots into it, detaching the host's root;
                      forks the loader, measures it, reaps, and reports the loader's exit status
                      (the loader cannot forge it)
                └─ loader  rlimits; drops to nobody (no caps, no_new_privs, not dumpable); seccomp
                           filter; stops itself so init can read what is in force off
                           /proc/2/status; runs ``load_and_check(job)``; writes the LoadResult JSON
                           to its pipe

Without a mount namespace (or where pivot_root is refused) init falls back to per-path measures
(masks over /root, private tmpfs on /tmp, /var/tmp, /dev/shm) and the report says
``private_root: false``.

Why three: unshare(CLONE_NEWPID) only moves the caller's *children* into the new namespace, and a
PID 1 ignores signals it has no handler for (SIGXCPU, a self-sent SIGABRT), which would blur the
outcome. So the loader is PID 2 with ordinary signal semantics, and when init exits the kernel kills
everything left in the namespace: nothing a model starts survives its job.

Every process here ends in ``os._exit``: returning would resume the fork server's loop.
"""

from __future__ import annotations

import importlib
import json
import os
import signal
import sys
import traceback
from typing import Any, NoReturn

from ckpt_stage.sandbox import isolation as iso

# Set once by the fork server (before any fork): directories the unprivileged loader must be able to
# read (interpreter prefix, sys.path), planned into masks while still root.
MASK_PLAN: dict[str, list[str]] = {}
NEEDED_PATHS: list[str] = []

SETUP_FAILED = 71
"""Exit status of a loader that could not set up its own isolation (reported as INTERNAL_ERROR)."""
LOADER_RAISED = 70

_PRIVATE_TMPS = ("/tmp", "/var/tmp", "/dev/shm")
WORK = "/tmp/work"
MODEL = "/tmp/model"


class _Status:
    """JSON lines to the parent over a pipe; each record < PIPE_BUF so writes never interleave."""

    def __init__(self, fd: int):
        self.fd = fd

    def send(self, **record: Any) -> None:
        data = (json.dumps(record, default=str)[:4000] + "\n").encode()
        try:
            os.write(self.fd, data)
        except OSError:
            pass


def supervisor_main(spec_fd: int, result_w: int, status_w: int, stderr_w: int, server_pid: int) -> NoReturn:
    code = 1
    try:
        code = _supervisor(spec_fd, result_w, status_w, stderr_w, server_pid)
    except BaseException:  # noqa: BLE001 - nothing may escape into the fork server's loop
        try:
            traceback.print_exc()
        except BaseException:  # noqa: BLE001
            pass
    os._exit(code)


def _supervisor(spec_fd: int, result_w: int, status_w: int, stderr_w: int, server_pid: int) -> int:
    os.setsid()  # own process group: the parent kills the job as one group
    # Die with the fork server (single-threaded, so the thread caveat of PDEATHSIG does not bite);
    # re-check the parent in case it died before the prctl.
    iso.set_parent_death_signal()
    if os.getppid() != server_pid:
        return 1
    signal.set_wakeup_fd(-1)
    for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_DFL)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.dup2(stderr_w, 1)
    os.dup2(stderr_w, 2)
    # Nothing of the fork server's may reach the worker: its control socket would let a hostile
    # model ask a root process for forks.
    iso.close_fds_except({0, 1, 2, spec_fd, result_w, status_w})
    status = _Status(status_w)
    spec = json.loads(_read_all(spec_fd))
    os.close(spec_fd)

    cgroup = False
    if spec.get("cgroup_procs"):
        try:
            with open(spec["cgroup_procs"], "w") as fh:
                fh.write(str(os.getpid()))
            cgroup = True
        except OSError as exc:
            print(f"ckpt-stage worker: cannot join {spec['cgroup_procs']}: {exc}", file=sys.stderr)
    # The supervisor and init must never be the OOM killer's pick: the loader is (see the loader).
    iso.write_oom_score_adj(-1000)

    ns: dict[str, bool] = {}
    if spec.get("namespaces", True):
        got = iso.unshare_best_effort(
            [iso.CLONE_NEWNET, iso.CLONE_NEWPID, iso.CLONE_NEWNS, iso.CLONE_NEWIPC, iso.CLONE_NEWUTS])
        ns = {"net": got[iso.CLONE_NEWNET], "pid": got[iso.CLONE_NEWPID], "mnt": got[iso.CLONE_NEWNS],
              "ipc": got[iso.CLONE_NEWIPC], "uts": got[iso.CLONE_NEWUTS]}
    pid = os.fork()
    if pid == 0:
        _init_main(spec, result_w, status, cgroup, ns)
    os.close(result_w)
    status.send(ev="supervisor", init_pid=pid, cgroup=cgroup)
    _, st = os.waitpid(pid, 0)
    return 0 if st == 0 else 1


def _init_main(spec: dict, result_w: int, status: _Status, cgroup: bool, ns: dict[str, bool]) -> NoReturn:
    code = 1
    try:
        code = _init(spec, result_w, status, cgroup, ns)
    except BaseException as exc:  # noqa: BLE001
        status.send(ev="error", msg=f"isolation setup failed: {type(exc).__name__}: {exc}")
        try:
            traceback.print_exc()
        except BaseException:  # noqa: BLE001
            pass
    os._exit(code)


def _init(spec: dict, result_w: int, status: _Status, cgroup: bool, ns: dict[str, bool]) -> int:
    iso.set_parent_death_signal()
    job_root = os.path.realpath(spec["job"]["root"])
    root_fd = os.open(job_root, os.O_PATH | os.O_DIRECTORY)
    notes: list[str] = []
    info: dict[str, Any] = {
        "net_namespace": ns.get("net", False),
        "pid_namespace": ns.get("pid", False) and os.getpid() == 1,
        "mount_namespace": ns.get("mnt", False),
        "ipc_namespace": ns.get("ipc", False),
        "uts_namespace": ns.get("uts", False),
        "cgroup_memory": cgroup,
        "env_stripped": iso.env_is_clean(os.environ),
        "proc_private": False,
        "private_tmp": False,
        "readonly_model": False,
        "masked_paths": [],
    }
    model_root, work = job_root, spec["fallback_dir"]
    mounts = info["mount_namespace"]
    if mounts:
        # Private propagation first, or every mount below would leak into the host's namespace. An
        # LSM (AppArmor's container profile) may refuse mount(2) even with CAP_SYS_ADMIN: then no
        # mounts at all, and the report says so.
        try:
            iso.mount(None, "/", None, iso.MS_REC | iso.MS_PRIVATE)
        except OSError as exc:
            mounts = False
            notes.append(f"mounts refused: {exc}")
    # Owner set by mount options: the pod template grants no CAP_CHOWN.
    owner = ",uid={},gid={}".format(*spec["drop_to"]) if spec.get("drop_to") else ""
    size = int(spec.get("tmp_bytes") or 64 * 2**20)
    work_opts = f"mode=0700,size={size}{owner}"
    info["private_root"] = False
    if mounts and info["pid_namespace"] and spec.get("private_root", True):
        # The whole filesystem of the worker, built on a tmpfs over the runner's job dir (a directory
        # only this mount namespace changes) and pivoted into: see isolation.build_private_root.
        new_root = os.path.dirname(spec["fallback_dir"])
        try:
            iso.build_private_root(new_root, NEEDED_PATHS, model_fd=root_fd, model=MODEL, work=WORK,
                                   work_opts=work_opts, shm_bytes=min(size, 16 * 2**20))
            iso.enter_root(new_root)
            info.update(private_root=True, proc_private=True, private_tmp=True, readonly_model=True)
            model_root, work = MODEL, WORK
        except OSError as exc:
            notes.append(f"no private root: {exc}")
            try:  # undo what was half built; the per-path measures below still apply
                iso.umount2(new_root, iso.MNT_DETACH)
            except OSError:
                pass
    if mounts and not info["private_root"]:
        if info["pid_namespace"]:
            try:
                iso.mount("proc", "/proc", "proc", iso.MS_NOSUID | iso.MS_NODEV | iso.MS_NOEXEC)
                info["proc_private"] = True  # /proc shows this namespace only: no /proc/<parent>
            except OSError as exc:
                notes.append(str(exc))
        try:
            info["masked_paths"] = iso.apply_masks(MASK_PLAN)
        except OSError as exc:
            notes.append(str(exc))
        try:
            _private_tmps(spec)
            os.makedirs(MODEL, mode=0o755)
            iso.bind_readonly(f"/proc/self/fd/{root_fd}", MODEL, recursive=False, noexec=True)
            info["readonly_model"] = True
            model_root = MODEL
            os.makedirs(WORK, mode=0o700)
            iso.mount("tmpfs", WORK, "tmpfs", iso.MS_NOSUID | iso.MS_NODEV, work_opts)
            work = WORK
            info["private_tmp"] = True
        except OSError as exc:
            notes.append(str(exc))
    os.close(root_fd)
    if spec.get("drop_to") and not info["private_root"]:
        # Without the binds, the unprivileged loader reads the host's paths directly. If it cannot reach
        # them, the loader's errors would look like the model's fault (a false quarantine): stop here
        # with an infrastructure error instead.
        blocked = [] if info["masked_paths"] else sorted(MASK_PLAN)
        if model_root == job_root and not _reachable(job_root):
            blocked.append(job_root)
        if blocked:
            status.send(ev="isolated", iso=info)
            status.send(ev="error", msg=(
                f"no mount namespace to bind {', '.join(blocked)} for the unprivileged worker, and "
                "they are not reachable by other users; grant CAP_SYS_ADMIN (mounts) or use "
                "world-traversable directories for the interpreter and CKPT_STAGE_CACHE_DIR"))
            return 1
    info["unprivileged_user"] = bool(spec.get("drop_to")) or os.getuid() != 0
    info["no_new_privs"] = True
    info["rlimits"] = True
    if notes:
        info["notes"] = notes[:8]
    status.send(ev="isolated", iso=info)

    pid = os.fork()
    if pid == 0:
        _loader_main(spec, result_w, status.fd, model_root, work)
    os.close(result_w)
    status.send(ev="loading", ns_pid=pid)
    # /proc/<pid> names the loader only where this /proc is the namespace's own (or there is no PID
    # namespace at all); otherwise pid 2 of the host's /proc is someone else.
    can_measure = info["proc_private"] or not info["pid_namespace"]
    measured = False
    while True:  # PID 1 reaps every orphan of the namespace; only the loader's end matters
        try:
            got, st, ru = os.wait4(-1, os.WUNTRACED)
        except ChildProcessError:
            status.send(ev="error", msg="loader vanished")
            return 1
        if got == pid and os.WIFSTOPPED(st):
            # The loader stops itself once, after its last set-up step and before any job code:
            # read what is in force off its /proc status (its own word is never taken).
            if not measured:
                measured = True
                facts = iso.measured_facts(iso.proc_status(pid)) if can_measure else {}
                status.send(ev="armed", facts=facts)
            try:
                os.kill(pid, signal.SIGCONT)
            except OSError:
                pass
            continue
        if got == pid:
            break
    cpu = ru.ru_utime + ru.ru_stime
    if os.WIFSIGNALED(st):
        status.send(ev="exit", signal=os.WTERMSIG(st), cpu_s=cpu, maxrss_kb=ru.ru_maxrss)
    else:
        status.send(ev="exit", code=os.WEXITSTATUS(st), cpu_s=cpu, maxrss_kb=ru.ru_maxrss)
    return 0


def _reachable(path: str) -> bool:
    parts = os.path.realpath(path).split("/")
    return all(iso.traversable_by_others("/".join(parts[:i]) or "/") for i in range(2, len(parts) + 1))


def _private_tmps(spec: dict) -> None:
    """Fresh, size-capped tmpfs on the shared scratch dirs: the worker sees none of the host's temp
    files, and what it writes vanishes with it (and is charged to its memory cgroup)."""
    size = int(spec.get("tmp_bytes") or 64 * 2**20)
    for d in _PRIVATE_TMPS:
        if not os.path.isdir(d):
            continue
        # Needed interpreter dirs that live under a scratch dir (a venv in /tmp) are bound back.
        keep = [p for p in NEEDED_PATHS if p.startswith(d.rstrip("/") + "/")]
        fds = [(p, os.open(p, os.O_PATH | os.O_DIRECTORY)) for p in keep if os.path.isdir(p)]
        try:
            # /tmp itself stays root's (0755): the loader writes only to its own /tmp/work.
            opts = "mode=0755,size=1m" if d == "/tmp" else f"mode=1777,size={size}"
            iso.mount("tmpfs", d, "tmpfs", iso.MS_NOSUID | iso.MS_NODEV, opts)
            for p, fd in fds:
                os.makedirs(p, mode=0o755, exist_ok=True)
                iso.bind_readonly(f"/proc/self/fd/{fd}", p, recursive=True)
        finally:
            for _, fd in fds:
                os.close(fd)


def _loader_main(spec: dict, result_w: int, status_w: int, model_root: str, work: str) -> NoReturn:
    try:
        # The status pipe is init's: closing it here means the loader cannot forge its own exit.
        os.close(status_w)
        os.dup2(result_w, 3)
        iso.close_fds_except({0, 1, 2, 3})
        # The cgroup OOM killer must pick the loader (and the host's, under global pressure, too).
        iso.write_oom_score_adj(1000)
        job = dict(spec["job"])
        iso.set_rlimits(float(job.get("cpu_s") or 600), nproc=bool(spec.get("drop_to")))
        os.chdir(work)
        env = iso.scrub_env(os.environ)
        env.update(HOME=work, TMPDIR=work, PWD=work)
        if spec.get("drop_to"):
            env.update(USER="nobody", LOGNAME="nobody")
        if not job.get("allow_pickled_models", True):
            env["MLFLOW_ALLOW_PICKLE_DESERIALIZATION"] = "false"
        os.environ.clear()
        os.environ.update(env)
        import tempfile

        tempfile.tempdir = None  # the fork server's cached choice is not this job's TMPDIR
        if spec.get("drop_to"):
            iso.drop_privileges(*spec["drop_to"])
        iso.prctl(iso.PR_SET_NO_NEW_PRIVS, 1)
        # After the drop: a credential change clears the parent-death signal. Without a PID namespace
        # this is what takes the loader down with init.
        iso.set_parent_death_signal()
    except BaseException:  # noqa: BLE001
        traceback.print_exc()
        os._exit(SETUP_FAILED)
    if spec.get("seccomp", True):
        # Last: the set-up above needs mount-free but otherwise ordinary syscalls; from here on the
        # job's code runs under the filter. A platform without libseccomp runs without it; init
        # measures what is in force either way (Seccomp: in /proc/<pid>/status).
        try:
            iso.install_seccomp()
        except Exception as exc:  # noqa: BLE001
            print(f"ckpt-stage worker: no seccomp filter: {type(exc).__name__}: {exc}", file=sys.stderr)
    # Let init read the measures off /proc before the entry runs (see _init).
    os.kill(os.getpid(), signal.SIGSTOP)

    try:
        from ckpt_stage.sandbox.job import LoadJob

        job["root"] = model_root
        load = _resolve(spec["entry"])
        result = load(LoadJob.from_dict(job))
        data = json.dumps(result.to_dict(), default=str).encode()
    except BaseException:  # noqa: BLE001 - the loader should never raise; if it does, say where
        traceback.print_exc()
        os._exit(LOADER_RAISED)
    try:
        view = memoryview(data)
        while view:
            n = os.write(3, view)
            view = view[n:]
        os.close(3)
        sys.stdout.flush()
        sys.stderr.flush()
    except BaseException:  # noqa: BLE001
        os._exit(LOADER_RAISED)
    # _exit, not exit: no atexit hooks or torch teardown inherited from the fork server.
    os._exit(0)


def _read_all(fd: int) -> bytes:
    # pread: the memfd's offset is shared with the runner's copy of it.
    size, chunks, off = os.fstat(fd).st_size, [], 0
    while off < size:
        chunk = os.pread(fd, size - off, off)
        if not chunk:
            break
        chunks.append(chunk)
        off += len(chunk)
    return b"".join(chunks)


def _resolve(entry: str):
    mod, _, name = entry.partition(":")
    return getattr(importlib.import_module(mod), name)
