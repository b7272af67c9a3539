"""Side-by-side benchmark: the stage's validation vs a raw baseline, in one run, JSON out.

Baseline: boto3 streams the same object from the same S3 server with the same transfer settings
(one GET, 8 MiB chunks, botocore retries off) and ``torch.load(weights_only=True, mmap=True)`` loads
it in a fresh interpreter. Stage: ``pipeline.validate_version`` end to end (claim, download, hash,
scan, isolated worker load with checks, record in MLflow).

    .venv/bin/python -m bench.run [--sizes-mib 16,128] [--repeat 2] [--out bench/results/latest.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from ckpt_stage.dev import devstack
from ckpt_stage.config import Settings
from ckpt_stage.domain import VersionRef
from ckpt_stage.pipeline import validate_version
from ckpt_stage.registry.tags import ARCH, ARCH_KWARGS
from ckpt_stage.storage import CHUNK, S3Location, S3Storage

_RAW_LOAD = r"""
import sys, time, resource, torch
t = time.perf_counter()
sd = torch.load(sys.argv[1], weights_only=True, mmap=True, map_location="cpu")
n = sum(v.numel() for v in sd.values())
dt = time.perf_counter() - t
anon = 0
for line in open("/proc/self/status"):
    if line.startswith("RssAnon:"):
        anon = int(line.split()[1]) * 1024
print(dt, anon, n)
"""


def make_checkpoint(folder: Path, mib: int) -> dict[str, str]:
    import torch

    folder.mkdir(parents=True, exist_ok=True)
    side = int((mib * 2**20 / 4) ** 0.5)
    torch.manual_seed(0)
    torch.save(torch.nn.Linear(side, side, bias=True).state_dict(), folder / "model.pt")
    return {ARCH: "torch.nn:Linear",
            ARCH_KWARGS: json.dumps({"in_features": side, "out_features": side})}


def baseline(bucket: str, key: str, tmp: Path) -> dict[str, float]:
    storage = S3Storage(Settings())  # same client configuration as the stage
    t0 = time.perf_counter()
    body = storage.client.get_object(Bucket=bucket, Key=key)["Body"]
    path = tmp / f"raw-{uuid.uuid4().hex}.pt"
    with path.open("wb") as fh:
        for chunk in body.iter_chunks(CHUNK):
            fh.write(chunk)
    download = time.perf_counter() - t0
    out = subprocess.run([sys.executable, "-c", _RAW_LOAD, str(path)], capture_output=True, text=True, check=True)
    load_s, anon, _ = out.stdout.split()
    path.unlink()
    # The raw load runs in a fresh interpreter so its memory is its own; its start-up (~1.5 s of
    # `import torch`) is left out of the total, as the stage's warm fork server leaves it out too.
    return {"download": download, "load": float(load_s), "total": download + float(load_s),
            "peak_anon_bytes": int(anon)}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes-mib", default="16,128")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--out", default="bench/results/latest.json")
    args = ap.parse_args()
    results = []
    with tempfile.TemporaryDirectory(prefix="ckpt-bench-") as tmpdir:
        tmp = Path(tmpdir)
        with devstack.local_stack(tmp / "servers") as stack:
            os.environ.update(stack.env)
            os.environ["CKPT_STAGE_CACHE_DIR"] = str(tmp / "cache")
            settings = Settings.from_env()
            for mib in (int(s) for s in args.sizes_mib.split(",")):
                folder = tmp / f"ckpt-{mib}"
                tags = make_checkpoint(folder, mib)
                size = (folder / "model.pt").stat().st_size
                name = f"bench-{mib}mib"
                base_runs, stage_runs = [], []
                for _ in range(args.repeat):
                    ref: VersionRef = devstack.register_folder(stack.bucket, name, folder, tags)
                    from mlflow import MlflowClient

                    src = MlflowClient().get_model_version(ref.name, ref.version).source
                    loc = S3Location.parse(src)
                    base_runs.append(baseline(loc.bucket, f"{loc.prefix}/model.pt", tmp))
                    out = validate_version(ref, settings=settings)
                    rep = out.report.to_dict()
                    assert rep["verdict"] == "pass", rep["reasons"]
                    t = rep["timings_s"]
                    stage_runs.append({**{k: t.get(k, 0.0) for k in
                                          ("download", "scan", "load", "inference", "worker_start", "total")},
                                       # claim, lease re-read, run + report.json + tags + alias in MLflow
                                       "registry_and_other": t["total"] - sum(
                                           t.get(k, 0.0) for k in ("download", "scan", "load", "inference",
                                                                   "worker_start")),
                                       "peak_anon_bytes": rep["resources"]["peak_anon_bytes"]})
                row = {
                    "bench": "validate_state_dict",
                    "size_bytes": size,
                    "repeat": args.repeat,
                    "baseline": {k: statistics.median(r[k] for r in base_runs) for k in base_runs[0]},
                    "stage": {k: statistics.median(r[k] for r in stage_runs) for k in stage_runs[0]},
                }
                row["stage_over_baseline_total"] = round(row["stage"]["total"] / row["baseline"]["total"], 3)
                row["stage_over_baseline_download"] = round(row["stage"]["download"] / row["baseline"]["download"], 3)
                print(json.dumps(row), flush=True)
                results.append(row)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
