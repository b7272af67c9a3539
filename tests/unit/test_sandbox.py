"""Pure parts of the sandbox: environment scrubbing, mask planning, outcome classification.

No process is started here; ``tests/integration/test_isolation.py`` runs the real thing.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from ckpt_stage.config import Settings
from ckpt_stage.domain import ReasonCode
from ckpt_stage.sandbox import child, isolation, runner
from ckpt_stage.sandbox.job import LoadJob, LoadResult


@pytest.mark.parametrize(("name", "value", "kept"), [
    ("PATH", "/usr/bin", True),
    ("LANG", "C.UTF-8", True),
    ("LC_ALL", "C", True),
    ("PYTHONPATH", "/src", True),
    ("OMP_NUM_THREADS", "2", True),
    ("TORCH_HOME", "/x", True),
    # The LoadJob carries what the worker needs: none of the stage's own settings go in.
    ("CKPT_STAGE_ARCH_MODULES", "pkg", False),
    ("CKPT_STAGE_WORKER_TIMEOUT_S", "5", False),
    ("CKPT_STAGE_AIRFLOW_URL", "http://airflow:8080/", False),
    ("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1", False),
    ("AWS_SECRET_ACCESS_KEY", "s", False),
    ("AWS_ACCESS_KEY_ID", "a", False),
    ("AWS_ENDPOINT_URL_S3", "http://s3", False),
    ("MLFLOW_TRACKING_URI", "http://mlflow", False),
    ("MLFLOW_TRACKING_TOKEN", "t", False),
    ("CKPT_STAGE_WEBHOOK_SECRET", "w", False),
    ("CKPT_STAGE_AIRFLOW_TOKEN", "t", False),
    ("CKPT_STAGE_AIRFLOW_PASSWORD", "p", False),
    ("CKPT_STAGE_DASHBOARD_TOKEN", "t", False),
    ("AIRFLOW__DATABASE__SQL_ALCHEMY_CONN", "postgresql://a:b@db/x", False),
    ("AIRFLOW_CONN_S3", "aws://k:s@", False),
    ("GITHUB_TOKEN", "t", False),
    ("OPENAI_API_KEY", "k", False),
    ("HOME", "/root", False),
    ("PYTHONSTARTUP", "/evil.py", False),
    ("PYTHON_DB_URL", "postgresql://user:pw@db/x", False),
    ("SOMETHING_UNKNOWN", "x", False),
])
def test_scrub_env(name, value, kept):
    assert (name in isolation.scrub_env({name: value})) is kept


@pytest.mark.parametrize("value", [
    "http://host/?token=abc",
    "http://host/api?x=1&access_token=abc",
    "https://bucket.s3.amazonaws.com/m.pt?X-Amz-Algorithm=AWS4&X-Amz-Credential=AKIA&X-Amz-Signature=ff",
    "https://acct.blob.core.windows.net/c/m.pt?sv=2024&sp=r&sig=abc%3D",
    "https://storage.googleapis.com/b/o?X-Goog-Signature=abc",
    "http://host/cb?code=oauth-code",
    "http://host/?api_key=k", "http://host/?key=k", "http://host/?password=p", "http://host/?secret=s",
    "http://host/?private_token=t", "http://host/?signature=s", "http://host/#id_token=t",
    "http://host/?GitLab_Token=t",
    "postgresql://user:pw@db/x", "https://ghp_abc123@github.com/o/r.git", "redis://:pw@cache:6379/0",
])
def test_scrub_env_drops_values_carrying_credentials(value):
    for name in ("PYTHONPATH", "LC_ALL", "TORCH_HOME", "OMP_NUM_THREADS"):
        assert name not in isolation.scrub_env({name: value}), (name, value)


@pytest.mark.parametrize("value", ["/usr/lib:/opt/lib", "C.UTF-8", "http://host/docs?page=2&zipcode=1",
                                   "4", "/root/.cache/torch"])
def test_scrub_env_keeps_harmless_values(value):
    assert isolation.scrub_env({"TORCH_HOME": value}) == {"TORCH_HOME": value}


@pytest.mark.parametrize("name", ["PYTHON_SECRET", "TORCH_HUB_TOKEN", "OMP_PASSWORD", "LC_API_KEY",
                                  "PYTORCH_S3_KEY", "TORCH_SESSION", "PYTHONBREAKPOINT", "PYTHONSTARTUP",
                                  "PYTHONINSPECT", "PYTHONHOME", "PYTHONUSERBASE", "PYTHONEXECUTABLE",
                                  "LD_PRELOAD", "LD_AUDIT"])
def test_scrub_env_drops_secret_names_and_code_hooks_under_kept_prefixes(name):
    assert isolation.scrub_env({name: "x"}) == {}


def test_env_is_clean():
    assert isolation.env_is_clean({"PATH": "/bin"})
    assert not isolation.env_is_clean({"PATH": "/bin", "AWS_SECRET_ACCESS_KEY": "x"})


def test_plan_masks_binds_back_only_what_is_needed(tmp_path, monkeypatch):
    home = tmp_path / "home"
    (home / "py" / "lib").mkdir(parents=True)
    (home / "py" / "site").mkdir()
    (home / ".aws").mkdir()
    open_dir = tmp_path / "open"
    open_dir.mkdir()
    # Only `home` is closed to others (pytest's own tmp root is 0700 too: leave it out of the picture).
    monkeypatch.setattr(isolation, "traversable_by_others", lambda p: os.path.realpath(p) != str(home))
    plan = isolation.plan_masks([str(home / "py" / "lib"), str(home / "py" / "site"), str(home / "py"),
                                 str(open_dir), str(tmp_path / "missing")])
    assert plan == {str(home): [str(home / "py")]}  # outermost needed dir only; .aws stays hidden


def test_plan_masks_on_real_modes(tmp_path):
    closed = tmp_path / "closed"
    (closed / "lib").mkdir(parents=True)
    os.chmod(closed, 0o700)
    plan = isolation.plan_masks([str(closed / "lib")])
    (blocked, keep), = plan.items()
    assert keep == [str(closed / "lib")] and str(closed).startswith(blocked)


def test_server_environment_is_scrubbed(monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "canary")
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    env = runner._server_env(["/src"])
    assert "AWS_SECRET_ACCESS_KEY" not in env and "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD" not in env
    assert env["PYTHONPATH"] == "/src" and env["PYTHONSAFEPATH"] == "1"


def test_worker_pythonpath_never_includes_the_cache_or_cwd(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    (cache / "pkg").mkdir(parents=True)
    extra = tmp_path / "extra"
    extra.mkdir()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.path", [str(tmp_path), str(cache / "pkg"), str(extra), ""])
    path = runner._worker_pythonpath(os.path.realpath(os.sys.executable), Settings(cache_dir=cache))
    assert str(extra) in path
    assert str(cache / "pkg") not in path and str(tmp_path) not in path


# --- classification --------------------------------------------------------------------------------


class _FakeCgroup:
    def __init__(self, oom: int = 0, peak: int = 0):
        self._oom, self._peak = oom, peak
        self.limit, self.version, self.path = 2**30, 1, Path("/nonexistent")

    def oom_kills(self) -> int:
        return self._oom

    def peak(self) -> int:
        return self._peak


def _run(events=(), *, cgroup=None, result=b"", **state) -> runner._SupervisedJob:
    job = LoadJob(root="/m", files=(("m.pt", "torch-zip"),), timeout_s=5, cpu_s=10, memory_bytes=2**30)
    r = runner._SupervisedJob(job, Settings(), runner.DEFAULT_ENTRY)
    r.events = [{"ev": "isolated", "iso": {"net_namespace": True}}, *events]
    r.cgroup = cgroup
    r.result_buf = bytearray(result)
    for k, v in state.items():
        setattr(r, k, v)
    return r


def _code(r: runner._SupervisedJob) -> ReasonCode | None:
    res = r.classify()
    assert len(res.findings) == 1, res.findings
    return res.findings[0].code


def test_a_clean_result_passes_through_with_the_parents_isolation():
    body = b'{"findings": [], "runtime": {"torch": "9"}, "isolation": {"net_namespace": false, "x": 1}}'
    r = _run([{"ev": "exit", "code": 0}], result=body, peak_anon=123)
    res = r.classify()
    assert res.findings == () and res.runtime == {"torch": "9"}
    # The parent's view wins; the worker's own isolation claims are dropped altogether.
    assert res.isolation["net_namespace"] is True and "x" not in res.isolation
    assert res.isolation["seccomp"] is False  # nothing measured it (no "armed" event)
    assert res.peak_anon_bytes == 123


def test_measured_facts_win_over_what_the_worker_says():
    body = b'{"findings": [], "isolation": {"seccomp": true, "unprivileged_user": true}}'
    r = _run([{"ev": "armed", "facts": {"seccomp": False, "no_new_privs": True, "unprivileged_user": False}},
              {"ev": "exit", "code": 0}], result=body)
    iso = r.classify().isolation
    assert iso["seccomp"] is False and iso["unprivileged_user"] is False and iso["no_new_privs"] is True
    r = _run([{"ev": "armed", "facts": {"seccomp": True, "no_new_privs": True, "unprivileged_user": True}},
              {"ev": "exit", "code": 0}], result=b'{"findings": []}')
    iso = r.classify().isolation
    assert iso["seccomp"] is True and "socket" in iso["seccomp_refused"] and "clone3 (ENOSYS)" in iso["seccomp_refused"]
    assert "any syscall outside the allowlist (ENOSYS)" in iso["seccomp_refused"]


def test_measured_facts_from_proc_status():
    facts = isolation.measured_facts({"Uid": "65534\t65534\t65534\t65534", "Seccomp": "2", "NoNewPrivs": "1",
                                      "CapEff": "0000000000000000"})
    assert facts == {"uid": 65534, "unprivileged_user": True, "no_new_privs": True, "seccomp": True,
                     "capabilities_effective": False}
    facts = isolation.measured_facts({"Uid": "0\t0\t0\t0", "Seccomp": "0", "NoNewPrivs": "0", "CapEff": "1ff"})
    assert not facts["unprivileged_user"] and not facts["seccomp"] and facts["capabilities_effective"]
    own = isolation.proc_status("self")
    assert own["Pid"] == str(os.getpid()) and "Seccomp" in own


@pytest.mark.parametrize(("events", "state", "cgroup", "code", "needle"), [
    ([{"ev": "exit", "signal": 9, "cpu_s": 0.3}], {}, _FakeCgroup(oom=1, peak=2**30), ReasonCode.RESOURCE_LIMIT,
     "memory limit of 1.0 GiB"),
    ([{"ev": "exit", "signal": 9, "cpu_s": 0.3}], {"deadline_hit": True}, None, ReasonCode.TIMEOUT, "5 s deadline"),
    ([{"ev": "exit", "signal": int(signal.SIGXCPU), "cpu_s": 10.0}], {}, None, ReasonCode.TIMEOUT, "SIGXCPU"),
    ([{"ev": "exit", "signal": 9, "cpu_s": 11.0}], {}, None, ReasonCode.TIMEOUT, "CPU budget"),
    ([{"ev": "exit", "signal": 11, "cpu_s": 0.1}], {}, None, ReasonCode.WORKER_CRASH, "SIGSEGV"),
    ([{"ev": "exit", "signal": 6, "cpu_s": 0.1}], {}, None, ReasonCode.WORKER_CRASH, "SIGABRT"),
    ([{"ev": "exit", "signal": 7, "cpu_s": 0.1}], {}, None, ReasonCode.WORKER_CRASH, "SIGBUS"),
    ([{"ev": "exit", "signal": 9, "cpu_s": 0.1}], {}, _FakeCgroup(oom=0), ReasonCode.WORKER_LOST, "SIGKILL"),
    ([{"ev": "exit", "signal": 15, "cpu_s": 0.1}], {}, None, ReasonCode.WORKER_LOST, "SIGTERM"),
    ([{"ev": "exit", "code": 1}], {}, None, ReasonCode.INTERNAL_ERROR, "status 1"),
    ([{"ev": "exit", "code": child.SETUP_FAILED}], {}, None, ReasonCode.INTERNAL_ERROR, "isolation"),
    ([{"ev": "exit", "code": child.LOADER_RAISED}], {}, None, ReasonCode.INTERNAL_ERROR, "raised"),
    ([{"ev": "exit", "code": 0}], {}, None, ReasonCode.INTERNAL_ERROR, "no result"),
    ([{"ev": "exit", "code": 0}], {"result_overflow": True}, None, ReasonCode.INTERNAL_ERROR, "exceeded"),
    ([{"ev": "error", "msg": "isolation setup failed: boom"}], {}, None, ReasonCode.INTERNAL_ERROR, "boom"),
    ([], {"server_lost": True}, None, ReasonCode.WORKER_LOST, "fork server died"),
    ([], {"supervisor_status": 9}, None, ReasonCode.WORKER_LOST, "SIGKILL"),
    ([], {"stuck": True}, None, ReasonCode.WORKER_LOST, "could not be killed"),
    ([], {"supervisor_status": 256}, None, ReasonCode.INTERNAL_ERROR, "without reporting"),
])
def test_outcomes(events, state, cgroup, code, needle):
    r = _run(events, cgroup=cgroup, **state)
    res = r.classify()
    assert [f.code for f in res.findings] == [code]
    f = res.findings[0]
    assert needle in f.message, f.message
    assert res.isolation["net_namespace"] is True and res.isolation["env_stripped"] is True


_BIG = 10**6


@pytest.mark.parametrize("body", [
    b"{not json", b'{"findings": "nope"}', b"[]", b'"pass"',
    # forged verdicts: unknown codes, severities and keys
    b'{"findings": [{"code": "PASS", "message": "ok"}]}',
    b'{"findings": [{"code": null, "message": "ok", "severity": "override"}]}',
    b'{"findings": [], "verdict": "pass"}',
    b'{"findings": [{"code": null, "message": "m", "verdict": "pass"}]}',
    b'{"findings": [{"code": null, "message": 5}]}',
    # oversized and out of range
    b'{"findings": [' + b",".join([b'{"code": null, "message": "m"}'] * 201) + b"]}",
    b'{"findings": [], "timings_s": {"load": -1}}',
    b'{"findings": [], "timings_s": {"load": 1e300}}',
    b'{"findings": [], "timings_s": {"load": NaN}}',
    b'{"findings": [], "peak_anon_bytes": 1e30}',
    b'{"findings": [], "peak_anon_bytes": "big"}',
    b'{"findings": [], "runtime": {"torch": {"nested": 1}}}',
    b'{"findings": [], "info": {"n": 1' + b"0" * 30 + b"}}",
    b'{"findings": [], "info": ' + b'{"a": ' * 12 + b"1" + b"}" * 12 + b"}",
    b'{"findings": [], "info": {"layers": [' + b",".join([b"1"] * 200_001) + b"]}}",
    b"[" * 100_000 + b"]" * 100_000,
])
def test_a_malformed_or_forged_result_is_never_a_pass(body):
    res = _run([{"ev": "exit", "code": 0}], result=body).classify()
    assert [f.code for f in res.findings] == [ReasonCode.WORKER_CRASH], res.findings
    assert "malformed" in res.findings[0].message and res.findings[0].hint


def test_strings_from_the_worker_are_capped_and_escaped():
    msg = "\x1b[2J\x1b]0;owned\x07 quarantine?\u202e" + "x" * 5000
    import json as _json

    body = _json.dumps({"findings": [{"code": "SHAPE_MISMATCH", "message": msg, "hint": "h\r\nINJECTED: 1",
                                      "file": "a\x00b", "detail": {"k\x1b": ["\x1b[31m"]}}],
                        "runtime": {"torch": "2.13\x1b[0m"}, "info": {"layers": {"w\n": {"shape": [2]}}}}).encode()
    res = _run([{"ev": "exit", "code": 0}], result=body).classify()
    (f,) = res.findings
    assert f.code is ReasonCode.SHAPE_MISMATCH
    assert len(f.message) <= runner.MAX_TEXT and "\x1b" not in f.message and "\u202e" not in f.message
    assert "\\x1b[2J" in f.message and f.message.endswith("…")
    assert "\r" not in f.hint and "\n" not in f.hint and "\x00" not in (f.file or "")
    assert "\x1b" not in str(f.detail) and "\x1b" not in res.runtime["torch"]
    assert list(res.info["layers"]) == ["w\\n"]


def test_a_report_that_contradicts_the_scan_is_a_worker_crash():
    job = LoadJob(root="/x", files=(("m.safetensors", "safetensors"),), timeout_s=5, cpu_s=10,
                  memory_bytes=2**30, expected={"tensors": {"w": {"shape": [2, 2], "dtype": "float32"}}})
    layers_ok = {"w": {"shape": [2, 2], "dtype": "float32"}}
    for layers, ok in ((layers_ok, True), ({"w": {"shape": [4], "dtype": "float32"}}, False),
                       ({"w": {"shape": [2, 2], "dtype": "float16"}}, False),
                       ({**layers_ok, "extra": {"shape": [1], "dtype": "float32"}}, False), ({}, False)):
        import json as _json

        body = _json.dumps({"findings": [], "info": {"model_kind": "state_dict", "layers": layers}}).encode()
        r = runner._SupervisedJob(job, Settings(), runner.DEFAULT_ENTRY)
        r.events = [{"ev": "exit", "code": 0}]
        r.result_buf = bytearray(body)
        res = r.classify()
        assert [f.code for f in res.findings] == ([] if ok else [ReasonCode.WORKER_CRASH]), (layers, res.findings)


def test_the_stderr_tail_travels_in_the_detail():
    r = _run([{"ev": "exit", "code": 3}])
    r.stderr_tail = bytearray(b"Traceback: something broke\n")
    res = r.classify()
    assert "something broke" in res.findings[0].message
    assert "something broke" in res.findings[0].detail["stderr_tail"]


def test_memory_cgroup_reports_why_it_is_unavailable(tmp_path):
    cg, why = isolation.MemoryCgroup.create("x", 2**30, parent=str(tmp_path / "no" / "such"))
    assert cg is None and why


def test_memory_cgroup_v2_files(tmp_path):
    """cgroup v2 (Kubernetes nodes) cannot be exercised on the v1 build machine: check the files it
    writes and reads on a fake tree."""
    root = tmp_path / "cg"
    base = root / "ckpt-stage"
    base.mkdir(parents=True)
    (root / "cgroup.controllers").write_text("cpu memory pids\n")
    (root / "cgroup.subtree_control").write_text("")
    (base / "cgroup.subtree_control").write_text("memory\n")
    cg, why = isolation.MemoryCgroup.create("job1", 512 * 2**20, parent=str(base))
    assert cg is not None, why
    assert cg.version == 2 and cg.procs_file == str(base / "job1" / "cgroup.procs")
    assert (base / "job1" / "memory.max").read_text() == str(512 * 2**20)
    assert (base / "job1" / "memory.swap.max").read_text() == "0"
    assert (root / "cgroup.subtree_control").read_text() == "+memory"
    (base / "job1" / "memory.events").write_text("low 0\nhigh 0\nmax 12\noom 1\noom_kill 1\n")
    (base / "job1" / "memory.peak").write_text(str(600 * 2**20))
    assert cg.oom_kills() == 1 and cg.peak() == 600 * 2**20
    for f in (base / "job1").iterdir():
        f.unlink()
    assert cg.remove(wait_s=0)


def test_memory_cgroup_v1_counters(tmp_path):
    cg = isolation.MemoryCgroup(tmp_path, 1, 2**30)
    (tmp_path / "memory.oom_control").write_text("oom_kill_disable 0\nunder_oom 0\noom_kill 3\n")
    (tmp_path / "memory.max_usage_in_bytes").write_text("1073741824\n")
    assert cg.oom_kills() == 3 and cg.peak() == 2**30
    (tmp_path / "memory.oom_control").write_text("oom_kill_disable 0\nunder_oom 0\n")  # kernel < 4.13
    (tmp_path / "memory.failcnt").write_text("0\n")
    assert cg.oom_kills() == 0


def test_shutdown_is_idempotent():
    runner.shutdown()
    runner.shutdown()


def test_a_pass_without_the_scanned_layer_table_is_refused():
    """Where the scan read a state_dict's tensors, a passing answer that leaves out the layer table or
    names another model kind is a worker that skipped (or forged) the load: WORKER_CRASH. An answer that
    does not pass anyway needs no comparison."""
    from ckpt_stage.domain import Finding

    job = LoadJob(root="/x", files=(), expected={"tensors": {"w": {"shape": [2], "dtype": "float32"}}})
    good = {"model_kind": "state_dict", "layers": {"w": {"shape": [2], "dtype": "float32"}}}
    assert runner.cross_check(job, LoadResult(info=good)) == []
    for info in ({}, {"model_kind": "torch-export", "layers": good["layers"]}, {"model_kind": "state_dict"}):
        (f,) = runner.cross_check(job, LoadResult(info=info))
        assert f.code is ReasonCode.WORKER_CRASH and "does not match the static scan" in f.message, info
    blocked = LoadResult(findings=(Finding(ReasonCode.NONFINITE_WEIGHTS, "nan"),))
    assert runner.cross_check(job, blocked) == []


def test_the_seccomp_allowlist_covers_a_load_and_nothing_it_refuses():
    """The syscalls the worker made after its filter was loaded, traced (strace -f on the fork server)
    over every corpus case, are all allowed; nothing is both allowed and refused by name."""
    traced = {"brk", "clone", "close", "exit_group", "fadvise64", "fstat", "futex", "getcwd", "getdents64",
              "getpid", "getrandom", "ioctl", "kill", "lseek", "mkdir", "mmap", "mprotect", "mremap", "munmap",
              "newfstatat", "openat", "prctl", "read", "readlink", "rt_sigaction", "rt_sigprocmask",
              "sched_getaffinity", "seccomp", "statx", "unlink", "write", "set_robust_list", "rseq", "gettid",
              "rt_sigreturn", "madvise", "exit"}
    allow, deny = set(isolation.SECCOMP_ALLOW), set(isolation.SECCOMP_DENY)
    assert traced - {"clone"} <= allow, traced - allow
    assert not allow & deny, allow & deny
    assert {"clone", "clone3", "personality", "socket"}.isdisjoint(allow)
