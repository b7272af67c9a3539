"""S3 adapter: resolve a version's location, list it, download it into a local cache, verify it.

Downloads follow huggingface_hub's discipline: check free disk space, write ``*.incomplete``, hash
while writing, verify against what S3 listed, rename atomically. Retries (tenacity) happen only on
``TransientError`` (5xx, throttling, timeouts, connection resets), with exponential backoff, jitter,
an attempt count and a deadline; botocore's own retries are switched off so they do not multiply.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import logging
import os
import shutil
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, TypeVar
from urllib.parse import urlparse

import boto3
import boto3.exceptions
import botocore.exceptions
from botocore.config import Config
from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception,
    wait_random_exponential,
)

from ckpt_stage.cache import ObjectCache
from ckpt_stage.config import Settings
from ckpt_stage.errors import (
    ArtifactMissing,
    ConfigError,
    IntegrityMismatch,
    ObjectChanged,
    StorageMisconfigured,
    StorageUnavailable,
    is_retryable,
)
from ckpt_stage.scan.reading import sha256_of

log = logging.getLogger(__name__)
T = TypeVar("T")

CHUNK = 8 * 2**20

# Socket timeouts a client can have (seconds): one client per step, chosen to fit the time left.
_TIMEOUT_STEPS = (1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0)

# Everything boto3, botocore and urllib3 raise for a failed call; ``classify_s3_error`` sorts them.
_BOTO_ERRORS = (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError,
                boto3.exceptions.Boto3Error, ConnectionError, TimeoutError)

# S3 error codes that mean "try again" although some arrive with a 4xx status.
_TRANSIENT_CODES = {
    "RequestTimeout", "RequestTimeoutException", "Throttling", "ThrottlingException", "SlowDown",
    "RequestLimitExceeded", "TooManyRequestsException", "ProvisionedThroughputExceededException",
    "InternalError", "ServiceUnavailable", "BandwidthLimitExceeded", "EC2ThrottledException",
}
_MISCONFIGURED_CODES = {
    "AccessDenied", "AllAccessDisabled", "InvalidAccessKeyId", "SignatureDoesNotMatch", "NoSuchBucket",
    "InvalidBucketName", "AuthorizationHeaderMalformed", "ExpiredToken", "InvalidToken", "PermanentRedirect",
    "AccountProblem", "403", "301",
}


@dataclass(frozen=True)
class S3Location:
    bucket: str
    prefix: str

    @property
    def uri(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}"

    @classmethod
    def parse(cls, uri: str) -> S3Location:
        parsed = urlparse(uri)
        if parsed.scheme not in ("s3", "s3a", "s3n") or not parsed.netloc:
            raise StorageMisconfigured(f"not an S3 location: {uri!r}")
        return cls(parsed.netloc, parsed.path.lstrip("/"))


@dataclass(frozen=True)
class RemoteFile:
    key: str
    rel: str
    size: int
    etag: str = ""
    version_id: str | None = None
    """The object's VersionId when the bucket has versioning (downloads then fetch exactly that version)."""


@dataclass(frozen=True)
class Listing:
    """A version's objects as one listing saw them, with where and when: the DAG's ``plan`` task sizes the
    version from it and hands it to the validation, which downloads exactly these objects (by VersionId or
    ETag; ``pipeline.fetch_listed`` lists again when one changed since) instead of listing them again."""

    uri: str
    files: tuple[RemoteFile, ...]
    listed_at: float
    """``time.time()`` of the listing."""

    MAX_FILES = 64
    """A listing handed along at most this long (it travels in an Airflow XCom): a bigger one is listed
    again where it is validated."""

    @property
    def size(self) -> int:
        return sum(f.size for f in self.files)

    def age_s(self, now: float | None = None) -> float:
        return (time.time() if now is None else now) - self.listed_at

    def to_dict(self) -> dict[str, Any]:
        return {"uri": self.uri, "listed_at": self.listed_at,
                "files": [[f.key, f.rel, f.size, f.etag, f.version_id] for f in self.files]}

    @classmethod
    def from_dict(cls, data: Any) -> Listing | None:
        """The listing ``to_dict`` gave, or None for anything else (an older plan's item, a malformed one)."""
        try:
            files = tuple(RemoteFile(str(k), str(r), int(n), str(e or ""), None if v is None else str(v))
                          for k, r, n, e, v in data["files"])
            return cls(str(data["uri"]), files, float(data["listed_at"])) if files else None
        except (KeyError, TypeError, ValueError):
            return None


@dataclass(frozen=True)
class LocalFile:
    rel: str
    path: Path
    size: int
    sha256: str
    stamp: tuple[int, int, int, int] = (0, 0, 0, 0)
    """(inode, size, mtime_ns, ctime_ns) once the hashed bytes were in place (``reading.stamp_of``):
    the scan's stamp equal to it proves the scan read the bytes ``sha256`` describes, so the worker
    need not hash the file again (any later write or chmod moves ctime)."""


def resolve_artifact_uri(uri: str, settings: Settings) -> S3Location:
    """Map a registry download URI onto S3.

    ``mlflow-artifacts:/x`` (a proxying ``mlflow server``) is mapped onto the server's configured
    ``--artifacts-destination``, which the stage learns from ``CKPT_STAGE_ARTIFACTS_DESTINATION``.
    """
    parsed = urlparse(uri)
    if parsed.scheme in ("s3", "s3a", "s3n"):
        return S3Location.parse(uri)
    if parsed.scheme == "mlflow-artifacts":
        dest = settings.artifacts_destination
        if not dest:
            raise ConfigError(
                f"the version's files are at {uri!r}, served through the MLflow server's artifact proxy; "
                "set CKPT_STAGE_ARTIFACTS_DESTINATION to the server's --artifacts-destination "
                "(for example s3://mlflow-artifacts/) so the stage can read them from S3 directly",
                code=StorageMisconfigured.code,
            )
        base = S3Location.parse(dest)
        tail = parsed.path.lstrip("/")
        return S3Location(base.bucket, str(PurePosixPath(base.prefix, tail)) if base.prefix else tail)
    raise StorageMisconfigured(
        f"the version's files are at {uri!r}; only s3:// (and mlflow-artifacts: with "
        "CKPT_STAGE_ARTIFACTS_DESTINATION) locations are supported"
    )


def is_storage_error(exc: BaseException) -> bool:
    """An exception raised by boto3/botocore (also inside another library, such as MLflow's S3 artifact repository)."""
    return isinstance(exc, botocore.exceptions.BotoCoreError | botocore.exceptions.ClientError
                      | boto3.exceptions.Boto3Error)


def classify_s3_error(exc: BaseException, *, what: str) -> Exception:
    """botocore/urllib3 exception → TransientError or PermanentError naming ``what``."""
    if isinstance(exc, botocore.exceptions.ClientError):
        err = exc.response.get("Error", {})
        code = str(err.get("Code", ""))
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
        msg = f"{what}: {code or status} {err.get('Message', '')}".strip()
        if code in ("NoSuchKey", "404", "NotFound"):
            return ArtifactMissing(msg, hint="the registered version points at files that do not exist")
        if code in _TRANSIENT_CODES or status >= 500 or status == 429:
            return StorageUnavailable(msg)
        if code in _MISCONFIGURED_CODES or status in (301, 400, 403):
            return StorageMisconfigured(
                msg, hint="check the stage's S3 credentials, endpoint (AWS_ENDPOINT_URL_S3) and bucket policy"
            )
        return StorageMisconfigured(msg)
    if isinstance(exc, botocore.exceptions.NoCredentialsError | botocore.exceptions.PartialCredentialsError):
        return StorageMisconfigured(f"{what}: no usable S3 credentials ({exc})",
                                    hint="give the stage AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or a role")
    if isinstance(
        exc,
        botocore.exceptions.EndpointConnectionError
        | botocore.exceptions.ConnectionClosedError
        | botocore.exceptions.ReadTimeoutError
        | botocore.exceptions.ConnectTimeoutError
        | botocore.exceptions.ResponseStreamingError
        | botocore.exceptions.IncompleteReadError
        | ConnectionError
        | TimeoutError,
    ):
        return StorageUnavailable(f"{what}: {type(exc).__name__}: {exc}")
    if isinstance(exc, botocore.exceptions.BotoCoreError):
        return StorageUnavailable(f"{what}: {type(exc).__name__}: {exc}")
    if isinstance(exc, boto3.exceptions.S3UploadFailedError | boto3.exceptions.S3TransferFailedError):
        # boto3's transfer manager flattens the botocore error into text ("An error occurred (AccessDenied)…").
        text = str(exc)
        if any(f"({code})" in text for code in _MISCONFIGURED_CODES):
            return StorageMisconfigured(f"{what}: {text}", hint="check the S3 credentials, endpoint and bucket policy")
        return StorageUnavailable(f"{what}: {type(exc).__name__}: {text}")
    if isinstance(exc, boto3.exceptions.Boto3Error):
        return StorageUnavailable(f"{what}: {type(exc).__name__}: {exc}")
    return exc  # type: ignore[return-value]


class S3Storage:
    """Thin adapter over one boto3 S3 client. ``sleep`` is injectable so tests never wait."""

    def __init__(self, settings: Settings, *, client: Any = None, sleep: Callable[[float], None] = time.sleep):
        self.settings = settings
        self._sleep = sleep
        self._injected = client
        self._clients: dict[float, Any] = {}
        self._session = boto3.session.Session()
        self._lock = threading.Lock()
        self._versioned: dict[str, bool] = {}
        self.cache = ObjectCache(settings.cache_dir / "objects", settings.cache_max_bytes)

    @property
    def client(self) -> Any:
        """The client with the full per-call timeouts (uploads, tools)."""
        return self._client_for(None)

    def _client_for(self, remaining: float | None) -> Any:
        """A client whose socket timeouts fit in ``remaining`` seconds (None: the configured ones).

        botocore fixes timeouts when a client is built, so there is one client per timeout step (a few
        at most), built on first use. A call in flight can then never outlive the operation's deadline:
        a black-holed S3 costs ``s3_deadline_s``, not the deadline plus a whole read timeout.
        """
        if self._injected is not None:
            return self._injected
        read = self.settings.s3_read_timeout_s
        if remaining is not None:
            fitting = [t for t in _TIMEOUT_STEPS if t <= min(read, remaining)]
            read = fitting[-1] if fitting else _TIMEOUT_STEPS[0]
        connect = min(self.settings.s3_connect_timeout_s, read)
        with self._lock:
            client = self._clients.get(read)
            if client is None:
                endpoint = self.settings.s3_endpoint_url or None
                cfg = Config(
                    retries={"total_max_attempts": 1, "mode": "standard"},  # tenacity retries; never both
                    connect_timeout=connect,
                    read_timeout=read,
                    max_pool_connections=max(10, self.settings.s3_max_concurrency * 2),
                    s3={"addressing_style": "path"} if endpoint else None,
                )
                client = self._clients[read] = self._session.client("s3", endpoint_url=endpoint, config=cfg)
            return client

    # -- retries -------------------------------------------------------------------------------
    def _retry(self, fn: Callable[[Any, float], T], *, what: str) -> T:
        """Call ``fn(client, deadline)`` until it succeeds, a permanent error, the attempt count or the deadline.

        The deadline (``s3_deadline_s`` from the first try, on the monotonic clock) bounds the whole
        operation: no retry starts after it, the backoff never sleeps past it, and each attempt's client
        has socket timeouts no longer than what is left (``_client_for``); ``fn`` checks it between chunks.
        """
        deadline = time.monotonic() + self.settings.s3_deadline_s

        def before_sleep(state: RetryCallState) -> None:
            exc = state.outcome.exception() if state.outcome else None
            log.warning("%s failed (attempt %d), retrying: %s", what, state.attempt_number, exc)

        def stop(state: RetryCallState) -> bool:
            return state.attempt_number >= self.settings.s3_attempts or time.monotonic() >= deadline - 0.5

        backoff = wait_random_exponential(multiplier=0.5, max=10)

        def wait(state: RetryCallState) -> float:
            return max(0.0, min(backoff(state), deadline - time.monotonic() - 1.0))

        retrying = Retrying(
            retry=retry_if_exception(is_retryable),
            stop=stop,
            wait=wait,
            sleep=self._sleep,
            before_sleep=before_sleep,
            reraise=True,
        )

        def call() -> T:
            try:
                return fn(self._client_for(deadline - time.monotonic()), deadline)
            except _BOTO_ERRORS as exc:
                raise classify_s3_error(exc, what=what) from exc

        return retrying(call)

    # -- listing -------------------------------------------------------------------------------
    def list_files(self, loc: S3Location) -> list[RemoteFile]:
        prefix = loc.prefix.rstrip("/") + "/" if loc.prefix else ""

        def version_pages(client: Any, deadline: float) -> list[RemoteFile]:
            return self._list_current_versions(client, loc.bucket, prefix)

        def pages(client: Any, deadline: float) -> list[RemoteFile]:
            out: list[RemoteFile] = []
            for resp in client.get_paginator("list_objects_v2").paginate(Bucket=loc.bucket, Prefix=prefix):
                for obj in resp.get("Contents", []):
                    key = obj["Key"]
                    if key.endswith("/"):
                        continue
                    out.append(RemoteFile(key, key[len(prefix):], int(obj["Size"]), obj.get("ETag", "").strip('"')))
            return out

        with self._lock:
            versioned = self._versioned.get(loc.bucket)
        if versioned is None:
            # First listing of this bucket: list as before (its errors are the listing's), then learn
            # whether the bucket is versioned and, if so, list again with VersionIds.
            files = self._retry(pages, what=f"listing {loc.uri}")
            versioned = self.bucket_versioned(loc.bucket)
            if versioned:
                files = self._retry(version_pages, what=f"listing {loc.uri}")
        else:
            files = self._retry(version_pages if versioned else pages, what=f"listing {loc.uri}")
        if not files:
            # A single object (the URI names a file, not a folder)?
            if loc.prefix and not loc.prefix.endswith("/"):
                head = self._head_or_none(loc.bucket, loc.prefix)
                if head is not None:
                    return [RemoteFile(loc.prefix, PurePosixPath(loc.prefix).name, int(head["ContentLength"]),
                                       head.get("ETag", "").strip('"'),
                                       head.get("VersionId") if versioned else None)]
            raise ArtifactMissing(
                f"no files at {loc.uri}: the bucket is readable but the version's location is empty",
                hint="re-register the model version after its upload finished",
            )
        for f in files:
            rel = PurePosixPath(f.rel)
            if rel.is_absolute() or ".." in rel.parts:
                raise StorageMisconfigured(f"refusing object key with a path outside the version: {f.key!r}")
        return sorted(files, key=lambda f: f.rel)

    def bucket_versioned(self, bucket: str) -> bool:
        """Whether objects in ``bucket`` have VersionIds (versioning enabled, or suspended after having
        been enabled). Asked once per bucket and adapter. A stage that may not read the setting
        (``s3:GetBucketVersioning`` denied) falls back to ETag-conditional downloads, which are as exact
        for a download; the re-check then compares ETags instead of VersionIds."""
        with self._lock:
            known = self._versioned.get(bucket)
        if known is not None:
            return known
        try:
            resp = self._retry(lambda client, _: client.get_bucket_versioning(Bucket=bucket),
                               what=f"reading the versioning of s3://{bucket}")
            versioned = resp.get("Status") in ("Enabled", "Suspended")
        except StorageMisconfigured as exc:
            log.warning("cannot read the versioning of s3://%s (%s); using ETags", bucket, exc)
            versioned = False
        with self._lock:
            self._versioned[bucket] = versioned
        return versioned

    def _list_current_versions(self, client: Any, bucket: str, prefix: str) -> list[RemoteFile]:
        """The current version of every object under ``prefix`` (no delete markers, no older versions)."""
        out: list[RemoteFile] = []
        for resp in client.get_paginator("list_object_versions").paginate(Bucket=bucket, Prefix=prefix):
            for obj in resp.get("Versions", []):
                key = obj["Key"]
                if not obj.get("IsLatest") or key.endswith("/"):
                    continue
                out.append(RemoteFile(key, key[len(prefix):], int(obj["Size"]), obj.get("ETag", "").strip('"'),
                                      obj.get("VersionId")))
        # A key whose latest entry is a delete marker is gone: it has no IsLatest version above.
        return out

    def _head_or_none(self, bucket: str, key: str) -> dict | None:
        try:
            return self._retry(lambda client, _: client.head_object(Bucket=bucket, Key=key),
                               what=f"s3://{bucket}/{key}")
        except ArtifactMissing:
            return None

    # -- download ------------------------------------------------------------------------------
    def download(
        self,
        loc: S3Location,
        dest: Path,
        files: list[RemoteFile] | None = None,
        progress: Callable[[int], None] | None = None,
    ) -> list[LocalFile]:
        """Download every file under ``loc`` into ``dest``; verified, hashed, atomically renamed."""
        files = self.list_files(loc) if files is None else files
        dest.mkdir(parents=True, exist_ok=True)
        need = sum(f.size for f in files)
        free = shutil.disk_usage(dest).free
        if need > free:
            raise StorageUnavailable(
                f"not enough disk space in {dest}: need {need} bytes, {free} free",
                hint="point CKPT_STAGE_CACHE_DIR at a larger volume",
            )
        workers = min(self.settings.s3_max_concurrency, max(1, len(files)))
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="ckpt-s3") as pool:
            results = list(pool.map(lambda f: self._fetch(loc.bucket, f, dest, progress), files))
        return results

    def _fetch(self, bucket: str, rf: RemoteFile, dest: Path, progress: Callable[[int], None] | None) -> LocalFile:
        """One listed object into ``dest``: from the host's object cache when it holds exactly the listed
        object (``ckpt_stage.cache``: same key, ETag, VersionId and size, bytes hashed again), else
        downloaded, verified and then kept in the cache."""
        target = dest / rf.rel
        ident = self.cache.identity(bucket, rf.key, rf.size, rf.etag, rf.version_id)
        sha = self.cache.lookup(ident, rf.size, target)
        if sha is None:
            local = self._download_verified(bucket, rf, dest, progress)
            self.cache.store(ident, local.path, local.sha256)
        else:
            if progress:
                progress(rf.size)
            local = LocalFile(rf.rel, target, rf.size, sha)
        # Stamped last: linking into the cache moves the file's ctime (docs/architecture.md: the worker hashes
        # again only a file whose stamp is not the scan's).
        st = os.stat(target)
        return dataclasses.replace(local, stamp=(st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns))

    def _download_verified(
        self, bucket: str, rf: RemoteFile, dest: Path, progress: Callable[[int], None] | None
    ) -> LocalFile:
        """Download until the file matches S3's record, within the retry budget.

        A mismatch (size against the listing, or a full-object checksum S3 keeps) is a transport fault
        until proven otherwise: a body cut short behind a proxy that fixes up Content-Length looks
        complete. Only two complete downloads that agree with each other (same size and sha256) and both
        disagree with S3's record are ``INTEGRITY_MISMATCH``, a model-caused code; anything less, once the
        retries are spent, is ``STORAGE_UNAVAILABLE`` and the version stays eligible.
        """
        seen: set[tuple[int, str]] = set()

        def once(client: Any, deadline: float) -> LocalFile | ObjectChanged:
            try:
                local, problem = self._download_once(client, bucket, rf, dest, progress, deadline)
            except ObjectChanged as exc:
                # Asking again for the listed ETag or VersionId cannot succeed: straight up, for the
                # caller to list the version again.
                return exc
            if not problem:
                return local
            (dest / rf.rel).unlink(missing_ok=True)
            key = (local.size, local.sha256)
            if key in seen:
                raise IntegrityMismatch(
                    f"{problem}, and two complete downloads agree with each other (sha256 {local.sha256})",
                    hint="the stored object is not what was uploaded; upload the file again and register a "
                         "new version", file=rf.rel,
                )
            seen.add(key)
            raise StorageUnavailable(f"{problem}; the download may have been cut short",
                                     hint="S3 or the network between kept corrupting the transfer", file=rf.rel)

        result = self._retry(once, what=f"s3://{bucket}/{rf.key}")
        if isinstance(result, ObjectChanged):
            raise result
        return result

    def _get_listed(self, client: Any, bucket: str, rf: RemoteFile) -> dict[str, Any]:
        """GET exactly the object that was listed: by VersionId where the bucket has versioning,
        otherwise on condition that its ETag is still the listed one (If-Match; S3 answers 412
        PreconditionFailed when the object was overwritten since). A 404 for an object listed moments
        ago means it was deleted since: also a changed listing, not a missing artifact."""
        params: dict[str, Any] = {"Bucket": bucket, "Key": rf.key, "ChecksumMode": "ENABLED"}
        if rf.version_id:
            params["VersionId"] = rf.version_id
        elif rf.etag:
            params["IfMatch"] = f'"{rf.etag}"'
        try:
            return dict(client.get_object(**params))
        except botocore.exceptions.ClientError as exc:
            err = exc.response.get("Error", {})
            code = str(err.get("Code", ""))
            status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
            if code in ("PreconditionFailed", "412", "NoSuchKey", "NoSuchVersion", "404") or status in (404, 412):
                raise ObjectChanged(
                    f"{rf.rel}: s3://{bucket}/{rf.key} changed after it was listed ({code or status}); "
                    "listing the version again",
                    hint="something is writing to the version's files while it is validated; "
                         "upload a model before registering it, and never to a registered version's location",
                    file=rf.rel,
                ) from exc
            raise

    def _download_once(
        self, client: Any, bucket: str, rf: RemoteFile, dest: Path, progress: Callable[[int], None] | None,
        deadline: float,
    ) -> tuple[LocalFile, str]:
        """One GET into ``*.incomplete``, hashed while written; returns the file and what is wrong with it."""
        target = dest / rf.rel
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(target.name + ".incomplete")
        resp = self._get_listed(client, bucket, rf)
        digest = hashlib.sha256()
        size = 0
        checksum_problem = ""

        def consume(chunk: bytes) -> None:
            digest.update(chunk)  # hashlib and file writes release the GIL on large buffers
            fh.write(chunk)

        # Hash and write chunk N on a helper thread while chunk N+1 is read from the socket, so the
        # digest costs (almost) no wall time over the transfer itself.
        pending = None
        tmp.unlink(missing_ok=True)  # a read-only leftover of a crash would refuse open("wb")
        try:
            with tmp.open("wb") as fh, ThreadPoolExecutor(max_workers=1, thread_name_prefix="ckpt-hash") as hasher:
                try:
                    for chunk in resp["Body"].iter_chunks(CHUNK):
                        if pending is not None:
                            pending.result()
                        pending = hasher.submit(consume, chunk)
                        size += len(chunk)
                        if progress:
                            progress(len(chunk))
                        if time.monotonic() > deadline:
                            raise StorageUnavailable(
                                f"{rf.rel}: download ran past the S3 deadline ({self.settings.s3_deadline_s:.0f} s) "
                                f"after {size} of {rf.size} bytes",
                                hint="raise CKPT_STAGE_S3_DEADLINE_S for very large files or a slow link")
                except botocore.exceptions.FlexibleChecksumError as exc:
                    # botocore compares the body with a full-object checksum S3 returned (CRC32, CRC64NVME,
                    # SHA256, …; it skips composite "-N" ones) once the last byte is read: the body is whole.
                    checksum_problem = f"{rf.rel}: {exc}"
                if pending is not None:
                    pending.result()
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        sha = digest.hexdigest()
        # Read-only from here on: nothing of the stage writes a downloaded file again, and the stamp
        # taken after the rename (which moves ctime itself) pins the bytes the digest covers.
        os.chmod(tmp, 0o444)
        os.replace(tmp, target)
        st = os.stat(target)
        local = LocalFile(rf.rel, target, size, sha, (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns))
        if size != rf.size:
            return local, f"{rf.rel}: downloaded {size} bytes but S3 lists {rf.size}"
        # Only a whole-object checksum can be compared: multipart uploads carry COMPOSITE checksums
        # (a checksum of part checksums), which would never match the file's own digest (docs/traps.md).
        full_object = resp.get("ChecksumType", "FULL_OBJECT") == "FULL_OBJECT"
        if checksum_problem and full_object:
            return local, checksum_problem
        remote_sha = resp.get("ChecksumSHA256")
        if remote_sha and full_object and "-" not in remote_sha and base64.b64decode(remote_sha).hex() != sha:
            return local, f"{rf.rel}: sha256 {sha} differs from the SHA-256 S3 recorded at upload"
        return local, ""

    # -- upload (demo, tests, tools) -------------------------------------------------------------
    def upload_dir(self, src: Path, loc: S3Location) -> list[str]:
        keys = []
        for path in sorted(p for p in src.rglob("*") if p.is_file()):
            key = str(PurePosixPath(loc.prefix, path.relative_to(src).as_posix()))
            def upload(client: Any, _: float, p: Path = path, k: str = key) -> None:
                # A full-object CRC32 recorded at upload lets every download be checked against S3's record.
                client.upload_file(str(p), loc.bucket, k, ExtraArgs={"ChecksumAlgorithm": "CRC32"})

            self._retry(upload, what=f"upload {key}")
            keys.append(key)
        return keys


def sha256_file(path: Path) -> str:
    """Hex sha256 of a local file: the scanner's and the worker's one streaming hash."""
    return sha256_of(path)


def manifest_digest(files: list[tuple[str, str | None, int, str | None, str | None, str]]) -> str:
    """The ``ckpt_stage.manifest_sha256`` tag: sha256 of the canonical JSON of every manifest entry
    ``[path, key, size, etag, version_id, sha256]``, sorted. ``ckpt_stage.sha256`` covers only paths
    and contents; this one also pins which S3 objects they were, so an edited ``report.json`` (which
    lives in S3 too) cannot make changed objects look like the validated ones."""
    rows = sorted([p, k, int(s), e, v, h] for p, k, s, e, v, h in files)
    return hashlib.sha256(json.dumps(rows, separators=(",", ":")).encode()).hexdigest()


def version_digest(files: list[tuple[str, str]]) -> str:
    """The ``ckpt_stage.sha256`` tag: sha256 of ``<path>\\t<sha256>\\n`` lines sorted by path."""
    text = "".join(f"{p}\t{h}\n" for p, h in sorted(files))
    return hashlib.sha256(text.encode()).hexdigest()
