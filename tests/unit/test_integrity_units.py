"""Pure parts of the integrity checks: listing vs manifest, folder vs manifest, the quarantine sentence."""

from __future__ import annotations

import hashlib

from ckpt_stage.domain import FileInfo, VersionRef
from ckpt_stage.integrity import Manifest, compare_folder, compare_listing, mismatch_summary
from ckpt_stage.storage import RemoteFile

REF = VersionRef("clf", "3")


def _manifest(*files: dict) -> Manifest:
    return Manifest(REF, "run1", tuple(files), validated_at="2026-12-01T10:00:00Z", attempt=2)


def _rec(path: str, size: int = 10, etag: str = "e1", version_id: str | None = None) -> dict:
    return {"path": path, "size": size, "sha256": "x", "key": f"p/{path}", "etag": etag, "version_id": version_id}


def test_listing_that_matches_is_the_same():
    m = _manifest(_rec("a.pt"), _rec("b/c.pt", 5, "e2"))
    assert compare_listing(m, [RemoteFile("p/a.pt", "a.pt", 10, "e1"), RemoteFile("p/b/c.pt", "b/c.pt", 5, "e2")]) == []


def test_changed_added_removed_are_each_named():
    m = _manifest(_rec("a.pt"), _rec("gone.pt"))
    diffs = compare_listing(m, [RemoteFile("p/a.pt", "a.pt", 10, "e9"), RemoteFile("p/new.pkl", "new.pkl", 3, "e3")])
    assert [(d.path, d.kind) for d in diffs] == [("a.pt", "changed"), ("gone.pt", "removed"), ("new.pkl", "added")]
    assert "etag e1 → e9" in diffs[0].detail


def test_version_id_decides_in_a_versioned_bucket():
    m = _manifest(_rec("a.pt", version_id="v1"))
    # Same content uploaded again: same ETag and size, a new version. Not the object that was validated.
    [d] = compare_listing(m, [RemoteFile("p/a.pt", "a.pt", 10, "e1", "v2")])
    assert d.kind == "changed" and "version v1 → v2" in d.detail


def test_manifest_without_etags_compares_sizes():
    legacy = {"path": "a.pt", "size": 10, "sha256": "x"}
    assert compare_listing(_manifest(legacy), [RemoteFile("p/a.pt", "a.pt", 10, "zz")]) == []
    assert compare_listing(_manifest(legacy), [RemoteFile("p/a.pt", "a.pt", 11, "zz")])[0].kind == "changed"


def test_summary_names_files_and_validation_time_within_500_chars():
    m = _manifest(*[_rec(f"shard-{i:04d}.safetensors") for i in range(200)])
    diffs = compare_listing(m, [])
    text = mismatch_summary(m, diffs)
    assert len(text) <= 500
    assert "shard-0000.safetensors" in text and "2026-12-01T10:00:00Z" in text and "attempt 2" in text
    assert "more" in text and "ckpt-stage rerun --model clf --version 3" in text


def test_folder_comparison(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.pt").write_bytes(b"abc")
    (tmp_path / "sub" / "b.pt").write_bytes(b"defg")
    files = [{"path": "a.pt", "size": 3, "sha256": hashlib.sha256(b"abc").hexdigest()},
             {"path": "sub/b.pt", "size": 4, "sha256": hashlib.sha256(b"defg").hexdigest()}]
    assert compare_folder(tmp_path, files) == []
    (tmp_path / "sub" / "b.pt").write_bytes(b"defh")
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "link").symlink_to(tmp_path / "sub")  # a link to a folder is an entry, not walked into
    diffs = compare_folder(tmp_path, files)
    assert [(d.path, d.kind) for d in diffs] == [("sub/b.pt", "changed"), ("x/link", "extra")]
    assert "sha256" in diffs[0].detail


def test_fileinfo_carries_its_origin_only_for_registered_versions():
    plain = FileInfo("a.pt", 3, "h")
    assert set(plain.to_dict()) == {"path", "format", "size", "sha256"}
    origin = FileInfo("a.pt", 3, "h", key="p/a.pt", etag="e", version_id=None).to_dict()
    assert (origin["key"], origin["etag"], origin["version_id"]) == ("p/a.pt", "e", None)


def test_iam_policy_reads_models_and_writes_only_reports():
    import json
    from pathlib import Path

    doc = json.loads((Path(__file__).resolve().parents[2] / "infra" / "aws" / "iam-policy.json").read_text())
    by_sid = {s["Sid"]: s for s in doc["Statement"]}
    allowed_writes = [s for s in doc["Statement"] if s["Effect"] == "Allow"
                      and any(a.startswith(("s3:Put", "s3:Delete")) for a in _actions(s))]
    assert [s["Resource"] for s in allowed_writes] == ["arn:aws:s3:::ARTIFACT_BUCKET/EXPERIMENT_ID/*"]
    deny = by_sid["NeverWriteAnythingElse"]
    assert deny["Effect"] == "Deny" and deny["NotResource"] == "arn:aws:s3:::ARTIFACT_BUCKET/EXPERIMENT_ID/*"
    assert {"s3:PutObject", "s3:DeleteObject", "s3:DeleteObjectVersion"} <= set(deny["Action"])
    assert "s3:GetObjectVersion" in by_sid["ReadModelObjects"]["Action"]


def _actions(statement: dict) -> list[str]:
    a = statement["Action"]
    return [a] if isinstance(a, str) else list(a)


def test_manifest_digest_pins_objects_not_only_contents():
    from ckpt_stage.storage import manifest_digest

    a = [("a.pt", "p/a.pt", 3, "e1", None, "h"), ("b.pt", "p/b.pt", 4, "e2", None, "g")]
    assert manifest_digest(a) == manifest_digest(list(reversed(a)))
    assert manifest_digest(a) != manifest_digest([("a.pt", "p/a.pt", 3, "e9", None, "h"), a[1]])
    assert manifest_digest(a) != manifest_digest([("a.pt", "p/a.pt", 3, "e1", "v1", "h"), a[1]])
