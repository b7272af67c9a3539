"""Integrity after the verdict, against the real S3 API server and the real ``mlflow server``: the report
records exactly what was validated, the download fetches exactly what was listed, the re-check takes a
promoted version whose S3 objects changed out of service, and ``verify`` checks a served download."""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient

from ckpt_stage.dev import devstack, samples
from ckpt_stage.config import Settings
from ckpt_stage.domain import Verdict, VersionRef
from ckpt_stage.integrity import recheck_promoted, verify_download
from ckpt_stage.pipeline import validate_version
from ckpt_stage.registry import Registry
from ckpt_stage.storage import S3Location, S3Storage

pytestmark = pytest.mark.integration

TAGS = dict(samples.LINEAR_TAGS)


def _weights(seed: int) -> bytes:
    """A valid Linear(4, 2) state_dict, different bytes for each seed."""
    torch.manual_seed(seed)
    buf = io.BytesIO()
    torch.save(torch.nn.Linear(4, 2).state_dict(), buf)
    return buf.getvalue()


def _register(stack, name: str, files: dict[str, bytes], tmp_path: Path, *, bucket: str | None = None) -> VersionRef:
    folder = tmp_path / uuid.uuid4().hex[:8]
    folder.mkdir()
    for rel, data in files.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_bytes(data)
    return devstack.register_folder(bucket or stack.bucket, name, folder, TAGS)


def _prefix(ref: VersionRef) -> S3Location:
    return S3Location.parse(MlflowClient().get_model_version(ref.name, ref.version).source)


def _s3():
    return S3Storage(Settings()).client


def _promote(*refs: VersionRef) -> None:
    for ref in refs:
        out = validate_version(ref, settings=Settings.from_env())
        assert out.report.verdict is Verdict.PASS, out.report.to_dict()["reasons"]


def _alias(name: str) -> str | None:
    return Registry(Settings.from_env()).alias_version(name)


def _tags(ref: VersionRef) -> dict[str, str]:
    return dict(MlflowClient().get_model_version(ref.name, ref.version).tags)


def _name(stem: str) -> str:
    return f"{stem}-{uuid.uuid4().hex[:6]}"


# -- the manifest -----------------------------------------------------------------------------------
def test_report_records_key_size_etag_and_sha256_of_each_file(stack, stage_env, tmp_path):
    name = _name("manifest")
    data = {"model.pt": _weights(1), "model.safetensors": _safetensors(1)}
    ref = _register(stack, name, data, tmp_path)
    out = validate_version(ref, settings=Settings.from_env())
    assert out.report.verdict is Verdict.PASS, out.report.to_dict()["reasons"]
    loc = _prefix(ref)
    recorded = Registry(Settings.from_env()).report_of(out.run_id)
    files = {f["path"]: f for f in recorded["files"]}
    assert set(files) == set(data)
    for rel, body in data.items():
        head = _s3().head_object(Bucket=loc.bucket, Key=f"{loc.prefix}/{rel}")
        assert files[rel]["key"] == f"{loc.prefix}/{rel}"
        assert files[rel]["size"] == len(body)
        assert files[rel]["etag"] == head["ETag"].strip('"')
        assert files[rel]["version_id"] is None  # the test bucket is not versioned
        assert files[rel]["sha256"] == hashlib.sha256(body).hexdigest()
    assert recorded["storage"]["uri"] == loc.uri and recorded["storage"]["versioned"] is False
    # The tag is the manifest's digest, as the contract specifies it.
    text = "".join(f"{p}\t{hashlib.sha256(data[p]).hexdigest()}\n" for p in sorted(data))
    assert _tags(ref)["ckpt_stage.sha256"] == hashlib.sha256(text.encode()).hexdigest()


def _safetensors(seed: int) -> bytes:
    from safetensors.torch import save

    torch.manual_seed(seed)
    return save(torch.nn.Linear(4, 2).state_dict())


# -- re-check of promoted versions ------------------------------------------------------------------
def test_overwritten_file_loses_the_alias_and_is_quarantined(stack, stage_env, tmp_path):
    name = _name("overwrite")
    v1 = _register(stack, name, {"model.pt": _weights(1)}, tmp_path)
    v2 = _register(stack, name, {"model.pt": _weights(2)}, tmp_path)
    _promote(v1, v2)
    assert _alias(name) == v2.version
    validated_at = _tags(v2)["ckpt_stage.validated_at"]
    loc = _prefix(v2)
    _s3().put_object(Bucket=loc.bucket, Key=f"{loc.prefix}/model.pt", Body=_weights(99))  # same size, other bytes

    results = {r.ref.version: r for r in recheck_promoted(settings=Settings.from_env(), model=name)}
    assert results[v1.version].outcome == "same"
    assert results[v2.version].outcome == "quarantined"
    assert [(d.path, d.kind) for d in results[v2.version].differences] == [("model.pt", "changed")]
    tags = _tags(v2)
    assert tags["ckpt_stage.status"] == "quarantined"
    assert tags["ckpt_stage.reasons"] == "INTEGRITY_MISMATCH"
    assert "model.pt" in tags["ckpt_stage.summary"] and validated_at in tags["ckpt_stage.summary"]
    assert tags["ckpt_stage.attempt"] == "1"  # the attempt's run still holds what was validated
    assert _alias(name) == v1.version
    assert "validated" not in MlflowClient().get_model_version(name, v2.version).aliases
    # A re-run validates the new bytes as a new attempt, and the alias follows the verdict.
    again = validate_version(v2, settings=Settings.from_env(), force=True)
    assert again.report.verdict is Verdict.PASS and again.report.attempt == 2
    assert again.report.files[0].sha256 == hashlib.sha256(_weights(99)).hexdigest()
    assert _alias(name) == v2.version
    assert recheck_promoted(settings=Settings.from_env(), model=name)[1].outcome == "same"


@pytest.mark.parametrize("change", ["added", "removed"])
def test_added_or_removed_file_loses_the_alias_and_is_quarantined(stack, stage_env, tmp_path, change):
    name = _name(change)
    v1 = _register(stack, name, {"model.pt": _weights(1)}, tmp_path)
    v2 = _register(stack, name, {"model.pt": _weights(2), "model.safetensors": _safetensors(2)}, tmp_path)
    _promote(v1, v2)
    loc = _prefix(v2)
    if change == "added":
        _s3().put_object(Bucket=loc.bucket, Key=f"{loc.prefix}/extra/evil.pkl", Body=b"\x80\x04N.")
        expected = [("extra/evil.pkl", "added")]
    else:
        _s3().delete_object(Bucket=loc.bucket, Key=f"{loc.prefix}/model.safetensors")
        expected = [("model.safetensors", "removed")]
    [r1, r2] = recheck_promoted(settings=Settings.from_env(), model=name)
    assert r1.outcome == "same" and r2.outcome == "quarantined"
    assert [(d.path, d.kind) for d in r2.differences] == expected
    tags = _tags(v2)
    assert (tags["ckpt_stage.status"], tags["ckpt_stage.reasons"]) == ("quarantined", "INTEGRITY_MISMATCH")
    assert expected[0][0] in tags["ckpt_stage.summary"]
    assert _alias(name) == v1.version


def test_every_file_removed_takes_the_alias_away_entirely(stack, stage_env, tmp_path):
    name = _name("gone")
    v1 = _register(stack, name, {"model.pt": _weights(1)}, tmp_path)
    _promote(v1)
    loc = _prefix(v1)
    _s3().delete_object(Bucket=loc.bucket, Key=f"{loc.prefix}/model.pt")
    [r] = recheck_promoted(settings=Settings.from_env(), model=name)
    assert r.outcome == "quarantined" and [d.kind for d in r.differences] == ["removed"]
    assert _alias(name) is None


def test_unchanged_version_is_untouched_and_costs_no_download(stack, stage_env, tmp_path, s3_proxy):
    name = _name("same")
    v1 = _register(stack, name, {"model.pt": _weights(1), "model.safetensors": _safetensors(1)}, tmp_path)
    _promote(v1)
    before = _tags(v1)
    loc = _prefix(v1)
    for attempt in (1, 2):
        s3_proxy.seen.clear()
        [r] = recheck_promoted(settings=Settings.from_env(), model=name)
        assert r.outcome == "same"
        objects = [(m, p) for m, p in s3_proxy.seen if p.split("?")[0].startswith(f"/{loc.bucket}/{loc.prefix}/")]
        assert objects == [], objects  # no GET and no HEAD of the model's files: one listing only
        from urllib.parse import quote

        listings = [p for m, p in s3_proxy.seen if m == "GET" and f"prefix={quote(loc.prefix, safe='')}" in p]
        assert len(listings) == 1, s3_proxy.seen
        reports = [p for m, p in s3_proxy.seen if m == "GET" and p.split("?")[0].endswith("/report.json")]
        # The manifest is downloaded once, then read from the cache (and checked against the tag).
        assert len(reports) == (1 if attempt == 1 else 0), reports
    assert _tags(v1) == before
    assert _alias(name) == v1.version


def test_edited_report_cannot_vouch_for_other_bytes(stack, stage_env, tmp_path):
    """The manifest is checked against the version's ckpt_stage.sha256 tag before it is trusted."""
    name = _name("forged")
    v1 = _register(stack, name, {"model.pt": _weights(1)}, tmp_path)
    _promote(v1)
    MlflowClient().set_model_version_tag(name, v1.version, "ckpt_stage.sha256", "0" * 64)
    [r] = recheck_promoted(settings=Settings.from_env(), model=name)
    assert r.outcome == "quarantined"
    assert "report.json" in _tags(v1)["ckpt_stage.summary"]
    assert _alias(name) is None


def test_report_edited_in_s3_to_match_changed_objects_is_caught(stack, stage_env, tmp_path):
    """Someone who can write to the bucket (but not to MLflow) overwrites the model and edits the
    report.json beside it so its ETags match: the manifest tag pins the validated objects."""
    name = _name("edited")
    v1 = _register(stack, name, {"model.pt": _weights(1)}, tmp_path)
    _promote(v1)
    loc = _prefix(v1)
    etag = _s3().put_object(Bucket=loc.bucket, Key=f"{loc.prefix}/model.pt", Body=_weights(42))["ETag"].strip('"')
    run = MlflowClient().get_run(_tags(v1)["ckpt_stage.run_id"])
    report_loc = S3Location.parse(run.info.artifact_uri + "/report.json")
    report = json.loads(_s3().get_object(Bucket=report_loc.bucket, Key=report_loc.prefix)["Body"].read())
    report["files"][0]["etag"] = etag
    _s3().put_object(Bucket=report_loc.bucket, Key=report_loc.prefix, Body=json.dumps(report).encode())
    [r] = recheck_promoted(settings=Settings.from_env(), model=name)
    assert r.outcome == "quarantined" and r.differences[0].path == "report.json"
    assert _alias(name) is None


# -- downloading exactly what was listed ------------------------------------------------------------
class ReplacingStorage(S3Storage):
    """Overwrites a file in S3 right after the stage listed the version, ``times`` times: the
    time-of-check/time-of-use race of a re-upload during a validation, on the real server."""

    def __init__(self, settings, key: str, bodies: list[bytes]):
        super().__init__(settings, sleep=lambda s: None)
        self.key, self.bodies, self.listings = key, list(bodies), 0

    def list_files(self, loc):
        files = super().list_files(loc)
        self.listings += 1
        if self.bodies:
            self.client.put_object(Bucket=loc.bucket, Key=self.key, Body=self.bodies.pop(0))
        return files


def test_file_replaced_during_validation_is_relisted_never_mixed(stack, stage_env, tmp_path):
    name = _name("race")
    # model.pt is replaced by the weights model.safetensors holds: only the new listing's bytes agree with
    # each other (two copies of the weights must be equal), so a mix of the listings could not pass either.
    ref = _register(stack, name, {"model.pt": _weights(1), "model.safetensors": _safetensors(7)}, tmp_path)
    loc = _prefix(ref)
    new = _weights(7)
    storage = ReplacingStorage(Settings.from_env(), f"{loc.prefix}/model.pt", [new])
    out = validate_version(ref, settings=Settings.from_env(), storage=storage)
    assert storage.listings == 2  # the 412 made the stage list again
    assert out.report.verdict is Verdict.PASS, out.report.to_dict()["reasons"]
    files = {f.path: f for f in out.report.files}
    head = _s3().head_object(Bucket=loc.bucket, Key=f"{loc.prefix}/model.pt")
    # The verdict and its manifest are about the bytes now in S3, not a mix of the two listings.
    assert files["model.pt"].sha256 == hashlib.sha256(new).hexdigest()
    assert files["model.pt"].etag == head["ETag"].strip('"')
    assert recheck_promoted(settings=Settings.from_env(), model=name)[0].outcome == "same"


def test_files_that_keep_changing_end_in_error_not_a_verdict(stack, stage_env, tmp_path):
    name = _name("churn")
    ref = _register(stack, name, {"model.pt": _weights(1)}, tmp_path)
    loc = _prefix(ref)
    storage = ReplacingStorage(Settings.from_env(), f"{loc.prefix}/model.pt", [_weights(s) for s in range(10, 20)])
    out = validate_version(ref, settings=Settings.from_env(), storage=storage)
    assert out.report.verdict is Verdict.ERROR
    assert [r.code.value for r in out.report.reasons] == ["STORAGE_UNAVAILABLE"]
    assert "kept changing" in out.report.reasons[0].message and out.report.reasons[0].file == "model.pt"
    assert _tags(ref)["ckpt_stage.status"] == "error"  # eligible for the next sweep
    assert _alias(name) is None


# -- versioned bucket -------------------------------------------------------------------------------
@pytest.fixture
def versioned_bucket(stack, stage_env):
    bucket = f"versioned-{uuid.uuid4().hex[:8]}"
    devstack.create_bucket(stack.s3.url, bucket)
    _s3().put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
    return bucket


def test_versioned_bucket_fetches_the_listed_version_and_rechecks_by_version_id(stack, versioned_bucket, tmp_path):
    name = _name("versioned")
    old = _weights(1)
    v1 = _register(stack, name, {"model.pt": _weights(3)}, tmp_path, bucket=versioned_bucket)
    v2 = _register(stack, name, {"model.pt": old}, tmp_path, bucket=versioned_bucket)
    _promote(v1)
    loc = _prefix(v2)
    listed = _s3().head_object(Bucket=versioned_bucket, Key=f"{loc.prefix}/model.pt")["VersionId"]
    # Overwritten between listing and download: the GET by VersionId still returns the listed bytes.
    storage = ReplacingStorage(Settings.from_env(), f"{loc.prefix}/model.pt", [_weights(8)])
    out = validate_version(v2, settings=Settings.from_env(), storage=storage)
    assert out.report.verdict is Verdict.PASS
    assert storage.listings == 1
    [f] = out.report.files
    assert (f.version_id, f.sha256) == (listed, hashlib.sha256(old).hexdigest())
    assert out.report.extra["storage"]["versioned"] is True
    assert _alias(name) == v2.version
    # The current object is no longer the validated version: the next pass quarantines v2.
    results = {r.ref.version: r for r in recheck_promoted(settings=Settings.from_env(), model=name)}
    assert results[v1.version].outcome == "same"
    assert results[v2.version].outcome == "quarantined"
    assert f"version {listed} → " in results[v2.version].differences[0].detail
    assert _alias(name) == v1.version


# -- verify at serving time -------------------------------------------------------------------------
def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ckpt_stage.cli", *args], capture_output=True, text=True,
                          env=dict(os.environ), timeout=300)


def _mlflow_download(uri: str, dest: Path) -> Path:
    proc = subprocess.run([str(Path(sys.executable).with_name("mlflow")), "artifacts", "download",
                           "--artifact-uri", uri, "--dst-path", str(dest)],
                          capture_output=True, text=True, env=dict(os.environ), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return Path(proc.stdout.strip().splitlines()[-1])


@pytest.fixture
def served(stack, stage_env, tmp_path):
    name = _name("serve")
    ref = _register(stack, name, {"model.pt": _weights(1), "sub/model.safetensors": _safetensors(1)}, tmp_path)
    _promote(ref)
    folder = _mlflow_download(f"models:/{name}@validated", tmp_path / "download")  # as the README says
    return ref, folder


def test_verify_passes_on_a_faithful_download(served):
    ref, folder = served
    assert sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()) == [
        "model.pt", "sub/model.safetensors"]
    for selector in (["--version", ref.version], ["--alias", "validated"]):
        proc = _cli("verify", "--model", ref.name, *selector, str(folder), "--json")
        assert proc.returncode == 0, proc.stderr[-2000:]
        doc = json.loads(proc.stdout)
        assert doc["ok"] is True and doc["differences"] == [] and doc["files"] == 2
        assert doc["version"] == ref.version
    assert verify_download(folder, ref.name, alias="validated", settings=Settings.from_env()).ok


def _break(folder: Path, how: str) -> tuple[str, str]:
    if how == "byte":
        p = folder / "model.pt"
        data = bytearray(p.read_bytes())
        data[len(data) // 2] ^= 0x01
        p.write_bytes(bytes(data))
        return "model.pt", "changed"
    if how == "missing":
        (folder / "sub" / "model.safetensors").unlink()
        return "sub/model.safetensors", "missing"
    if how == "extra":
        (folder / "sub" / "loader.py").write_text("import os\n")
        return "sub/loader.py", "extra"
    (folder / "model.pt").unlink()
    (folder / "model.pt").symlink_to("/etc/passwd")
    return "model.pt", "changed"


@pytest.mark.parametrize("how", ["byte", "missing", "extra", "symlink"])
def test_verify_fails_on_any_difference_and_names_the_file(served, how):
    ref, folder = served
    rel, kind = _break(folder, how)
    proc = _cli("verify", "--model", ref.name, "--version", ref.version, str(folder), "--json")
    assert proc.returncode == 1, proc.stderr[-2000:]
    doc = json.loads(proc.stdout)
    assert doc["ok"] is False
    assert [(d["path"], d["kind"]) for d in doc["differences"]] == [(rel, kind)]
    text = _cli("verify", "--model", ref.name, "--alias", "validated", str(folder))
    assert text.returncode == 1 and text.stdout == ""
    assert f"{kind}: {rel}" in text.stderr and "do not load it" in text.stderr
    result = verify_download(folder, ref.name, version=ref.version, settings=Settings.from_env())
    assert not result.ok and [d.path for d in result.differences] == [rel]


def test_verify_refuses_a_version_that_is_not_promoted(served):
    ref, folder = served
    MlflowClient().set_model_version_tag(ref.name, ref.version, "ckpt_stage.status", "quarantined")
    proc = _cli("verify", "--model", ref.name, "--version", ref.version, str(folder), "--json")
    assert proc.returncode == 1
    doc = json.loads(proc.stdout)
    assert doc["differences"] == [] and "quarantined" in doc["problem"]


def test_verify_usage_and_error_exit_codes(served, monkeypatch):
    ref, folder = served
    assert _cli("verify", "--model", ref.name, str(folder)).returncode == 2  # neither --version nor --alias
    assert _cli("verify", "--model", ref.name, "--version", "1", "--alias", "x", str(folder)).returncode == 2
    assert _cli("verify", "--model", ref.name, "--version", "999", str(folder)).returncode == 2
    assert _cli("verify", "--model", ref.name, "--alias", "nope", str(folder)).returncode == 2
    assert _cli("verify", "--model", ref.name, "--version", ref.version, str(folder / "nope")).returncode == 2
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{devstack.free_port()}")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    proc = _cli("verify", "--model", ref.name, "--version", ref.version, str(folder), "--json")
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert json.loads(proc.stdout)["ok"] is False


# -- the sweep runs the re-check --------------------------------------------------------------------
def test_sweep_rechecks_promoted_versions_first(stack, stage_env, tmp_path):
    from click.testing import CliRunner

    from ckpt_stage.cli import main

    name = _name("sweeprecheck")
    v1 = _register(stack, name, {"model.pt": _weights(1)}, tmp_path)
    v2 = _register(stack, name, {"model.pt": _weights(2)}, tmp_path)
    _promote(v1, v2)
    loc = _prefix(v2)
    _s3().put_object(Bucket=loc.bucket, Key=f"{loc.prefix}/model.pt", Body=_weights(5))
    result = CliRunner().invoke(main, ["sweep", "--json"])
    doc = json.loads(result.stdout)
    mine = [r for r in doc["integrity"]["results"] if r["model"] == name]
    assert [(r["version"], r["outcome"]) for r in mine] == [(v1.version, "same"), (v2.version, "quarantined")]
    assert _alias(name) == v1.version
    assert not [r for r in doc["results"] if r.get("model") == name]  # a quarantine waits for a re-run
    proc = _cli("recheck", "--model", name, "--json")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert [r["outcome"] for r in json.loads(proc.stdout)["results"]] == ["same"]
