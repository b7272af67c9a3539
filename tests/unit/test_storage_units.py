"""Pure parts of the S3 adapter: location mapping and error classification."""

from __future__ import annotations

import botocore.exceptions
import pytest

from ckpt_stage.config import Settings
from ckpt_stage.errors import ArtifactMissing, ConfigError, StorageMisconfigured, StorageUnavailable
from ckpt_stage.storage import S3Location, classify_s3_error, resolve_artifact_uri


def test_s3_uris_resolve_directly():
    assert resolve_artifact_uri("s3://b/1/models/m-1/artifacts", Settings()) == S3Location("b", "1/models/m-1/artifacts")


def test_mlflow_artifacts_map_onto_the_configured_destination():
    s = Settings(artifacts_destination="s3://bucket/root")
    assert resolve_artifact_uri("mlflow-artifacts:/1/models/m-x/artifacts", s) == \
        S3Location("bucket", "root/1/models/m-x/artifacts")


def test_mlflow_artifacts_without_destination_names_the_setting():
    with pytest.raises(ConfigError, match="CKPT_STAGE_ARTIFACTS_DESTINATION"):
        resolve_artifact_uri("mlflow-artifacts:/1/x", Settings())


def test_other_schemes_are_refused_clearly():
    with pytest.raises(StorageMisconfigured, match="only s3://"):
        resolve_artifact_uri("file:///tmp/x", Settings())


def _client_error(code, status):
    return botocore.exceptions.ClientError(
        {"Error": {"Code": code, "Message": "m"}, "ResponseMetadata": {"HTTPStatusCode": status}}, "GetObject")


@pytest.mark.parametrize(("exc", "kind"), [
    (_client_error("SlowDown", 503), StorageUnavailable),
    (_client_error("InternalError", 500), StorageUnavailable),
    (_client_error("RequestTimeout", 400), StorageUnavailable),
    (_client_error("Throttling", 400), StorageUnavailable),
    (_client_error("AccessDenied", 403), StorageMisconfigured),
    (_client_error("InvalidAccessKeyId", 403), StorageMisconfigured),
    (_client_error("NoSuchBucket", 404), StorageMisconfigured),
    (_client_error("NoSuchKey", 404), ArtifactMissing),
    (botocore.exceptions.EndpointConnectionError(endpoint_url="http://x"), StorageUnavailable),
    (botocore.exceptions.ReadTimeoutError(endpoint_url="http://x"), StorageUnavailable),
    (botocore.exceptions.ConnectionClosedError(endpoint_url="http://x"), StorageUnavailable),
    (botocore.exceptions.NoCredentialsError(), StorageMisconfigured),
])
def test_classify(exc, kind):
    assert isinstance(classify_s3_error(exc, what="s3://b/k"), kind)
