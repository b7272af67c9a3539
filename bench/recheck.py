"""Cost of the promoted-version re-check: S3 and MLflow requests and seconds per version, JSON out.

Starts its own S3 API server and ``mlflow server`` on loopback (SQLite), registers N promoted versions
of a few models (one small file each, with a recorded manifest as a validation would leave it), then
times ``integrity.recheck_promoted`` cold (manifest cache empty: each report.json is read once) and
warm (the steady state of every later sweep), and counts HTTP requests through counting proxies in
front of both servers. Figures are given per version and per 1,000 promoted versions.

    .venv/bin/python -m bench.recheck [--versions 200] [--models 4] [--out bench/results/recheck.json]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import tempfile
import time
import uuid
from collections import Counter
from pathlib import Path

from ckpt_stage.dev import devstack
from ckpt_stage.config import Settings
from ckpt_stage.integrity import recheck_promoted
from ckpt_stage.registry import RUN_ID, SHA256, STATUS, VALIDATED_AT, Registry, iso, now_utc
from ckpt_stage.storage import S3Storage, version_digest
from tests.faults import FaultProxy


def populate(stack: devstack.Stack, n: int, models: int) -> None:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=stack.mlflow.url)
    s3 = S3Storage(Settings()).client
    exp = Registry(Settings(), client=client).experiment_id()
    names = [f"bench-{uuid.uuid4().hex[:6]}-{i}" for i in range(models)]
    for name in names:
        client.create_registered_model(name)
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(n):
            name = names[i % models]
            prefix = f"bench/{name}/{uuid.uuid4().hex[:12]}"
            body = os.urandom(256)
            etag = s3.put_object(Bucket=stack.bucket, Key=f"{prefix}/model.pt", Body=body)["ETag"].strip('"')
            sha = hashlib.sha256(body).hexdigest()
            files = [{"path": "model.pt", "format": "torch-zip", "size": len(body), "sha256": sha,
                      "key": f"{prefix}/model.pt", "etag": etag, "version_id": None}]
            run = client.create_run(exp)
            path = Path(tmp) / "report.json"
            path.write_text(json.dumps({"files": files, "attempt": 1, "storage": {
                "uri": f"s3://{stack.bucket}/{prefix}", "bucket": stack.bucket, "prefix": prefix, "versioned": False}}))
            client.log_artifact(run.info.run_id, str(path))
            client.create_model_version(name, source=f"s3://{stack.bucket}/{prefix}", tags={
                RUN_ID: run.info.run_id, SHA256: version_digest([("model.pt", sha)]),
                VALIDATED_AT: iso(now_utc()), STATUS: "promoted"})


def one_pass(cache: Path) -> tuple[float, list]:
    settings = Settings.from_env().replace(cache_dir=cache)
    t0 = time.perf_counter()
    results = recheck_promoted(settings=settings)
    return time.perf_counter() - t0, results


def count_requests(stack: devstack.Stack, cache: Path) -> dict[str, dict[str, int]]:
    with FaultProxy(stack.s3.url) as s3p, FaultProxy(stack.mlflow.url) as mlp:
        saved = {k: os.environ.get(k) for k in ("AWS_ENDPOINT_URL_S3", "MLFLOW_S3_ENDPOINT_URL", "MLFLOW_TRACKING_URI")}
        os.environ.update(AWS_ENDPOINT_URL_S3=s3p.url, MLFLOW_S3_ENDPOINT_URL=s3p.url, MLFLOW_TRACKING_URI=mlp.url)
        try:
            one_pass(cache)
        finally:
            for k, v in saved.items():
                if v is not None:
                    os.environ[k] = v
    def kinds(seen: list[tuple[str, str]], s3: bool) -> dict[str, int]:
        c: Counter[str] = Counter()
        for method, path in seen:
            if s3:
                query = path.partition("?")[2]
                what = ("versioning (once per bucket)" if query.startswith("versioning") else
                        "list" if "list-type=2" in query or query.startswith("versions") else "object")
                c[f"{method} {what}"] += 1
            else:
                c[f"{method} {path.split('?')[0]}"] += 1
        return dict(c)

    return {"s3": kinds(s3p.seen, True), "mlflow": kinds(mlp.seen, False)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--versions", type=int, default=200)
    ap.add_argument("--models", type=int, default=4)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp, devstack.local_stack(Path(tmp) / "stack") as stack:
        os.environ.update(stack.env)
        os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
        t = time.perf_counter()
        populate(stack, args.versions, args.models)
        setup_s = time.perf_counter() - t
        cold_s, results = one_pass(Path(tmp) / "cache-a")
        warm_s, _ = one_pass(Path(tmp) / "cache-a")
        assert all(r.outcome == "same" for r in results), [r.to_dict() for r in results if r.outcome != "same"]
        cold_calls = count_requests(stack, Path(tmp) / "cache-b")
        warm_calls = count_requests(stack, Path(tmp) / "cache-b")
    n = len(results)
    per_k = 1000 / n

    def scaled(calls: dict[str, dict[str, int]]) -> dict[str, dict[str, float]]:
        return {srv: {k: round(v * per_k, 1) for k, v in c.items()} for srv, c in calls.items()}

    doc = {
        "promoted_versions": n, "models": args.models, "setup_s": round(setup_s, 1),
        "cold": {"seconds": round(cold_s, 2), "s_per_version": round(cold_s / n, 4),
                 "s_per_1000": round(cold_s * per_k, 1), "requests": cold_calls, "requests_per_1000": scaled(cold_calls)},
        "warm": {"seconds": round(warm_s, 2), "s_per_version": round(warm_s / n, 4),
                 "s_per_1000": round(warm_s * per_k, 1), "requests": warm_calls, "requests_per_1000": scaled(warm_calls)},
        "note": "moto S3 server and mlflow server (SQLite, 1 worker) on loopback, 2 cores shared; "
                "cold = each manifest read once from report.json, warm = every later sweep",
    }
    text = json.dumps(doc, indent=2)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
