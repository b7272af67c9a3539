"""The host's content-addressed cache of downloaded objects (``ckpt_stage.cache``), on real files."""

from __future__ import annotations

import hashlib
import os
import threading

import pytest

from ckpt_stage.cache import ObjectCache
from ckpt_stage.config import Settings


def downloaded(tmp_path, name: str, data: bytes):
    """A file as the downloader leaves it: read-only, with its sha256."""
    path = tmp_path / "dl" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    os.chmod(path, 0o444)
    return path, hashlib.sha256(data).hexdigest()


def test_a_stored_object_is_found_again_as_a_hard_link_with_its_digest(tmp_path):
    cache = ObjectCache(tmp_path / "objects", 1 << 20)
    path, sha = downloaded(tmp_path, "m.pt", b"weights" * 100)
    ident = cache.identity("b", "v1/m.pt", 700, "etag1", None)
    cache.store(ident, path, sha)
    target = tmp_path / "job" / "m.pt"
    assert cache.lookup(ident, 700, target) == sha
    assert target.read_bytes() == b"weights" * 100
    assert os.stat(target).st_ino == os.stat(path).st_ino  # no second copy on disk
    assert not os.access(target, os.W_OK) or os.geteuid() == 0
    assert oct(os.stat(target).st_mode & 0o777) == "0o444"


@pytest.mark.parametrize("changed", [dict(etag="etag2"), dict(version_id="v2"), dict(size=701), dict(key="v1/x.pt"),
                                     dict(bucket="other")])
def test_any_other_listing_of_the_object_is_a_miss(tmp_path, changed):
    cache = ObjectCache(tmp_path / "objects", 1 << 20)
    path, sha = downloaded(tmp_path, "m.pt", b"w" * 700)
    listed = dict(bucket="b", key="v1/m.pt", size=700, etag="etag1", version_id=None)
    cache.store(cache.identity(**listed), path, sha)
    other = {**listed, **changed}
    assert cache.lookup(cache.identity(**other), other["size"], tmp_path / "job" / "m.pt") is None


def test_an_object_without_etag_or_version_is_never_cached(tmp_path):
    assert ObjectCache.identity("b", "k", 1, "", None) is None
    assert ObjectCache(tmp_path, 1 << 20).lookup(None, 1, tmp_path / "t") is None


def test_a_blob_changed_on_disk_is_dropped_and_downloaded_again(tmp_path):
    cache = ObjectCache(tmp_path / "objects", 1 << 20)
    path, sha = downloaded(tmp_path, "m.pt", b"a" * 100)
    ident = cache.identity("b", "k", 100, "e", None)
    cache.store(ident, path, sha)
    blob = next((tmp_path / "objects" / "blobs").glob("*/*"))
    os.chmod(blob, 0o644)
    blob.write_bytes(b"b" * 100)  # same size, other bytes: only the digest can tell
    assert cache.lookup(ident, 100, tmp_path / "job" / "m.pt") is None
    assert not blob.exists() and not (tmp_path / "job" / "m.pt").exists()
    assert cache.lookup(ident, 100, tmp_path / "job" / "m.pt") is None  # the entry went too


def test_least_recently_used_objects_are_evicted_to_fit(tmp_path):
    cache = ObjectCache(tmp_path / "objects", 250)
    idents = []
    for i in range(3):
        path, sha = downloaded(tmp_path, f"f{i}", bytes([i]) * 100)
        ident = cache.identity("b", f"k{i}", 100, "e", None)
        idents.append(ident)
        cache.store(ident, path, sha)
        os.utime(tmp_path / "objects" / "index" / ident, (1000 + i, 1000 + i))
        if i == 1:  # f0 used again after f1 was stored: f1 is now the least recently used
            assert cache.lookup(idents[0], 100, tmp_path / "job" / "f0")
            os.utime(tmp_path / "objects" / "index" / idents[0], (2000, 2000))
    cache.evict()
    held = {i for i, ident in enumerate(idents) if cache.lookup(ident, 100, tmp_path / "again" / f"{ident}")}
    assert held == {0, 2}
    assert sum(b.stat().st_size for b in (tmp_path / "objects" / "blobs").glob("*/*")) <= 250


def test_a_file_larger_than_the_cache_is_not_kept_and_zero_turns_it_off(tmp_path):
    path, sha = downloaded(tmp_path, "big", b"x" * 300)
    small = ObjectCache(tmp_path / "a", 200)
    small.store(small.identity("b", "k", 300, "e", None), path, sha)
    assert not (tmp_path / "a" / "blobs").exists()
    off = ObjectCache(tmp_path / "b", 0)
    off.store(off.identity("b", "k", 300, "e", None), path, sha)
    assert not off.enabled and not (tmp_path / "b").exists()


def test_concurrent_tasks_store_and_read_one_object_safely(tmp_path):
    cache = ObjectCache(tmp_path / "objects", 1 << 20)
    data = os.urandom(50_000)
    ident = cache.identity("b", "k", len(data), "e", None)
    errors: list[BaseException] = []

    def task(i: int) -> None:
        try:
            target = tmp_path / f"job{i}" / "m.pt"
            if cache.lookup(ident, len(data), target) is None:
                path, sha = downloaded(tmp_path / f"t{i}", "m.pt", data)
                cache.store(ident, path, sha)
            elif target.read_bytes() != data:
                raise AssertionError("a hit served other bytes")
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=task, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(list((tmp_path / "objects" / "blobs").glob("*/*"))) == 1
    assert not list((tmp_path / "objects").rglob(".*.tmp"))


def test_cache_size_setting():
    assert Settings.from_env({"CKPT_STAGE_CACHE_MAX_BYTES": "2GiB"}).cache_max_bytes == 2 * 2**30
    assert Settings.from_env({"CKPT_STAGE_CACHE_MAX_BYTES": "0"}).cache_max_bytes == 0
    assert Settings.from_env({}).cache_max_bytes == 20 * 2**30
    with pytest.raises(Exception, match="CKPT_STAGE_CACHE_MAX_BYTES"):
        Settings.from_env({"CKPT_STAGE_CACHE_MAX_BYTES": "lots"})
