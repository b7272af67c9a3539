"""One reading of each file, made by the scanner in the parent and obeyed by the worker
(``ckpt_stage.scan.reading``), and sizes decided from metadata before any byte is read.

A scanner and a loader that decide separately what a file holds are the bug class of picklescan's
CVE-2025-1944/1945/10156. The worker here loads a file only as the scan's reading describes it and
refuses one that differs: other bytes (size, sha256), or a zip that torch's own reader reads as
another member table.
"""

from __future__ import annotations

import contextlib

import dataclasses
import json
import os
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import torch

from ckpt_stage import pipeline
from ckpt_stage.config import Settings, WorkerClass
from ckpt_stage.domain import FileFormat, ReasonCode as R, VersionRef, Verdict
from ckpt_stage.policy import decide
from ckpt_stage.registry import VersionState
from ckpt_stage.sandbox.job import LoadJob
from ckpt_stage.load.loader import load_and_check
from ckpt_stage.scan import scan_version
from ckpt_stage.scan.reading import Member, Reading, sha256_of
from ckpt_stage.storage import RemoteFile, S3Location

LINEAR = {"in_features": 4, "out_features": 3}


class Payload:
    def __init__(self, target: Path):
        self.target = target

    def __reduce__(self):
        return (os.system, (f"touch {self.target}",))


def _scan_job(root: Path, rels: list[str], **extra) -> tuple[LoadJob, dict[str, Reading]]:
    """A job as the pipeline builds it: the scan's readings, with the sha256 of the scanned bytes."""
    scan = scan_version(root, rels, Settings())
    readings = {r: dataclasses.replace(scan.readings[r], sha256=sha256_of(root / r)) for r in rels}
    job = LoadJob(root=str(root), files=tuple((r, scan.formats[r].value) for r in rels),
                  readings=tuple(readings.values()), arch="torch.nn:Linear", arch_kwargs=dict(LINEAR), **extra)
    return job, readings


def _with(job: LoadJob, reading: Reading) -> LoadJob:
    return dataclasses.replace(job, readings=(reading,))


@pytest.fixture
def linear_pt(tmp_path) -> Path:
    path = tmp_path / "model.pt"
    torch.save(torch.nn.Linear(4, 3).state_dict(), path)
    return path


def blocking(result) -> set:
    return {f.code for f in result.findings if f.blocking}


# -- the reading itself --------------------------------------------------------------------------------


def test_zip_reading_matches_torchs_reader(linear_pt):
    job, readings = _scan_job(linear_pt.parent, ["model.pt"])
    r = readings["model.pt"]
    assert r.fmt is FileFormat.TORCH_ZIP and r.prefix == "model" and r.container == "zip"
    assert r.version_records == {"version": 3}
    reader = torch._C.PyTorchFileReader(str(linear_pt))
    recs = r.records()
    assert set(recs) == set(reader.get_all_records())
    for name, m in recs.items():
        assert (m.data_offset, m.usize) == (reader.get_record_offset(name), reader.get_record_size(name))
    with zipfile.ZipFile(linear_pt) as z:
        assert [i.CRC for i in z.infolist()] == [m.crc for m in r.members]


def test_reading_travels_as_json(linear_pt):
    job, _ = _scan_job(linear_pt.parent, ["model.pt"])
    wire = json.loads(json.dumps(job.to_dict()))
    back = LoadJob.from_dict(wire)
    assert back == job
    assert isinstance(back.readings[0].members[0], Member)


def test_safetensors_reading_has_header(tmp_path):
    from safetensors.torch import save_file

    save_file(torch.nn.Linear(4, 3).state_dict(), str(tmp_path / "m.safetensors"))
    n = int.from_bytes((tmp_path / "m.safetensors").read_bytes()[:8], "little")
    _, readings = _scan_job(tmp_path, ["m.safetensors"])
    assert (readings["m.safetensors"].header_len, readings["m.safetensors"].data_start) == (n, n + 8)


def test_benign_file_passes_with_the_scans_reading(linear_pt):
    job, _ = _scan_job(linear_pt.parent, ["model.pt"])
    result = load_and_check(job)
    assert decide(result.findings, Settings()).verdict is Verdict.PASS, [f.to_dict() for f in result.findings]


# -- the worker refuses what the scan did not read -------------------------------------------------------


@pytest.mark.parametrize("same_size", [True, False])
def test_file_replaced_after_scan_is_refused_unloaded(linear_pt, tmp_path, same_size):
    """The scan read a benign checkpoint; a hostile one takes its place before the load."""
    job, readings = _scan_job(linear_pt.parent, ["model.pt"])
    canary = tmp_path / "canary"
    hostile = tmp_path / "hostile.pt"
    torch.save({"weight": torch.ones(3, 4), "x": Payload(canary)}, hostile)
    data = hostile.read_bytes()
    if same_size:  # same length, other bytes: only the digest tells
        original = linear_pt.read_bytes()
        data = (data + b"\0" * len(original))[:len(original)]
    linear_pt.write_bytes(data)
    result = load_and_check(job)
    assert blocking(result) == {R.CORRUPT_ARCHIVE}, [f.to_dict() for f in result.findings]
    (f,) = [f for f in result.findings if f.blocking]
    assert "is not the file the static scan read" in f.message
    assert ("sha256" if same_size else "bytes now") in f.message and f.hint
    assert not canary.exists()


def _hostile_same_size(original: Path, tmp_path: Path, canary: Path) -> bytes:
    hostile = tmp_path / "hostile.pt"
    torch.save({"weight": torch.ones(3, 4), "x": Payload(canary)}, hostile)
    size = original.stat().st_size
    return (hostile.read_bytes() + b"\0" * size)[:size]


def test_worker_trusts_the_digest_only_under_the_scans_stamp(linear_pt):
    """The worker does not hash a file again while its stamp (inode, size, mtime, ctime) is the one
    the scan took: a digest that does not match the bytes goes unnoticed then (the parent vouches for
    it), and is caught as soon as anything touched the file, even with the same bytes and mtime."""
    job, readings = _scan_job(linear_pt.parent, ["model.pt"])
    wrong = dataclasses.replace(readings["model.pt"], sha256="0" * 64)
    result = load_and_check(_with(job, wrong))
    assert decide(result.findings, Settings()).verdict is Verdict.PASS, [f.to_dict() for f in result.findings]
    st = linear_pt.stat()
    os.utime(linear_pt, ns=(st.st_atime_ns, st.st_mtime_ns))  # moves ctime only
    result = load_and_check(_with(job, wrong))
    assert blocking(result) == {R.CORRUPT_ARCHIVE}
    assert any("sha256" in f.message for f in result.findings if f.blocking)


@pytest.mark.parametrize("how", ["in-place", "replaced", "chmod-and-back"])
def test_stamp_moves_with_every_change_of_the_file(linear_pt, tmp_path, how):
    """Every way of changing a file under the scan's reading leaves another stamp, so the worker
    hashes it again and refuses the hostile bytes, unloaded (no canary)."""
    job, _ = _scan_job(linear_pt.parent, ["model.pt"])
    canary = tmp_path / "canary"
    data = _hostile_same_size(linear_pt, tmp_path, canary)
    st = linear_pt.stat()
    if how == "in-place":
        with open(linear_pt, "r+b") as fh:
            fh.write(data)
        os.utime(linear_pt, ns=(st.st_atime_ns, st.st_mtime_ns))  # mtime set back; ctime cannot be
    elif how == "replaced":
        other = tmp_path / "other.pt"
        other.write_bytes(data)
        os.utime(other, ns=(st.st_atime_ns, st.st_mtime_ns))
        os.replace(other, linear_pt)
    else:
        os.chmod(linear_pt, 0o644)
        with open(linear_pt, "r+b") as fh:
            fh.write(data)
        os.chmod(linear_pt, st.st_mode)
        os.utime(linear_pt, ns=(st.st_atime_ns, st.st_mtime_ns))
    result = load_and_check(job)
    assert blocking(result) == {R.CORRUPT_ARCHIVE}, [f.to_dict() for f in result.findings]
    assert not canary.exists()


def test_download_digest_is_trusted_only_when_the_scan_saw_the_downloaded_file(linear_pt, tmp_path):
    """The download hashed the file; if it was written to after that and before the scan, the scan's
    stamp differs from the download's and the worker hashes the file again (real sandboxed worker)."""
    canary = tmp_path / "canary"
    digest = sha256_of(linear_pt)
    st = linear_pt.stat()
    download_stamp = (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    time.sleep(0.01)  # past the kernel's coarse timestamp tick
    data = _hostile_same_size(linear_pt, tmp_path, canary)
    with open(linear_pt, "r+b") as fh:
        fh.write(data)
    checked = pipeline.check_local(linear_pt.parent, ["model.pt"], Settings(), arch="torch.nn:Linear",
                                   arch_kwargs=LINEAR, hashes={"model.pt": digest},
                                   stamps={"model.pt": download_stamp})
    assert any(f.code is R.CORRUPT_ARCHIVE for f in checked.findings if f.blocking), \
        [f.to_dict() for f in checked.findings]
    assert not canary.exists()


def test_pinned_reading_keeps_the_stamp_only_when_the_digest_covers_the_scanned_bytes(linear_pt):
    scan = scan_version(linear_pt.parent, ["model.pt"], Settings())
    r = scan.readings["model.pt"]
    assert r.stamp != (0, 0, 0, 0)
    assert pipeline._pinned(r, "ab" * 32, False, None).stamp == r.stamp  # hashed after the scan
    assert pipeline._pinned(r, "ab" * 32, True, r.stamp).stamp == r.stamp  # download saw the same file
    assert pipeline._pinned(r, "ab" * 32, True, (1, 2, 3, 4)).stamp == (0, 0, 0, 0)
    assert pipeline._pinned(r, "ab" * 32, True, None).stamp == (0, 0, 0, 0)


@pytest.mark.parametrize("tamper", ["drop-record", "extra-record", "moved-record", "resized-record"])
def test_torch_reader_disagreeing_with_the_scan_is_refused(linear_pt, tamper):
    """Simulates a parser differential: the scan's member table is not what torch's reader sees."""
    job, readings = _scan_job(linear_pt.parent, ["model.pt"])
    r = readings["model.pt"]
    members = list(r.members)
    i = next(i for i, m in enumerate(members) if m.name == "model/data.pkl")
    if tamper == "drop-record":
        del members[i]
    elif tamper == "extra-record":
        members.append(dataclasses.replace(members[i], name="model/hidden.pkl"))
    elif tamper == "moved-record":
        members[i] = dataclasses.replace(members[i], data_offset=members[i].data_offset + 64)
    else:
        members[i] = dataclasses.replace(members[i], usize=members[i].usize - 1)
    result = load_and_check(_with(job, dataclasses.replace(r, members=tuple(members))))
    assert blocking(result) == {R.CORRUPT_ARCHIVE}, [f.to_dict() for f in result.findings]
    (f,) = [f for f in result.findings if f.blocking]
    assert "torch's zip reader and the static scan disagree" in f.message
    assert "data.pkl" in f.message or "hidden.pkl" in f.message


def test_worker_obeys_the_readings_format(linear_pt):
    """A file the reading does not call a checkpoint is never loaded, whatever its bytes (no second
    sniffer in the worker)."""
    job, readings = _scan_job(linear_pt.parent, ["model.pt"])
    r = dataclasses.replace(readings["model.pt"], format="unknown", container="text")
    result = load_and_check(dataclasses.replace(_with(job, r), files=(("model.pt", "unknown"),)))
    assert blocking(result) == {R.NOT_A_CHECKPOINT}
    assert "param_count" not in result.info


def test_file_without_a_reading_is_not_loaded(linear_pt):
    job, _ = _scan_job(linear_pt.parent, ["model.pt"])
    result = load_and_check(dataclasses.replace(job, readings=()))
    assert blocking(result) == {R.INTERNAL_ERROR}


def test_version_record_read_by_the_scan(linear_pt):
    job, readings = _scan_job(linear_pt.parent, ["model.pt"])
    r = dataclasses.replace(readings["model.pt"], version_records={"version": 99})
    result = load_and_check(_with(job, r))
    assert blocking(result) == {R.LIBRARY_VERSION_MISMATCH}
    assert "version 99" in result.findings[0].message


def test_missing_shard_from_the_scans_index(tmp_path):
    from safetensors.torch import save_file

    save_file(torch.nn.Linear(4, 3).state_dict(), str(tmp_path / "model-00001-of-00002.safetensors"))
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"weight": "model-00001-of-00002.safetensors", "bias": "model-00002-of-00002.safetensors"}}))
    job, readings = _scan_job(tmp_path, sorted(p.name for p in tmp_path.iterdir()))
    result = load_and_check(job)
    assert R.ARTIFACT_MISSING in blocking(result)


# -- through the pipeline (the real sandboxed worker) ------------------------------------------------------


def test_file_changed_between_scan_and_worker(linear_pt, monkeypatch, tmp_path):
    real = pipeline.run_worker
    canary = tmp_path / "canary"

    def tamper_then_run(job, settings):
        assert job.readings and job.readings[0].sha256 == sha256_of(linear_pt)
        hostile = tmp_path / "h.pt"
        torch.save({"weight": torch.ones(3, 4), "x": Payload(canary)}, hostile)
        os.replace(hostile, linear_pt)
        return real(job, settings)

    monkeypatch.setattr(pipeline, "run_worker", tamper_then_run)
    checked = pipeline.check_local(linear_pt.parent, ["model.pt"], Settings(), arch="torch.nn:Linear",
                                   arch_kwargs=LINEAR)
    codes = {f.code for f in checked.findings if f.blocking}
    assert codes == {R.CORRUPT_ARCHIVE}, [f.to_dict() for f in checked.findings]
    assert not canary.exists()


def test_file_changed_while_scanned(linear_pt, monkeypatch):
    real = pipeline.scan_version

    def scan_then_write(root, rels, settings):
        out = real(root, rels, settings)
        with open(linear_pt, "ab") as fh:
            fh.write(b"x")
        return out

    monkeypatch.setattr(pipeline, "scan_version", scan_then_write)
    checked = pipeline.check_local(linear_pt.parent, ["model.pt"], Settings())
    assert any(f.code is R.CORRUPT_ARCHIVE and "modified while it was being scanned" in f.message
               for f in checked.findings)
    assert checked.load is None


# -- sizes from metadata first ----------------------------------------------------------------------------


def _sparse(path: Path, size: int, mode: int = 0o644) -> Path:
    fd = os.open(path, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, mode)
    try:
        os.truncate(fd, size)
    finally:
        os.close(fd)
    return path


@pytest.mark.parametrize("mode", [0o644, 0o600])
def test_sparse_terabyte_via_cli_is_refused_from_its_size(tmp_path, mode):
    """``ckpt-stage inspect`` on a sparse 1 TiB file answers in seconds, without reading, hashing or
    staging it (a 0600 file would otherwise be copied into a dense one)."""
    path = _sparse(tmp_path / "model.safetensors", 2**40, mode)
    cache = tmp_path / "cache"
    env = {**os.environ, "CKPT_STAGE_CACHE_DIR": str(cache)}
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "ckpt_stage.cli", "inspect", str(path), "--json"],
                          capture_output=True, text=True, env=env, timeout=120)
    elapsed = time.monotonic() - t0
    assert proc.returncode == 1, proc.stderr[-2000:]
    report = json.loads(proc.stdout)
    assert [r["code"] for r in report["reasons"]] == ["RESOURCE_LIMIT"]
    assert "refused from its size" in report["reasons"][0]["message"] and report["reasons"][0]["hint"]
    assert report["files"][0]["size"] == 2**40
    assert elapsed < 30, elapsed  # interpreter start included; hashing it would take an hour
    staged = list((cache / "inspect").rglob("*")) if (cache / "inspect").exists() else []
    assert staged == []
    assert os.stat(path).st_blocks == 0  # still sparse: nothing wrote to it either


def test_inspect_size_decision_reads_nothing(tmp_path, monkeypatch):
    _sparse(tmp_path / "big.bin", 2**40)
    (tmp_path / "MLmodel").write_text("flavors: {}\n")

    def boom(*_a, **_k):
        raise AssertionError("read before the size decision")

    for name in ("scan_version", "sha256_file", "_stage"):
        monkeypatch.setattr(pipeline, name, boom)
    monkeypatch.setenv("CKPT_STAGE_CACHE_DIR", str(tmp_path / "cache"))
    report = pipeline.inspect_paths([tmp_path], settings=Settings.from_env())
    assert report.verdict is Verdict.QUARANTINE
    assert [f.code for f in report.reasons] == [R.RESOURCE_LIMIT]
    assert report.reasons[0].file == "big.bin"


def test_size_limit_follows_the_largest_worker_class(tmp_path, linear_pt):
    tiny = Settings(worker_classes=(WorkerClass("tiny", 100, "q"),))
    checked = pipeline.check_local(linear_pt.parent, ["model.pt"], tiny)
    assert [f.code for f in checked.findings] == [R.RESOURCE_LIMIT] and "'tiny'" in checked.findings[0].message
    assert checked.load is None


class _Registry:
    def __init__(self):
        self.recorded = []

    def claim(self, ref, owner, *, force=False):
        return VersionState(ref)

    def get(self, ref):
        return VersionState(ref)

    def attempts(self, ref):
        return []

    def state_and_attempts(self, ref):
        return self.get(ref), self.attempts(ref)

    def next_attempt(self, ref, state, *, runs=None):
        return 1

    @contextlib.contextmanager
    def heartbeat(self, ref, owner):
        yield

    def download_uri(self, ref):
        return "s3://bucket/models/m/1"

    def record(self, report, decision, *, digest, owner=None):
        self.recorded.append(report)
        return "run-1"


class _Storage:
    def __init__(self, files):
        self.files, self.downloads = files, 0

    def list_files(self, loc: S3Location):
        return self.files

    def download(self, *a, **k):
        self.downloads += 1
        raise AssertionError("downloaded a file the listing already refused")


def test_validate_decides_from_the_s3_listing_before_downloading(tmp_path):
    storage = _Storage([RemoteFile("models/m/1/MLmodel", "MLmodel", 300),
                        RemoteFile("models/m/1/data/model.pt2", "data/model.pt2", 3 * 2**40)])
    registry = _Registry()
    settings = Settings(cache_dir=tmp_path / "cache")
    outcome = pipeline.validate_version(VersionRef("m", "1"), settings=settings, registry=registry,
                                        storage=storage)
    assert storage.downloads == 0
    report = outcome.report
    assert report is not None and report.verdict is Verdict.QUARANTINE
    assert [f.code for f in report.reasons] == [R.RESOURCE_LIMIT]
    assert report.reasons[0].file == "data/model.pt2"
    assert {f.path: f.size for f in report.files} == {"MLmodel": 300, "data/model.pt2": 3 * 2**40}
    assert registry.recorded


class _Unlisted(_Storage):
    def list_files(self, loc: S3Location):
        self.listings = getattr(self, "listings", 0) + 1
        return super().list_files(loc)


def test_a_planned_listing_is_used_and_a_stale_one_listed_again(tmp_path):
    """The DAG's plan task hands its listing to the validation: the objects are not listed again (nor the
    registry asked where they are) while it is fresh; one older than PLANNED_LISTING_MAX_AGE_S is."""
    import time

    from ckpt_stage.storage import Listing

    huge = RemoteFile("models/m/1/data/model.pt2", "data/model.pt2", 3 * 2**40)
    settings = Settings(cache_dir=tmp_path / "cache")
    for age, listings in ((1.0, 0), (pipeline.PLANNED_LISTING_MAX_AGE_S + 1, 1)):
        storage, registry = _Unlisted([huge]), _Registry()
        listing = Listing("s3://bucket/models/m/1", (huge,), time.time() - age)
        restored = Listing.from_dict(listing.to_dict())  # as it comes out of the XCom
        assert restored == listing
        outcome = pipeline.validate_version(VersionRef("m", "1"), settings=settings, registry=registry,
                                            storage=storage, listing=restored)
        assert getattr(storage, "listings", 0) == listings
        assert [f.code for f in outcome.report.reasons] == [R.RESOURCE_LIMIT]  # decided from the sizes
        assert storage.downloads == 0
