"""Integrity after the verdict: what was validated is exactly what gets served.

A verdict is about bytes, but the alias points at a version, and a version points at an S3 location
that anyone with write access to the bucket can change after the verdict (a re-upload to the same
path, or on purpose: the time-of-check/time-of-use gap). Three guards close it:

- the report of every attempt is the version's **manifest**: per file the path, S3 key, size, ETag,
  VersionId (None when the bucket is not versioned) and sha256, with ``ckpt_stage.sha256`` as its
  digest (docs/contract.md); the download fetched exactly those objects (``pipeline.fetch_listed``);
- :func:`recheck_promoted`, a cheap pass (one listing per version, a HEAD only for a version that is a
  single object; no download) run by every sweep, compares each promoted version's objects with its
  manifest and takes a version whose objects changed out of service (``INTEGRITY_MISMATCH``);
- :func:`verify_download` (``ckpt-stage verify``) checks, on the serving host, that a downloaded folder
  holds exactly the manifest's files (names, sizes, sha256) before anything loads it.

Manifests are read from the attempt's ``report.json`` once and cached under the cache folder by run id
(a run's report is written once); each use re-checks it against the version's ``ckpt_stage.sha256`` tag,
so neither a stale cache nor an edited ``report.json`` can vouch for other bytes.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ckpt_stage.config import Settings
from ckpt_stage.domain import ReasonCode, Status, VersionRef
from ckpt_stage.errors import ArtifactMissing, CkptStageError, ConfigError, ManifestUnavailable, UsageError
from ckpt_stage.registry import MANIFEST_SHA256, RUN_ID, SHA256, VALIDATED_AT, Registry, VersionState
from ckpt_stage.storage import (
    RemoteFile,
    S3Location,
    S3Storage,
    manifest_digest,
    resolve_artifact_uri,
    sha256_file,
    version_digest,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Manifest:
    """What one attempt validated: the report's ``files`` and where they live."""

    ref: VersionRef
    run_id: str
    files: tuple[dict[str, Any], ...]
    storage: dict[str, Any] = field(default_factory=dict)
    validated_at: str = ""
    attempt: int = 0
    digest_ok: bool = True

    @property
    def by_path(self) -> dict[str, dict[str, Any]]:
        return {str(f["path"]): f for f in self.files}


@dataclass(frozen=True)
class Difference:
    """One file that is not what the manifest says. ``kind``: for S3, ``changed`` · ``added`` ·
    ``removed``; for a downloaded folder, ``changed`` · ``missing`` · ``extra``."""

    path: str
    kind: str
    detail: str = ""

    def describe(self) -> str:
        return f"{self.kind} {self.path}" + (f" ({self.detail})" if self.detail else "")

    def to_dict(self) -> dict[str, str]:
        return {"path": self.path, "kind": self.kind, "detail": self.detail}


# -- manifests -------------------------------------------------------------------------------------
def _cache_path(settings: Settings, run_id: str) -> Path:
    safe = "".join(c for c in run_id if c.isalnum())[:64] or "run"
    return settings.cache_dir / "manifests" / f"{safe}.json"


def _read_report(registry: Registry, settings: Settings, run_id: str) -> dict[str, Any] | None:
    path = _cache_path(settings, run_id)
    try:
        return dict(json.loads(path.read_text()))
    except (OSError, ValueError):
        pass
    report = registry.report_of(run_id)
    if report is None:
        return None
    try:  # best effort: a cache that cannot be written only costs a report download next time
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".incomplete")
        with os.fdopen(fd, "w") as fh:
            json.dump({k: report.get(k) for k in ("files", "storage", "attempt", "model")}, fh)
        os.replace(tmp, path)
    except OSError as exc:
        log.debug("manifest cache not written: %s", exc)
    return report


def manifest_of(state: VersionState, registry: Registry, settings: Settings) -> Manifest:
    """The manifest of the attempt that holds the version's verdict (``ckpt_stage.run_id``)."""
    run_id = state.tags.get(RUN_ID, "")
    if not run_id:
        raise ManifestUnavailable(f"{state.ref} has no recorded attempt ({RUN_ID} is not set)",
                                  hint=f"run `ckpt-stage rerun --model {state.ref.name} --version {state.ref.version}`")
    report = _read_report(registry, settings, run_id)
    if report is None or not isinstance(report.get("files"), list):
        raise ManifestUnavailable(
            f"{state.ref}: the report.json of run {run_id} is missing or has no files",
            hint="check that the stage can read the MLflow artifact location, then re-run the version")
    files = tuple(f for f in report["files"] if isinstance(f, dict) and "path" in f)
    digest_ok = version_digest([(str(f["path"]), str(f.get("sha256", ""))) for f in files]) == state.tags.get(SHA256)
    pinned = state.tags.get(MANIFEST_SHA256)
    if pinned:  # versions validated before this tag existed have only ckpt_stage.sha256
        try:
            digest_ok = digest_ok and pinned == manifest_digest(
                [(str(f["path"]), f.get("key"), int(f.get("size", -1)), f.get("etag"), f.get("version_id"),
                  str(f.get("sha256", ""))) for f in files])
        except (TypeError, ValueError):
            digest_ok = False
    return Manifest(
        ref=state.ref, run_id=run_id, files=files, storage=dict(report.get("storage") or {}),
        validated_at=state.tags.get(VALIDATED_AT, ""), attempt=int(report.get("attempt") or state.attempt),
        digest_ok=digest_ok,
    )


# -- re-check of promoted versions (S3 listing vs manifest) ---------------------------------------
def compare_listing(manifest: Manifest, listing: list[RemoteFile]) -> list[Difference]:
    """Objects under the version's location against the manifest: changed, added, removed.

    An object is the one validated when its VersionId is the recorded one (versioned bucket), else
    when its ETag and size are; a manifest recorded before ETags were (no ``etag``) compares sizes.
    """
    now = {rf.rel: rf for rf in listing}
    out: list[Difference] = []
    for path, rec in sorted(manifest.by_path.items()):
        rf = now.get(path)
        if rf is None:
            out.append(Difference(path, "removed", "no longer in S3"))
            continue
        detail = []
        if rec.get("version_id") and rf.version_id and rec["version_id"] != rf.version_id:
            detail.append(f"version {rec['version_id']} → {rf.version_id}")
        if rec.get("etag") and rec["etag"] != rf.etag:
            detail.append(f"etag {rec['etag']} → {rf.etag}")
        if int(rec.get("size", -1)) != rf.size:
            detail.append(f"size {rec.get('size')} → {rf.size}")
        if detail:
            out.append(Difference(path, "changed", ", ".join(detail)))
    for path in sorted(set(now) - set(manifest.by_path)):
        out.append(Difference(path, "added", f"{now[path].size} bytes, not validated"))
    return out


@dataclass(frozen=True)
class RecheckResult:
    ref: VersionRef
    outcome: str
    """``same`` · ``quarantined`` · ``error`` (could not check: left as it is) · ``skipped``."""
    differences: tuple[Difference, ...] = ()
    message: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.ref.name, "version": self.ref.version, "outcome": self.outcome,
                "differences": [d.to_dict() for d in self.differences], "message": self.message}


def mismatch_summary(manifest: Manifest, diffs: list[Difference], *, limit: int = 500) -> str:
    """The quarantine's sentence: which files changed, and when the version was validated."""
    ref = manifest.ref
    head = (f"Quarantined: the files of {ref.name} version {ref.version} changed in S3 after attempt "
            f"{manifest.attempt} validated them at {manifest.validated_at or 'an unrecorded time'}: ")
    tail = (f". Run `ckpt-stage rerun --model {ref.name} --version {ref.version}` to validate the new bytes, "
            "or restore the validated objects.")
    parts: list[str] = []
    for i, d in enumerate(diffs):
        desc, rest = d.describe(), f"and {len(diffs) - i} more"
        if parts and len(head) + len("; ".join([*parts, desc, rest])) + len(tail) > limit:
            parts.append(rest)
            break
        parts.append(desc)
    text = head + "; ".join(parts) + tail
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _location(manifest: Manifest, state: VersionState, registry: Registry, settings: Settings) -> S3Location:
    uri = manifest.storage.get("uri")
    if uri:
        return S3Location.parse(str(uri))
    # A manifest recorded before the report named its location: resolve it as validate does.
    return resolve_artifact_uri(registry.download_uri(state.ref), settings)


def recheck_version(state: VersionState, *, settings: Settings, registry: Registry,
                    storage: S3Storage) -> RecheckResult:
    """Compare one promoted version's objects with its manifest; quarantine it on any difference."""
    return _settle(state, *_compare(state, settings=settings, registry=registry, storage=storage),
                   registry=registry)


def _compare(state: VersionState, *, settings: Settings, registry: Registry,
             storage: S3Storage) -> tuple[Manifest, list[Difference]]:
    """The reading half of a re-check (manifest, S3 listing): it writes nothing."""
    manifest = manifest_of(state, registry, settings)
    if not manifest.digest_ok:
        diffs = [Difference("report.json", "changed",
                            f"the manifest of run {manifest.run_id} does not match the {SHA256} / "
                            f"{MANIFEST_SHA256} tags")]
    else:
        loc = _location(manifest, state, registry, settings)
        try:
            listing = storage.list_files(loc)
        except ArtifactMissing:
            listing = []
        diffs = compare_listing(manifest, listing)
    return manifest, diffs


def _settle(state: VersionState, manifest: Manifest, diffs: list[Difference], *, registry: Registry) -> RecheckResult:
    """The writing half: a version whose objects differ is quarantined."""
    if not diffs:
        return RecheckResult(state.ref, "same")
    summary = mismatch_summary(manifest, diffs)
    log.warning("%s", summary)
    done = registry.quarantine_promoted(state.ref, codes=ReasonCode.INTEGRITY_MISMATCH.value, summary=summary,
                                        expect_run_id=manifest.run_id)
    return RecheckResult(state.ref, "quarantined" if done else "skipped", tuple(diffs), summary)


RECHECK_CONCURRENCY = 8
"""Promoted versions whose objects a re-check pass lists at once."""


def recheck_promoted(
    *,
    settings: Settings,
    registry: Registry | None = None,
    storage: S3Storage | None = None,
    model: str | None = None,
    on_result: Callable[[RecheckResult], None] | None = None,
) -> list[RecheckResult]:
    """The re-check pass over every promoted version (of ``model``, or all).

    A version that cannot be checked now (S3 or MLflow unavailable, no readable manifest) is left as it
    is and reported as ``error``; the next pass checks it again. Never downloads a model file.
    """
    registry = registry or Registry(settings)
    storage = storage or S3Storage(settings)
    out: list[RecheckResult] = []
    states = registry.promoted(model=model)

    def compare(state: VersionState) -> tuple[Manifest, list[Difference]] | BaseException:
        try:
            return _compare(state, settings=settings, registry=registry, storage=storage)
        except Exception as exc:  # noqa: BLE001 - handed to the loop below, in the work list's order
            return exc

    # The reading half (one S3 listing per version; the manifest from the local cache after the first pass)
    # runs RECHECK_CONCURRENCY at a time; the quarantines are written one after the other, in order, so two
    # of one model never move its alias at once.
    with ThreadPoolExecutor(max_workers=max(1, min(RECHECK_CONCURRENCY, len(states)))) as pool:
        compared = pool.map(compare, states)
        for state, found in zip(states, compared, strict=True):
            try:
                if isinstance(found, BaseException):
                    raise found
                result = _settle(state, *found, registry=registry)
            except (UsageError, ConfigError):
                raise
            except CkptStageError as exc:
                log.warning("re-check of %s skipped: %s", state.ref, exc)
                result = RecheckResult(state.ref, "error", message=f"{exc.code.value}: {exc.message}")
            if on_result:
                on_result(result)
            out.append(result)
    return out


# -- verify a downloaded folder (serving host) -----------------------------------------------------
@dataclass(frozen=True)
class VerifyResult:
    ref: VersionRef
    path: Path
    status: str | None
    validated_at: str
    files: int
    differences: tuple[Difference, ...] = ()
    problem: str = ""
    """Why the version must not be served even if its files match (it is not ``promoted``)."""

    @property
    def ok(self) -> bool:
        return not self.differences and not self.problem

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "model": self.ref.name, "version": self.ref.version, "path": str(self.path),
                "status": self.status, "validated_at": self.validated_at, "files": self.files,
                "differences": [d.to_dict() for d in self.differences], "problem": self.problem}


def _local_files(root: Path) -> dict[str, Path]:
    """Every entry under ``root`` that is a file or a link, by POSIX path relative to ``root``."""
    if root.is_file() and not root.is_symlink():
        return {root.name: root}
    out: dict[str, Path] = {}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        base = Path(dirpath)
        # A link to a directory is not walked into (it could point anywhere): it is an entry of its own.
        names = filenames + [d for d in dirnames if (base / d).is_symlink()]
        for name in names:
            p = base / name
            out[p.relative_to(root).as_posix()] = p
    return out


def compare_folder(root: Path, files: list[dict[str, Any]] | tuple[dict[str, Any], ...]) -> list[Difference]:
    """A local folder against manifest entries (``path``, ``size``, ``sha256``): changed, missing, extra.

    Links are never followed: a link where a file is expected is a change (the loader would read
    whatever it points at)."""
    actual = _local_files(root)
    out: list[Difference] = []
    for rec in sorted(files, key=lambda f: str(f["path"])):
        rel = str(rec["path"])
        p = actual.get(rel)
        if p is None:
            out.append(Difference(rel, "missing", "recorded by the verdict, not in the folder"))
            continue
        if p.is_symlink() or not p.is_file():
            out.append(Difference(rel, "changed", "not a regular file (a link or a special file)"))
            continue
        size = p.stat().st_size
        if size != int(rec.get("size", -1)):
            out.append(Difference(rel, "changed", f"size {size}, validated {rec.get('size')}"))
            continue
        sha = sha256_file(p)
        if sha != rec.get("sha256"):
            out.append(Difference(rel, "changed", f"sha256 {sha}, validated {rec.get('sha256')}"))
    recorded = {str(f["path"]) for f in files}
    for rel in sorted(set(actual) - recorded):
        out.append(Difference(rel, "extra", "not among the validated files"))
    return out


def verify_download(
    path: str | os.PathLike[str],
    model: str,
    *,
    version: str | int | None = None,
    alias: str | None = None,
    settings: Settings,
    registry: Registry | None = None,
) -> VerifyResult:
    """Check a downloaded model folder against the files its verdict recorded, before loading it.

    ``path`` is what ``mlflow artifacts download --artifact-uri models:/NAME/N`` (or ``models:/NAME@ALIAS``)
    wrote. Give exactly one of ``version`` and ``alias``. ``result.ok`` is True only when the version is
    ``promoted`` and the folder holds exactly its validated files, byte for byte (names, sizes,
    sha256); ``result.differences`` names each file that differs. Raises ``UsageError`` for an unknown
    model, version or alias or a missing folder, and another ``CkptStageError`` when the registry or the
    manifest cannot be read.
    """
    if (version is None) == (alias is None):
        raise UsageError("give exactly one of a version and an alias")
    root = Path(path)
    if not root.exists():
        raise UsageError(f"no such file or directory: {root}")
    registry = registry or Registry(settings)
    if alias is not None:
        found = registry.alias_version(model, alias)
        if found is None:
            raise UsageError(f"model {model!r} has no alias {alias!r}")
        version = found
    state = registry.get(VersionRef(model, str(version)))
    status = state.status
    problem = ""
    if status is not Status.PROMOTED:
        reasons = ",".join(state.reasons)
        problem = (f"{state.ref} is {status.value if status else 'not validated'}"
                   + (f" ({reasons})" if reasons else "") + ": it must not be served")
        if not state.tags.get(RUN_ID):
            return VerifyResult(state.ref, root, status.value if status else None,
                                state.tags.get(VALIDATED_AT, ""), 0, (), problem)
    manifest = manifest_of(state, registry, settings)
    if not manifest.digest_ok:
        raise ManifestUnavailable(
            f"{state.ref}: the recorded manifest (report.json of run {manifest.run_id}) does not match the "
            f"version's {SHA256} / {MANIFEST_SHA256} tags", hint="the record was altered; re-run the version before serving it")
    try:
        diffs = compare_folder(root, manifest.files)
    except OSError as exc:
        raise CkptStageError(f"reading {root}: {exc}", hint="check the folder's permissions") from exc
    return VerifyResult(state.ref, root, status.value if status else None, manifest.validated_at,
                        len(manifest.files), tuple(diffs), problem)


__all__ = ["Difference", "Manifest", "RecheckResult", "VerifyResult", "compare_folder", "compare_listing",
           "manifest_of", "recheck_promoted", "recheck_version", "verify_download"]
