"""What validation costs on top of the download, side by side in one run, JSON out (issue 16).

For each checkpoint size, per repetition and interleaved so the machine's load hits all alike:

- ``raw``: one boto3 GET of the file streamed to disk, same client settings as the stage;
- ``naive``: a fresh interpreter doing ``download_file`` + ``torch.load(weights_only=True)`` + build the
  module + ``load_state_dict`` + one forward pass (what a serving host does without the stage);
- ``stage``: ``ckpt-stage validate --json`` as the fresh process a user runs, and
  ``pipeline.validate_version`` in-process (warm fork server), each on its own registered version.

Every version is registered with ``create_model_version`` on files uploaded once. Medians are reported.
``floor_ratio`` = stage / raw (target ≤ 1.15 at 256 MiB and 1 GiB: validation nearly free beyond the
transfer), ``ratio`` = stage / naive (target ≤ 0.85). ``fixed_cost_s`` is a tiny version in-process
with a warm fork server, ``cli_fixed_cost_s`` the same as a fresh ``ckpt-stage validate`` process.
First validations run with the host's object cache off (a new version's files are never in it);
``rerun_inprocess_s`` is a forced re-run of an unchanged version with the cache on (``ckpt_stage.cache``).
``--backlog N`` registers N tiny versions at once and times one ``ckpt-stage sweep`` deciding them
(MLflow on PostgreSQL when a server answers on 127.0.0.1:5432), then an idle sweep over them.

    python -m bench.overhead [--sizes 64M,256M,1G] [--repeat 1] [--backlog 200] [--json] [--out FILE]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from ckpt_stage.dev import devstack
from ckpt_stage.registry.tags import ARCH, ARCH_KWARGS

_NAIVE = r"""
import sys, threading, time
peak = [0]
def sample():
    while True:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("RssAnon:"):
                    peak[0] = max(peak[0], int(line.split()[1]) * 1024)
        time.sleep(0.01)
threading.Thread(target=sample, daemon=True).start()
import boto3, torch
bucket, key, path, side = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
boto3.client("s3").download_file(bucket, key, path)
sd = torch.load(path, weights_only=True, map_location="cpu")
m = torch.nn.Linear(side, side)
m.load_state_dict(sd)
with torch.no_grad():
    m(torch.zeros(1, side))
time.sleep(0.02)
print(peak[0])
"""


def parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?)i?B?\s*", text, re.IGNORECASE)
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (use e.g. 64M, 1G, 4096)")
    return int(float(m.group(1)) * {"": 1, "K": 2**10, "M": 2**20, "G": 2**30}[m.group(2).upper()])


def make_checkpoint(folder: Path, size: int) -> tuple[int, dict[str, str]]:
    import torch

    folder.mkdir(parents=True, exist_ok=True)
    side = max(2, int((size / 4) ** 0.5))
    torch.manual_seed(0)
    torch.save(torch.nn.Linear(side, side, bias=True).state_dict(), folder / "model.pt")
    return side, {ARCH: "torch.nn:Linear",
                  ARCH_KWARGS: json.dumps({"in_features": side, "out_features": side})}


class Bench:
    def __init__(self, stack: devstack.Stack, tmp: Path) -> None:
        from mlflow import MlflowClient

        from ckpt_stage.config import Settings
        from ckpt_stage.storage import S3Storage

        self.stack, self.tmp = stack, tmp
        # A new version is a first validation: nothing in the host's object cache. Re-runs, which read
        # it, are timed apart (``rerun_inprocess_s``) with the cache on.
        self.env = {**os.environ, **stack.env, "CKPT_STAGE_CACHE_MAX_BYTES": "0"}
        self.cached_settings = Settings.from_env()
        self.settings = self.cached_settings.replace(cache_max_bytes=0)
        self.storage = S3Storage(self.settings)
        self.client = MlflowClient()

    def upload(self, name: str, folder: Path) -> str:
        from ckpt_stage.storage import S3Location

        prefix = f"uploads/{name}/{uuid.uuid4().hex[:12]}"
        self.storage.upload_dir(folder, S3Location(self.stack.bucket, prefix))
        with contextlib.suppress(Exception):
            self.client.create_registered_model(name)
        return prefix

    def register(self, name: str, prefix: str, tags: dict[str, str]):
        from ckpt_stage.domain import VersionRef

        mv = self.client.create_model_version(name, source=f"s3://{self.stack.bucket}/{prefix}", tags=tags)
        return VersionRef(name, str(mv.version))

    def raw(self, key: str) -> float:
        from ckpt_stage.storage import CHUNK

        path = self.tmp / f"raw-{uuid.uuid4().hex}"
        t0 = time.perf_counter()
        body = self.storage.client.get_object(Bucket=self.stack.bucket, Key=key)["Body"]
        with path.open("wb") as fh:
            for chunk in body.iter_chunks(CHUNK):
                fh.write(chunk)
        dt = time.perf_counter() - t0
        path.unlink()
        return dt

    def naive(self, key: str, side: int) -> tuple[float, int]:
        path = self.tmp / f"naive-{uuid.uuid4().hex}"
        t0 = time.perf_counter()
        out = subprocess.run([sys.executable, "-c", _NAIVE, self.stack.bucket, key, str(path), str(side)],
                             env=self.env, capture_output=True, text=True, check=True)
        dt = time.perf_counter() - t0
        path.unlink(missing_ok=True)
        return dt, int(out.stdout.split()[-1])

    def cli(self, *args: str) -> tuple[float, Any]:
        t0 = time.perf_counter()
        out = subprocess.run([sys.executable, "-m", "ckpt_stage.cli", *args, "--json"], env=self.env,
                             capture_output=True, text=True)
        dt = time.perf_counter() - t0
        if out.returncode not in (0, 1, 3):
            raise RuntimeError(f"ckpt-stage {' '.join(args)} exited {out.returncode}:\n{out.stderr[-3000:]}")
        return dt, json.loads(out.stdout)

    def stage_cli(self, ref) -> tuple[float, int]:
        dt, rep = self.cli("validate", "--model", ref.name, "--version", ref.version)
        assert rep["verdict"] == "pass", rep["reasons"]
        return dt, int(rep["resources"]["peak_anon_bytes"])

    def stage_inprocess(self, ref, *, rerun: bool = False) -> float:
        """``validate_version`` of ``ref``; ``rerun``: a forced re-run with the object cache on, after a
        first validation that filled it (what ``rerun --status promoted`` costs after an upgrade)."""
        from ckpt_stage.pipeline import validate_version

        settings = self.cached_settings if rerun else self.settings
        if rerun:
            validate_version(ref, settings=settings)
        t0 = time.perf_counter()
        out = validate_version(ref, settings=settings, force=rerun)
        dt = time.perf_counter() - t0
        assert out.report is not None and out.report.verdict.value == "pass", out.report
        if not rerun:
            self.last_timings = {k: round(float(v), 3) for k, v in out.report.timings_s.items()}
        return dt


def run_sizes(b: Bench, sizes: list[int], repeat: int, log) -> list[dict[str, Any]]:
    rows = []
    for size in sizes:
        name = f"bench-{size}"
        folder = b.tmp / name
        side, tags = make_checkpoint(folder, size)
        real = (folder / "model.pt").stat().st_size
        prefix = b.upload(name, folder)
        (folder / "model.pt").unlink()
        key = f"{prefix}/model.pt"
        runs: dict[str, list[float]] = {k: [] for k in ("raw", "naive", "stage", "inproc", "rerun", "s_anon",
                                                        "n_anon")}
        for _ in range(repeat):
            runs["raw"].append(b.raw(key))
            dt, anon = b.naive(key, side)
            runs["naive"].append(dt)
            runs["n_anon"].append(anon)
            dt, anon = b.stage_cli(b.register(name, prefix, tags))
            runs["stage"].append(dt)
            runs["s_anon"].append(anon)
            runs["inproc"].append(b.stage_inprocess(b.register(name, prefix, tags)))
            runs["rerun"].append(b.stage_inprocess(b.register(name, prefix, tags), rerun=True))
        med = {k: statistics.median(v) for k, v in runs.items()}
        row = {"size_bytes": real, "raw_s": round(med["raw"], 3), "naive_s": round(med["naive"], 3),
               "stage_s": round(med["stage"], 3), "stage_inprocess_s": round(med["inproc"], 3),
               "rerun_inprocess_s": round(med["rerun"], 3),
               "floor_ratio": round(med["stage"] / med["raw"], 3),
               "ratio": round(med["stage"] / med["naive"], 3),
               "stage_peak_anon_bytes": int(med["s_anon"]), "naive_peak_anon_bytes": int(med["n_anon"]),
               "repeat": repeat,
               # the last in-process attempt's own phases (registry round trips are total minus the rest)
               "stage_timings_s": getattr(b, "last_timings", {})}
        log(json.dumps(row))
        rows.append(row)
    return rows


@contextlib.contextmanager
def counting_http(calls: list[str]):
    """Every HTTP request MLflow's client makes (it uses requests; boto3 does not), as "METHOD path"."""
    import requests
    from urllib.parse import urlparse

    real = requests.Session.request

    def request(self, method, url, *args, **kwargs):
        calls.append(f"{method} {urlparse(url).path}")
        return real(self, method, url, *args, **kwargs)

    requests.Session.request = request  # type: ignore[method-assign]
    try:
        yield
    finally:
        requests.Session.request = real  # type: ignore[method-assign]


def fixed_costs(b: Bench, repeat: int, log) -> tuple[float, float, int]:
    folder = b.tmp / "bench-tiny"
    _, tags = make_checkpoint(folder, 64)
    prefix = b.upload("bench-tiny", folder)
    b.stage_inprocess(b.register("bench-tiny", prefix, tags))  # warms the fork server
    calls: list[str] = []
    ref = b.register("bench-tiny", prefix, tags)
    with counting_http(calls):
        b.stage_inprocess(ref)
    log(json.dumps({"mlflow_requests_per_version": len(calls), "requests": calls}))
    inproc = [b.stage_inprocess(b.register("bench-tiny", prefix, tags)) for _ in range(max(3, repeat))]
    cli = [b.stage_cli(b.register("bench-tiny", prefix, tags))[0] for _ in range(max(3, repeat))]
    return statistics.median(inproc), statistics.median(cli), len(calls)


def backlog(tmp: Path, n: int, concurrency: int | None, log) -> dict[str, Any]:
    backend = "postgresql" if devstack.postgres_available() else "sqlite"
    with devstack.local_stack(tmp / "backlog-servers", backend=backend) as stack:
        saved = dict(os.environ)
        os.environ.update(stack.env)
        try:
            b = Bench(stack, tmp)
            folder = tmp / "backlog-tiny"
            _, tags = make_checkpoint(folder, 64)
            prefix = b.upload("backlog", folder)
            t0 = time.perf_counter()
            for _ in range(n):
                b.register("backlog", prefix, tags)
            register_s = time.perf_counter() - t0
            if concurrency:
                b.env["CKPT_STAGE_SWEEP_CONCURRENCY"] = str(concurrency)
            seconds, out = b.cli("sweep")
            decided = len(out) if isinstance(out, list) else len(out.get("results", out.get("versions", [])))
            idle_s, _ = b.cli("sweep")
        finally:
            os.environ.clear()
            os.environ.update(saved)
    row = {"versions": n, "seconds": round(seconds, 3), "versions_per_s": round(n / seconds, 2),
           "decided": decided, "idle_sweep_s": round(idle_s, 3), "register_s": round(register_s, 3),
           "backend": backend, "concurrency": concurrency}
    log(json.dumps({"backlog": row}))
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="64M,256M", help="comma-separated sizes (64M, 1G, …); empty for none")
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--backlog", type=int, default=0, help="tiny versions decided by one sweep (0: skip)")
    ap.add_argument("--concurrency", type=int, default=None, help="CKPT_STAGE_SWEEP_CONCURRENCY for the backlog")
    ap.add_argument("--json", action="store_true", help="print only the JSON document on stdout")
    ap.add_argument("--out", default="bench/results/overhead.json")
    args = ap.parse_args(argv)
    # A SIGTERM (timeout, Ctrl-C from a wrapper) unwinds the stacks, so the servers stop with us.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    sizes = [parse_size(s) for s in args.sizes.split(",") if s.strip()]

    def log(line: str) -> None:
        print(line, file=sys.stderr if args.json else sys.stdout, flush=True)

    doc: dict[str, Any] = {"schema": "ckpt-stage/bench-overhead/v1"}
    with tempfile.TemporaryDirectory(prefix="ckpt-bench-") as tmpdir:
        tmp = Path(tmpdir)
        saved = dict(os.environ)
        with devstack.local_stack(tmp / "servers") as stack:
            os.environ.update(stack.env)
            os.environ["CKPT_STAGE_CACHE_DIR"] = str(tmp / "cache")
            try:
                b = Bench(stack, tmp)
                fixed, cli, n_calls = fixed_costs(b, args.repeat, log)
                doc["fixed_cost_s"], doc["cli_fixed_cost_s"] = round(fixed, 3), round(cli, 3)
                doc["mlflow_requests_per_version"] = n_calls
                log(json.dumps({"fixed_cost_s": doc["fixed_cost_s"], "cli_fixed_cost_s": doc["cli_fixed_cost_s"]}))
                doc["results"] = run_sizes(b, sizes, args.repeat, log)
            finally:
                from ckpt_stage.sandbox import runner

                runner.shutdown()
                os.environ.clear()
                os.environ.update(saved)
        if args.backlog:
            os.environ["CKPT_STAGE_CACHE_DIR"] = str(tmp / "backlog-cache")
            doc["backlog"] = backlog(tmp, args.backlog, args.concurrency, log)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2) + "\n")
    print(json.dumps(doc, indent=None if args.json else 2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
