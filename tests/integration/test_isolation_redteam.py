"""Red-team tests of the isolated worker: hostile architectures (``tests.corpus.redteam_archs``) and
hostile loader entries run through the real runner and try every way out that ``test_isolation``'s
probe does not. Each test asserts the wall holds; the ones marked "got through before" failed on the
sandbox as it was before the fix named in their docstring.
"""

from __future__ import annotations

import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
import torch

from ckpt_stage.config import Settings
from ckpt_stage.domain import ReasonCode
from ckpt_stage.sandbox import runner
from ckpt_stage.sandbox.job import LoadJob, LoadResult
from tests.corpus import isolation_archs

STAND_IN = "tests.corpus.isolation_archs:stand_in_load"
RT = "tests.corpus.redteam_archs"

pytestmark = [
    pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="Linux only (/proc, namespaces)"),
    pytest.mark.skipif(os.geteuid() != 0, reason="namespaces, the private root and per-job uids need root"),
]


def _kernel_lacks() -> str:
    if not all(os.path.lexists(f"/proc/self/ns/{ns}") for ns in ("mnt", "pid", "net")):
        return "kernel without mount, PID or network namespaces"
    if "Seccomp:" not in Path("/proc/self/status").read_text():
        return "kernel without seccomp (CONFIG_SECCOMP_FILTER)"
    return ""


needs_walls = pytest.mark.skipif(bool(_kernel_lacks()), reason=_kernel_lacks() or "-")
x86_64 = pytest.mark.skipif(platform.machine() != "x86_64", reason="hand-made x86_64 machine code")


@pytest.fixture(scope="module", autouse=True)
def _fresh_servers():
    runner.shutdown()
    yield
    runner.shutdown()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("redteam-model")
    torch.save(isolation_archs.state_dict(), d / "model.pt")
    return d


def job_for(root: Path, arch: str | None, *, timeout_s: float = 30, modules: tuple[str, ...] = (RT,),
            **kwargs) -> LoadJob:
    return LoadJob(root=str(root), files=(("model.pt", "torch-zip"),),
                   arch=(arch if ":" in arch else f"{RT}:{arch}") if arch else None, arch_kwargs=kwargs,
                   arch_modules=modules, timeout_s=timeout_s, cpu_s=600, memory_bytes=2**30)


def run(job: LoadJob, entry: str | None = STAND_IN) -> LoadResult:
    return runner.run_job(job, Settings(), entry=entry)


def codes(result: LoadResult) -> list[ReasonCode | None]:
    return [f.code for f in result.findings]


def observed(result: LoadResult) -> dict:
    assert result.findings == (), [f.to_dict() for f in result.findings]
    return result.info["observed"]


# --- one constructor, many walls ----------------------------------------------------------------


@pytest.fixture(scope="module")
def breakout(model_dir) -> dict:
    return observed(run(job_for(model_dir, "Breakout")))


@needs_walls
def test_inherited_descriptors_lead_nowhere(breakout):
    """Only stdin (/dev/null), the stderr pipe and the result pipe; none is a directory to walk up
    from, and the status pipe (init's record of the exit) is not among them."""
    fds = {k: v for k, v in breakout["fds"].items() if breakout["fd_stat"].get(k, {}).get("mode")}
    assert set(fds) == {"0", "1", "2", "3"}, breakout["fds"]
    assert fds["0"] == "/dev/null" and all(fds[k].startswith("pipe:") for k in ("1", "2", "3"))
    assert fds["1"] == fds["2"] != fds["3"]
    assert breakout["fd0_parent"] == "ENOTDIR"


@needs_walls
def test_init_and_the_old_root_are_out_of_reach(breakout):
    for what in ("root", "cwd", "environ", "mem", "maps", "fd", "stack", "syscall", "auxv", "map_files"):
        assert breakout[f"proc1:{what}"] == "EACCES", (what, breakout[f"proc1:{what}"])
    assert breakout["pids"] == [1, 2]
    for key in ("kill:init", "kill:init_term", "pidfd:signal_init", "prlimit:init"):
        assert breakout[key] == "EPERM", (key, breakout[key])
    assert breakout.get("pidfd:madvise_init", "EACCES") in ("EACCES", "EPERM", "ENOSYS")
    assert breakout["setpgid:init"] in ("ESRCH", "EPERM")
    root = breakout["self_root"]
    assert root.startswith("ok:") and "'home'" not in root and "'run'" not in root, root


@needs_walls
def test_kernel_knobs_and_host_views_are_closed(breakout):
    """Got through before (a leak of names only): /proc/self/cgroup named the stage's pid and the job's
    id; the worker now has a cgroup namespace of its own."""
    for key, value in breakout.items():
        if key.startswith("write:"):
            assert value not in ("written",), (key, value)
    for p in ("/sys/fs", "/sys/fs/cgroup", "/sys/class/net", "/sys/kernel", "/dev/pts", "/dev/mqueue"):
        assert breakout[f"list:{p}"] == "ENOENT", (p, breakout[f"list:{p}"])
    assert breakout["list:/sys"] == "ok:['devices']"
    # The job's cgroup is its own namespace's root: no stage pid or job id in its name.
    assert "ckpt-stage" not in breakout["cgroup"] and "memory:/\n" in breakout["cgroup"], breakout["cgroup"]
    assert breakout["read:/proc/kmsg"].startswith("EACCE")
    dev = breakout["list:/dev"]
    assert dev == "ok:['fd', 'full', 'null', 'random', 'shm', 'stderr', 'stdin', 'stdout', 'urandom', 'zero']"


@needs_walls
def test_model_root_and_system_dirs_are_read_only(breakout):
    for key in ("model:write", "model:create", "model:chmod", "model:utime", "model:rename", "root:create",
                "usr:create", "etc:passwd", "dev:create"):
        assert breakout[key] in ("EROFS", "EACCES", "EPERM"), (key, breakout[key])
    assert breakout["model:link_to_work"] in ("EXDEV", "EPERM")
    assert breakout["dev:mknod"] == "EPERM"


@needs_walls
@x86_64
def test_new_mount_api_handles_and_fd_theft_are_refused(breakout):
    for name in ("open_tree", "fsopen", "fspick", "move_mount", "mount_setattr", "fsmount", "name_to_handle_at",
                 "pidfd_getfd", "kcmp"):
        assert breakout[f"sys:{name}"] == "EPERM", (name, breakout[f"sys:{name}"])
    assert breakout["sys:clone3"] == "ENOSYS"
    # Namespace flags hidden in the upper half of the 64-bit argument do not slip past the filter.
    assert breakout["unshare:high_bits"] == "EPERM" and breakout["socket:high_bits"] == "EPERM"


@needs_walls
@x86_64
def test_other_syscall_abis_are_killed(breakout):
    """int 0x80 (i386: socket, socketcall, unshare, even getpid) and x32 numbers from a 64-bit process:
    the filter covers only x86_64, and libseccomp kills a call from an ABI it does not cover."""
    for key in ("i386:socket", "i386:socketcall", "i386:unshare", "i386:getpid", "x32:socket", "x32:unshare"):
        assert breakout[key] == "killed:SIGSYS", (key, breakout[key])


@needs_walls
@x86_64
def test_syscalls_outside_the_allowlist_are_refused(breakout):
    """Got through before (the filter was a deny-list): syscalls the kernel added after the list was
    written (statmount/listmount, open_tree_attr, file_getattr on this 6.18 kernel) and rare interfaces no
    load needs (modify_ldt, AIO, POSIX mqueues, migrate_pages, memfd_secret, process_madvise) reached the
    kernel. The filter is now an allowlist: everything else is ENOSYS."""
    for key, value in breakout.items():
        if key.startswith("unlisted:"):
            assert value == "ENOSYS", (key, value)
    assert sum(k.startswith("unlisted:") for k in breakout) == 10


@needs_walls
def test_no_way_back_to_privilege(breakout):
    assert breakout["setuid0"] == "EPERM" and breakout["setgroups"] == "EPERM"
    assert breakout["rlimit_raise"].startswith("ValueError")  # above the hard limit
    assert breakout["oom_adj_lower"] in ("EACCES", "opened:EACCES")
    st = breakout["status"]
    assert st["CapEff"] == st["CapPrm"] == st["CapAmb"] == "0000000000000000"
    assert st["NoNewPrivs"] == "1" and st["Seccomp"] == "2"
    uid = int(st["Uid"].split()[0])
    assert runner.JOB_UID_BASE <= uid < runner.JOB_UID_BASE + runner.JOB_UID_SPAN, st


@needs_walls
def test_host_binaries_run_under_the_same_walls(breakout):
    """/bin/sh runs (the image's binaries are there), as the job's uid, and reaches nothing."""
    out = breakout["exec:sh"]
    assert "rc=0" not in out, out
    uid = out.split("out=")[1].split()[0]
    assert runner.JOB_UID_BASE <= int(uid) < runner.JOB_UID_BASE + runner.JOB_UID_SPAN, out


@needs_walls
def test_a_socketpair_cannot_be_pointed_at_a_host_socket(breakout):
    assert "sent" not in breakout["socketpair:sendto"], breakout["socketpair:sendto"]


# --- only what the worker imports of a sys.path folder ------------------------------------------


@needs_walls
def test_a_sys_path_folder_is_bound_package_by_package(model_dir, monkeypatch):
    """Got through before: every sys.path entry of the stage outside the interpreter (a source checkout,
    an Airflow dags/plugins folder, a script's dir, a home directory) was bound whole, so every
    world-readable file next to the packages (configs, .env, DAG files with connections) was readable.
    Now only the top-level packages the job imports are bound (ckpt_stage, its allowed architecture
    packages)."""
    base = Path(tempfile.mkdtemp(prefix="ckpt-stage-syspath-", dir="/tmp"))
    try:
        os.chmod(base, 0o755)
        pkg = base / "rt_syspath_pkg"
        pkg.mkdir()
        (pkg / "__init__.py").write_text(
            "import os\n"
            "from tests.corpus.isolation_archs import _Small\n"
            "class Peek(_Small):\n"
            "    def __init__(self, paths=()):\n"
            "        super().__init__()\n"
            "        self.observed = {p: (open(p).read() if os.path.exists(p) else 'ENOENT') for p in paths}\n"
            "        self.observed['listing'] = sorted(os.listdir(os.path.dirname(os.path.dirname(__file__))))\n")
        secret = base / "airflow.env"
        secret.write_text("AIRFLOW_CONN_DB=postgresql://u:canary-syspath@db/x\n")
        (base / "unrelated_pkg").mkdir()
        (base / "unrelated_pkg" / "__init__.py").write_text("SECRET = 'canary-syspath'\n")
        for p in base.rglob("*"):
            os.chmod(p, 0o755 if p.is_dir() else 0o644)
        monkeypatch.syspath_prepend(str(base))
        runner.shutdown()  # the next fork server takes this sys.path
        result = run(job_for(model_dir, "rt_syspath_pkg:Peek", modules=("rt_syspath_pkg",),
                             paths=[str(secret), str(base / "unrelated_pkg" / "__init__.py")]))
        ob = observed(result)
        assert ob[str(secret)] == "ENOENT" and ob[str(base / "unrelated_pkg" / "__init__.py")] == "ENOENT", ob
        assert ob["listing"] == ["rt_syspath_pkg"], ob
        # The version's own arch tag names a folder beside the package: a name from the registry, not
        # the operator's settings, so it binds nothing.
        result = run(job_for(model_dir, "unrelated_pkg:Anything", modules=("rt_syspath_pkg",),
                             paths=[str(base / "unrelated_pkg"), str(base / "rt_syspath_pkg")]),
                     entry=f"{RT}:peek_paths")
        assert observed(result) == {str(base / "unrelated_pkg"): False, str(base / "rt_syspath_pkg"): True}
    finally:
        runner.shutdown()
        shutil.rmtree(base, ignore_errors=True)


# --- other jobs ---------------------------------------------------------------------------------


@needs_walls
def test_a_job_cannot_starve_a_concurrent_job_of_threads(model_dir):
    """Got through before: RLIMIT_NPROC counts the tasks of a real uid system wide and every job ran
    as nobody, so a job holding 1,023 threads made a concurrent benign job fail ("libgomp: Thread
    creation failed", INTERNAL_ERROR). Each job now has a uid of its own."""
    run(job_for(model_dir, None))  # warm
    out: dict = {}
    t = threading.Thread(target=lambda: out.setdefault("hog", run(job_for(model_dir, "NprocHog", seconds=8))))
    t.start()
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:  # until the hog holds its threads
            busy = [w["worker_pid"] for w in runner.active_workers() if w["worker_pid"]]
            if busy and len(os.listdir(f"/proc/{busy[0]}/task")) >= 1000:
                break
            time.sleep(0.1)
        else:
            pytest.fail("the hog never started its threads")
        benign = run(job_for(model_dir, None))
    finally:
        t.join(60)
    assert benign.findings == (), [f.to_dict() for f in benign.findings]
    assert benign.info["matmul"] == 512.0  # a multi-threaded torch op ran
    hog = observed(out["hog"])
    assert hog["threads"] >= 1000 and hog["stopped_by"], hog  # its own budget still stops it


@needs_walls
def test_concurrent_jobs_share_no_scratch_space(model_dir):
    out: dict = {}
    t = threading.Thread(target=lambda: out.setdefault(
        "drop", run(job_for(model_dir, "ShmDropper", mode="drop", tag="rt-left", seconds=4))))
    t.start()
    time.sleep(1.5)
    look = observed(run(job_for(model_dir, "ShmDropper", mode="look")))
    t.join(60)
    drop = observed(out["drop"])
    assert drop["/dev/shm"] == "written" and drop["/tmp/work"] == "written"
    assert look["/dev/shm"] == [] and look["/tmp/work"] == [] and look["pids"] == [1, 2], look


@needs_walls
def test_nothing_a_job_starts_outlives_it(model_dir):
    """A double-forked, setsid'd grandchild that ignores SIGTERM/SIGHUP and holds the job's pipes."""
    name = f"rt-linger-{os.getpid() % 10000}"
    t0 = time.monotonic()
    ob = observed(run(job_for(model_dir, "Lingerer", name=name)))
    assert ob["grandchild"] == "up"
    assert time.monotonic() - t0 < 20  # the held pipes did not hold the parent up to the deadline
    time.sleep(0.3)
    left = []
    for comm in Path("/proc").glob("[0-9]*/comm"):
        try:
            if comm.read_text().strip() == name:
                left.append(comm.parent.name)
        except OSError:
            pass
    assert left == []


# --- the result channel -------------------------------------------------------------------------


@pytest.mark.parametrize(("entry", "code"), [
    ("early_result_then_hang", ReasonCode.TIMEOUT),
    ("result_then_crash", ReasonCode.WORKER_CRASH),
    ("stop_self_forever", ReasonCode.TIMEOUT),
])
def test_a_valid_pass_written_early_is_not_the_verdict(model_dir, entry, code):
    """A well-formed pass on the result pipe counts only when the loader then exits cleanly."""
    t0 = time.monotonic()
    result = run(job_for(model_dir, None, timeout_s=3), entry=f"{RT}:{entry}")
    assert codes(result) == [code], [f.to_dict() for f in result.findings]
    assert time.monotonic() - t0 < 3 + 10


def test_a_grandchild_cannot_append_a_second_answer(model_dir):
    result = run(job_for(model_dir, None), entry=f"{RT}:grandchild_holds_pipes")
    assert "late" not in result.info and result.info.get("matmul") == 512.0, result.info


def _parent_peak_mib(entry: str, model_dir: Path) -> tuple[list, float]:
    """Run one job in a fresh interpreter and report its codes and the parent's peak RSS growth."""
    script = (
        "import json, resource, sys\n"
        "from ckpt_stage.config import Settings\nfrom ckpt_stage.sandbox import runner\n"
        "from ckpt_stage.sandbox.job import LoadJob\n"
        f"job = LoadJob(root={str(model_dir)!r}, files=(('model.pt', 'torch-zip'),), timeout_s=30)\n"
        f"runner.run_job(job, Settings(), entry={STAND_IN!r})\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        f"r = runner.run_job(job, Settings(), entry={RT + ':' + entry!r})\n"
        "after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "print(json.dumps([[f.code.value for f in r.findings], (after - before) / 1024]))\n")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=180, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    import json

    got, grew = json.loads(proc.stdout.strip().splitlines()[-1])
    return got, grew


def test_a_result_of_millions_of_tiny_values_is_refused_before_parsing(model_dir):
    """Got through before: 30 MiB of ``{},{},...`` (under the byte cap) was parsed into ten million
    dicts, taking the stage process from ~230 MiB to ~1 GiB before the schema refused it; jobs run
    concurrently in one stage process. Now the values are counted before json sees them."""
    got, grew = _parent_peak_mib("huge_result", model_dir)
    assert got == ["WORKER_CRASH"]
    assert grew < 200, f"the parent grew by {grew:.0f} MiB"


@pytest.mark.parametrize(("entry", "code"), [
    ("huge_number_result", "WORKER_CRASH"),
    ("overflow_result", "INTERNAL_ERROR"),
    ("stderr_flood_no_newline", "INTERNAL_ERROR"),
])
def test_oversized_answers_stay_bounded_in_the_parent(model_dir, entry, code):
    got, grew = _parent_peak_mib(entry, model_dir)
    assert got == [code]
    assert grew < 200, f"the parent grew by {grew:.0f} MiB"


@pytest.mark.parametrize("entry", ["result_then_selfkill", "selfterm", "selfkill_group"])
def test_a_self_inflicted_kill_is_never_a_pass(model_dir, entry):
    """Not closed: a job that kills itself with SIGKILL/SIGTERM (after writing a valid pass) is
    classified WORKER_LOST, an infrastructure error that is retried, because the kernel does not tell
    the waiting parent who sent a signal. It is never a pass and never promoted."""
    result = run(job_for(model_dir, None, timeout_s=10), entry=f"{RT}:{entry}")
    assert result.findings and None not in codes(result), [f.to_dict() for f in result.findings]
    # What it reads as today (see the README's "What the walls do not cover").
    assert codes(result) == [ReasonCode.WORKER_LOST], [f.to_dict() for f in result.findings]


def test_the_parent_is_still_healthy(model_dir):
    assert run(job_for(model_dir, None)).findings == ()
    assert runner.active_workers() == []
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss < 4 * 2**20  # KiB: under 4 GiB


# --- a forged pass against the scan's reading of the weights --------------------------------------


@pytest.fixture(scope="module")
def forged_inspect(model_dir):
    from ckpt_stage.pipeline import inspect_paths

    def go(path: Path, mode: str):
        settings = Settings(arch_modules=("torch.nn", RT), cache_dir=model_dir.parent / f"cache-{mode}")
        return inspect_paths([path], arch=f"{RT}:ForgedPass", arch_kwargs={"mode": mode}, settings=settings)
    return go


@pytest.mark.parametrize("mode", ["no_layers", "other_kind", "wrong_shape"])
@pytest.mark.parametrize("fmt", ["torch-zip", "torch-legacy", "safetensors"])
def test_a_forged_pass_must_match_the_scanned_tensors(model_dir, forged_inspect, tmp_path, fmt, mode):
    """Got through before: an architecture that writes a clean pass and exits before any check passed a
    torch zip or legacy torch state_dict whatever it claimed (the scan's tensor table was compared for
    safetensors only), and a safetensors file too when the forged answer left out its layer table or
    named another model kind. Now the scan reads a torch state_dict's names, shapes and dtypes from its
    pickle, and a passing answer must report exactly those."""
    from safetensors.torch import save_file

    if fmt == "torch-zip":
        path = model_dir / "model.pt"
    elif fmt == "torch-legacy":
        path = tmp_path / "legacy.pt"
        torch.save(isolation_archs.state_dict(), path, _use_new_zipfile_serialization=False)
    else:
        path = tmp_path / "model.safetensors"
        save_file(isolation_archs.state_dict(), str(path))
    report = forged_inspect(path, mode)
    assert report.verdict.value != "pass", report.to_dict()["reasons"]
    reasons = report.to_dict()["reasons"]
    assert any(r["code"] == "WORKER_CRASH" and "does not match the static scan" in r["message"] for r in reasons), \
        reasons
