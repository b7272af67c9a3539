"""Parent side of the worker: run one ``LoadJob`` in a throw-away process, always return a result.

Lifecycle: start → (child loads and checks, writes its result) → stop. ``stop`` never raises and
always runs; a child that dies or overruns becomes a finding, never an exception in the parent.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

from ckpt_stage.config import Settings
from ckpt_stage.domain import Finding, ReasonCode
from ckpt_stage.sandbox.job import LoadJob, LoadResult


def run_job(job: LoadJob, settings: Settings) -> LoadResult:
    python = settings.worker_python or sys.executable
    with tempfile.TemporaryDirectory(prefix="ckpt-stage-worker-") as tmp:
        out = os.path.join(tmp, "result.json")
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MLFLOW_", "TORCH_FORCE"))}
        proc = subprocess.Popen(
            [python, "-m", "ckpt_stage.sandbox.child", out],
            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            cwd=tmp, env=env, start_new_session=True,
        )
        try:
            _, err = proc.communicate(json.dumps(job.to_dict()).encode(), timeout=job.timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait()
            return LoadResult(findings=(Finding(ReasonCode.TIMEOUT, f"loading ran past its {job.timeout_s:.0f} s deadline",
                                                "make the model load faster or raise CKPT_STAGE_WORKER_TIMEOUT_S"),))
        if proc.returncode == 0 and os.path.exists(out):
            with open(out) as fh:
                return LoadResult.from_dict(json.load(fh))
        tail = err.decode(errors="replace")[-2000:]
        if proc.returncode < 0:
            return LoadResult(findings=(Finding(ReasonCode.WORKER_CRASH, f"the worker died by signal {-proc.returncode}",
                                                "the checkpoint crashes the loader; check the file", detail={"stderr": tail}),))
        return LoadResult(findings=(Finding(ReasonCode.INTERNAL_ERROR, f"the worker exited with status {proc.returncode}: {tail[-500:]}"),))
