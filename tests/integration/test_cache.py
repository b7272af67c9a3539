"""Re-runs of unchanged files download nothing (``ckpt_stage.cache``), through the real pipeline, MLflow and
the real S3 API server behind a counting proxy."""

from __future__ import annotations

import uuid

import pytest
from mlflow import MlflowClient

from ckpt_stage.dev import devstack, samples
from ckpt_stage.config import Settings
from ckpt_stage.domain import Verdict
from ckpt_stage.pipeline import validate_version
from ckpt_stage.storage import S3Location, S3Storage
from tests.faults import one_backend

pytestmark = pytest.mark.integration


def _model_gets(proxy, loc: S3Location) -> list[str]:
    return [p for m, p in proxy.seen if m == "GET" and p.split("?")[0].startswith(f"/{loc.bucket}/{loc.prefix}/")]


def test_a_rerun_of_unchanged_files_downloads_nothing_and_a_changed_file_is_fetched(stack, stage_env, tmp_path,
                                                                                     s3_proxy):
    one_backend(stack)  # about the object cache, not the backend store
    folder = tmp_path / "v"
    tags = samples.safetensors_file(folder)
    ref = devstack.register_folder(stack.bucket, f"cache-{uuid.uuid4().hex[:6]}", folder, tags)
    loc = S3Location.parse(MlflowClient().get_model_version(ref.name, ref.version).source)
    settings = Settings.from_env()

    first = validate_version(ref, settings=settings).report
    assert first.verdict is Verdict.PASS
    assert len(_model_gets(s3_proxy, loc)) == 1

    s3_proxy.seen.clear()
    again = validate_version(ref, settings=settings, force=True).report  # what `ckpt-stage rerun` does
    assert again.verdict is Verdict.PASS and again.attempt == 2
    assert _model_gets(s3_proxy, loc) == []  # listed, not downloaded
    assert [(f.path, f.sha256) for f in again.files] == [(f.path, f.sha256) for f in first.files]

    # The same key overwritten with other bytes has another ETag: a miss, downloaded and judged anew.
    S3Storage(settings).client.put_object(Bucket=loc.bucket, Key=f"{loc.prefix}/model.safetensors", Body=b"\0" * 64)
    s3_proxy.seen.clear()
    third = validate_version(ref, settings=settings, force=True).report
    assert len(_model_gets(s3_proxy, loc)) == 1
    assert third.verdict is Verdict.QUARANTINE
    assert third.files[0].sha256 != first.files[0].sha256

    off = settings.replace(cache_max_bytes=0)
    s3_proxy.seen.clear()
    validate_version(ref, settings=off, force=True)
    assert len(_model_gets(s3_proxy, loc)) == 1  # CKPT_STAGE_CACHE_MAX_BYTES=0: always downloaded
