"""S3 faults injected on a real socket in front of the real S3 API server: retry what is transient,
never what is permanent, and turn what is left into the right verdict (rows 5 and 7 of the reliability
table: transport faults never become model codes; the deadline bounds the whole operation)."""

from __future__ import annotations

import hashlib
import time
import uuid

import pytest
from mlflow import MlflowClient

from ckpt_stage.dev import devstack, samples
from ckpt_stage.config import Settings
from ckpt_stage.domain import ReasonCode, Verdict, VersionRef
from ckpt_stage.errors import ArtifactMissing, IntegrityMismatch, StorageMisconfigured, StorageUnavailable
from ckpt_stage.pipeline import validate_version
from ckpt_stage.storage import S3Location, S3Storage
from tests.faults.proxy import on

pytestmark = pytest.mark.integration


@pytest.fixture
def uploaded(stack, stage_env, tmp_path):
    folder = tmp_path / "m"
    samples.state_dict(folder)
    loc = S3Location(stack.bucket, f"faults/{uuid.uuid4().hex}")
    S3Storage(Settings()).upload_dir(folder, loc)
    return loc


@pytest.fixture
def proxy(s3_proxy):
    return s3_proxy


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
    assert files[0].sha256 == hashlib.sha256(data).hexdigest()
    assert files[0].size == len(data)


# -- row 5: transient faults never become model codes ------------------------------------------------------
def _upload_without_checksum(stack, folder, prefix: str) -> S3Location:
    """Objects stored without any S3 checksum (older uploaders; botocore < 1.36 or
    ``request_checksum_calculation=when_required``): only the listed size can be checked."""
    import boto3
    from botocore.config import Config

    client = boto3.client("s3", endpoint_url=stack.s3.url, config=Config(request_checksum_calculation="when_required"))
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        client.put_object(Bucket=stack.bucket, Key=f"{prefix}/{path.relative_to(folder).as_posix()}",
                          Body=path.read_bytes())
    head = client.head_object(Bucket=stack.bucket, Key=f"{prefix}/model.pt", ChecksumMode="ENABLED")
    assert not any(k.startswith("Checksum") and k != "ChecksumType" for k in head), head
    return S3Location(stack.bucket, prefix)


@pytest.fixture
def plain(stack, stage_env, tmp_path):
    folder = tmp_path / "plain"
    samples.state_dict(folder)
    return _upload_without_checksum(stack, folder, f"plain/{uuid.uuid4().hex}")


def test_bodies_cut_short_behind_a_fixing_proxy_are_retried_not_quarantined(plain, proxy, tmp_path):
    """A proxy that fixes up Content-Length makes a cut body look complete, and without an S3 checksum
    only the size tells: two such downloads (cut at different points) do not agree with each other, so
    they are a transport fault, retried."""
    proxy.arm("truncate_fixlen", "truncate_fixlen", match=on("GET", "model.pt"))
    files = _storage([]).download(plain, tmp_path / "out")
    assert files[0].size == (tmp_path / "out" / "model.pt").stat().st_size
    assert proxy.by_kind["truncate_fixlen"] == 2


@pytest.mark.parametrize("kind", ["truncate_fixlen", "truncate"])
def test_bodies_cut_short_every_time_are_storage_unavailable(plain, proxy, tmp_path, kind):
    proxy.arm(*[kind] * 10, match=on("GET", "model.pt"))
    with pytest.raises(StorageUnavailable) as err:
        _storage([]).download(plain, tmp_path / "out")
    assert not isinstance(err.value, IntegrityMismatch)


def test_the_same_wrong_bytes_twice_against_s3s_checksum_are_integrity_mismatch(stack, stage_env, proxy, tmp_path):
    """The model code still comes out when it is earned: the object carries a full-object CRC32 (asked for
    at upload), and two complete downloads agree with each other and not with it."""
    folder = tmp_path / "m"
    samples.state_dict(folder)
    loc = S3Location(stack.bucket, f"faults/{uuid.uuid4().hex}")
    S3Storage(Settings()).upload_dir(folder, loc)  # through the proxy, unfaulted
    head = S3Storage(Settings()).client.head_object(Bucket=loc.bucket, Key=f"{loc.prefix}/model.pt",
                                                    ChecksumMode="ENABLED")
    assert head.get("ChecksumCRC32") and head.get("ChecksumType", "FULL_OBJECT") == "FULL_OBJECT"
    proxy.arm(*["corrupt"] * 10, match=on("GET", "model.pt"))
    with pytest.raises(IntegrityMismatch, match="two complete downloads agree"):
        _storage([]).download(loc, tmp_path / "out")
    assert proxy.by_kind["corrupt"] == 2  # exactly one re-download


def test_a_cut_body_in_a_validation_ends_in_pass_not_quarantine(stack, stage_env, proxy, build_sample):
    folder, tags = build_sample(samples.state_dict)
    loc = _upload_without_checksum(stack, folder, f"plain/{uuid.uuid4().hex}")
    client = MlflowClient()
    name = f"cut-{uuid.uuid4().hex[:6]}"
    client.create_registered_model(name)
    mv = client.create_model_version(name, source=loc.uri, tags=tags)
    ref = VersionRef(name, str(mv.version))
    proxy.arm("truncate_fixlen", "truncate_fixlen", match=on("GET", "model.pt"))
    out = validate_version(ref, settings=Settings.from_env(), storage=S3Storage(Settings.from_env(),
                                                                                sleep=lambda s: None))
    assert out.report.verdict is Verdict.PASS, out.report.summary
    assert proxy.by_kind["truncate_fixlen"] == 2


# -- row 7: bounded time ---------------------------------------------------------------------------------
def test_a_black_holed_s3_gives_up_within_the_deadline(uploaded, proxy, tmp_path):
    """S3 accepts connections and never answers: the deadline bounds the attempt in flight too (each
    attempt's socket timeouts fit in what is left), so giving up takes the deadline, not a read timeout more."""
    proxy.arm(*["stall"] * 50)
    storage = S3Storage(Settings(s3_attempts=5, s3_deadline_s=4.0))
    t0 = time.monotonic()
    with pytest.raises(StorageUnavailable):
        storage.download(uploaded, tmp_path / "out")
    took = time.monotonic() - t0
    print(f"black-holed S3: gave up after {took:.1f} s (deadline 4 s)")
    # The deadline, plus what a last try may take when less than a second is left (its timeouts are at
    # least 1 s) and building the clients for the shorter timeouts on a loaded machine.
    assert took < 4.0 + 3.0
    assert proxy.by_kind["stall"] >= 1


def test_a_slow_drip_body_is_cut_off_at_the_deadline(uploaded, proxy, tmp_path):
    proxy.arm(*[("latency", 3.0)] * 10, match=on("GET", "model.pt"))
    storage = S3Storage(Settings(s3_attempts=5, s3_deadline_s=2.0))
    t0 = time.monotonic()
    with pytest.raises(StorageUnavailable):
        storage.download(uploaded, tmp_path / "out")
    assert time.monotonic() - t0 < 2.0 + 2.0
