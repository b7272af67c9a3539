"""``ckpt-stage demo``: the whole stage on embedded defaults.

Starts an S3 API server on loopback and an ``mlflow server`` on SQLite inside the demo folder,
registers sample versions (good and bad), validates them through the Airflow DAG with ``dag.test()``
on a SQLite Airflow home, and prints the verdicts.
"""

from __future__ import annotations

import json
import os
import textwrap
import shutil
import sys
import time
from pathlib import Path

from ckpt_stage.dev import devstack, samples
from ckpt_stage.registry.tags import ATTEMPT


def _say(text: str) -> None:
    print(text, flush=True)


def run_demo(workdir: Path, *, keep_running: bool = False) -> int:
    from rich.console import Console
    from rich.table import Table

    t0 = time.perf_counter()
    if workdir.exists():
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True)
    _say(f"ckpt-stage demo: working in {workdir}")
    with devstack.local_stack(workdir / "servers", backend="sqlite") as stack:
        _say(f"  S3 API server   {stack.s3.url} (bucket {stack.bucket!r})")
        _say(f"  MLflow server   {stack.mlflow.url} (SQLite: {workdir / 'servers' / 'mlflow.db'})")
        os.environ.update(stack.env)
        os.environ["CKPT_STAGE_CACHE_DIR"] = str(workdir / "cache")
        expected = {}
        for sample in samples.DEMO_SAMPLES:
            folder = workdir / "samples" / sample.name
            tags = sample.build(folder)
            ref = devstack.register_folder(stack.bucket, sample.name, folder, tags)
            expected[ref] = sample
            _say(f"  registered {ref.name} v{ref.version}: {sample.description}")

        airflow_home = workdir / "airflow"
        env = devstack.airflow_env(airflow_home, {**os.environ})
        _say(f"  preparing Airflow (SQLite metadata DB in {airflow_home}) ...")
        devstack.airflow_prepare(airflow_home, env)
        _create_pools(airflow_home, env)
        _say("  running DAG ckpt_stage_validate with dag.test() ...")
        proc = devstack.airflow_dag_test("ckpt_stage_validate", env)
        (workdir / "dag-test.log").write_text(proc.stdout + proc.stderr)
        if proc.returncode != 0:
            _say(f"dag.test() failed (exit {proc.returncode}); log: {workdir / 'dag-test.log'}")
            _say((proc.stdout + proc.stderr)[-3000:])
            return 1

        from ckpt_stage.config import Settings
        from ckpt_stage.registry import Registry

        registry = Registry(Settings.from_env())
        table = Table(title="ckpt-stage verdicts", show_lines=False)
        for col in ("model", "version", "status", "reasons", "expected", "summary"):
            table.add_column(col, overflow="fold")
        ok = True
        for ref, sample in expected.items():
            state = registry.get(ref)
            status = state.status.value if state.status else "-"
            want = {"pass": "promoted", "quarantine": "quarantined"}[sample.expect_verdict]
            match = status == want and all(c in state.reasons for c in sample.expect_codes)
            ok = ok and match
            table.add_row(ref.name, ref.version, status, ",".join(state.reasons) or "-",
                          ("✓ " if match else "✗ ") + want, textwrap.shorten(state.summary, 200, placeholder=" …"))
        Console(file=sys.stdout, width=160).print(table)
        alias = {ref.name: registry.alias_version(ref.name) for ref in expected}
        _say("  alias 'validated': " + ", ".join(f"{k}→v{v}" for k, v in alias.items() if v))
        ok = _demo_rerun(workdir, env, registry, expected) and ok
        _say(f"\nDone in {time.perf_counter() - t0:.0f} s. Data folder: {workdir}")
        _say("Look at the verdicts, reports and runs in the MLflow UI (tags and runs; the S3 server stops "
             "with the demo):")
        _say(f"  .venv/bin/mlflow ui --backend-store-uri sqlite:///{workdir / 'servers' / 'mlflow.db'} --port 5000")
        _say("List them from the terminal the same way:")
        _say(f"  MLFLOW_TRACKING_URI=sqlite:///{workdir / 'servers' / 'mlflow.db'} .venv/bin/ckpt-stage ls")
        if keep_running:
            _say(f"Servers stay up until Ctrl-C: MLflow UI at {stack.mlflow.url}")
            try:
                while True:
                    time.sleep(3600)
            except KeyboardInterrupt:
                pass
        return 0 if ok else 1


def _create_pools(airflow_home: Path, env: dict[str, str]) -> None:
    """One Airflow pool per worker class (tasks in a missing pool are never scheduled)."""
    import json
    import subprocess

    from ckpt_stage import orchestrate
    from ckpt_stage.config import Settings

    pools = airflow_home / "pools.json"
    pools.write_text(json.dumps(orchestrate.pool_definitions(Settings.from_env(env))))
    proc = subprocess.run([devstack._bin("airflow"), "pools", "import", str(pools)], env=env, capture_output=True,
                          text=True, timeout=300)
    if proc.returncode != 0:
        raise RuntimeError(f"airflow pools import failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")


def _demo_rerun(workdir: Path, env: dict[str, str], registry, expected: dict) -> bool:
    """Re-run one quarantined sample by hand through DAG ckpt_stage_rerun: a new attempt, history kept."""
    from ckpt_stage import orchestrate

    quarantined = [ref for ref, sample in expected.items() if sample.expect_verdict == "quarantine"]
    if not quarantined:
        return True
    ref = quarantined[0]
    before = registry.get(ref)
    conf = {"model": ref.name, "versions": [ref.version]}
    _say(f"\n  manual re-run of {ref.name} v{ref.version} (status {before.status.value if before.status else '-'}, "
         f"attempt {before.attempt}) through DAG {orchestrate.RERUN_DAG_ID}:")
    _say(f"    airflow dags test {orchestrate.RERUN_DAG_ID} --conf '{json.dumps(conf)}'")
    proc = devstack.airflow_dag_test(orchestrate.RERUN_DAG_ID, env, conf)
    (workdir / "dag-test-rerun.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        _say(f"  re-run failed (exit {proc.returncode}); log: {workdir / 'dag-test-rerun.log'}")
        _say((proc.stdout + proc.stderr)[-3000:])
        return False
    after = registry.get(ref)
    _say(f"    attempt {before.attempt} → {after.attempt}; status {after.status.value if after.status else '-'}, "
         f"reasons {','.join(after.reasons) or '-'}")
    attempts = sorted(registry.attempts(ref), key=lambda r: int(r["tags"].get(ATTEMPT, 0)))
    for run in attempts:
        tags = run["tags"]
        _say(f"    history: attempt {tags.get('ckpt_stage.attempt')} → {tags.get('ckpt_stage.verdict')} "
             f"({tags.get('ckpt_stage.reasons') or '-'}), MLflow run {run['run_id']}")
    return after.attempt == before.attempt + 1 and len(attempts) == after.attempt
