"""S3 faults injected on a real socket in front of the real S3 API server: retry what is transient,
never what is permanent, and turn what is left into the right verdict."""

from __future__ import annotations

import uuid

import pytest
from mlflow import MlflowClient

from ckpt_stage import devstack, samples
from ckpt_stage.config import Settings
from ckpt_stage.domain import ReasonCode, Verdict, VersionRef
from ckpt_stage.errors import ArtifactMissing, StorageMisconfigured, StorageUnavailable
from ckpt_stage.pipeline import validate_version
from ckpt_stage.storage import S3Location, S3Storage
from tests.faults import FaultProxy

pytestmark = pytest.mark.integration


@pytest.fixture
def uploaded(stack, stage_env, tmp_path):
    folder = tmp_path / "m"
    samples.state_dict(folder)
    loc = S3Location(stack.bucket, f"faults/{uuid.uuid4().hex}")
    S3Storage(Settings()).upload_dir(folder, loc)
    return loc


@pytest.fixture
def proxy(stack, monkeypatch):
    with FaultProxy(stack.s3.url) as p:
        monkeypatch.setenv("AWS_ENDPOINT_URL_S3", p.url)
        monkeypatch.setenv("MLFLOW_S3_ENDPOINT_URL", p.url)
        yield p


def _storage(sleeps):
    return S3Storage(Settings(s3_attempts=4), sleep=sleeps.append)


def test_transient_faults_are_retried_then_succeed(uploaded, proxy, tmp_path):
    sleeps: list[float] = []
    proxy.arm(503, "reset", 500)
    files = _storage(sleeps).download(uploaded, tmp_path / "out")
    assert [f.rel for f in files] == ["model.pt"]
    assert (tmp_path / "out" / "model.pt").stat().st_size == files[0].size
    assert proxy.faulted == 3
    assert len(sleeps) == 3  # three retries, no real waiting


def test_transient_faults_that_persist_become_storage_unavailable(uploaded, proxy, tmp_path):
    sleeps: list[float] = []
    proxy.arm(*([503] * 10))
    with pytest.raises(StorageUnavailable):
        _storage(sleeps).download(uploaded, tmp_path / "out")
    assert proxy.faulted == 4 and len(sleeps) == 3


@pytest.mark.parametrize(("status", "error"), [(403, StorageMisconfigured), (404, ArtifactMissing)])
def test_permanent_faults_are_never_retried(uploaded, proxy, tmp_path, status, error):
    sleeps: list[float] = []
    proxy.arm(status, status, status)
    with pytest.raises(error):
        _storage(sleeps).download(uploaded, tmp_path / "out")
    assert proxy.faulted == 1 and sleeps == []


def test_unreachable_s3_ends_in_error_and_the_version_stays_eligible(stack, stage_env, monkeypatch, build_sample):
    folder, tags = build_sample(samples.state_dict)
    ref = devstack.register_folder(stack.bucket, f"outage-{uuid.uuid4().hex[:6]}", folder, tags)
    closed = f"http://127.0.0.1:{devstack.free_port()}"
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", closed)
    monkeypatch.setenv("MLFLOW_S3_ENDPOINT_URL", closed)
    settings = Settings.from_env().replace(s3_attempts=2)
    storage = S3Storage(settings, sleep=lambda s: None)
    # Recording needs S3 for report.json too: send artifacts to the real server, downloads to the dead one.
    monkeypatch.setenv("MLFLOW_S3_ENDPOINT_URL", stack.s3.url)
    out = validate_version(ref, settings=settings, storage=storage)
    assert out.report.verdict is Verdict.ERROR
    assert [r.code for r in out.report.reasons] == [ReasonCode.STORAGE_UNAVAILABLE]
    mv = MlflowClient().get_model_version(ref.name, ref.version)
    assert mv.tags["ckpt_stage.status"] == "error"
    from ckpt_stage.registry import Registry

    assert Registry(settings).get(VersionRef(ref.name, ref.version)).needs_validation()


def test_multipart_uploads_with_composite_checksums_verify(stack, stage_env, tmp_path):
    """Objects over 8 MiB are uploaded in parts and carry a COMPOSITE checksum: comparing it with the
    file's own digest would flag every large model. Only sizes (and whole-object checksums) count."""
    import boto3

    data = bytes(range(256)) * (40 * 1024 * 9 // 10 * 4)  # ~9.4 MB
    src = tmp_path / "big.bin"
    src.write_bytes(data)
    loc = S3Location(stack.bucket, f"multipart/{uuid.uuid4().hex}")
    client = S3Storage(Settings()).client
    client.upload_file(str(src), loc.bucket, f"{loc.prefix}/big.bin",
                       Config=boto3.s3.transfer.TransferConfig(multipart_threshold=8 * 2**20,
                                                               multipart_chunksize=8 * 2**20))
    head = client.head_object(Bucket=loc.bucket, Key=f"{loc.prefix}/big.bin", ChecksumMode="ENABLED")
    assert "-" in head["ETag"]  # really multipart
    files = S3Storage(Settings()).download(loc, tmp_path / "out")
    import hashlib

    assert files[0].sha256 == hashlib.sha256(data).hexdigest()
    assert files[0].size == len(data)
