"""Pure parts of the reliability rules: one classification of every library exception, the MLflow client
defaults, the lease heartbeat."""

from __future__ import annotations

import time

import boto3.exceptions
import botocore.exceptions
import pytest
import requests
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import BAD_REQUEST, INVALID_PARAMETER_VALUE

from ckpt_stage.config import Settings
from ckpt_stage.domain import VersionRef
from ckpt_stage.errors import (
    RegistryConflict,
    RegistryError,
    RegistryUnavailable,
    StorageMisconfigured,
    StorageUnavailable,
    is_retryable,
)
from ckpt_stage.registry import LEASE_UNTIL, Registry, configure_client, translate


@pytest.mark.parametrize(("exc", "kind"), [
    # S3 failing inside MLflow's artifact upload (report.json) is S3's failure, never MLflow's.
    (botocore.exceptions.ConnectionClosedError(endpoint_url="http://s3"), StorageUnavailable),
    (botocore.exceptions.EndpointConnectionError(endpoint_url="http://s3"), StorageUnavailable),
    (botocore.exceptions.ReadTimeoutError(endpoint_url="http://s3"), StorageUnavailable),
    (boto3.exceptions.S3UploadFailedError("Failed to upload report.json: An error occurred (SlowDown) ..."),
     StorageUnavailable),
    (boto3.exceptions.S3UploadFailedError("Failed to upload: An error occurred (AccessDenied) when calling"),
     StorageMisconfigured),
    (MlflowException('(psycopg2.errors.UniqueViolation) duplicate key value violates unique constraint "x"',
                     error_code=BAD_REQUEST), RegistryConflict),
    (MlflowException("API request to http://m failed with exception Max retries exceeded"), RegistryUnavailable),
    (requests.ConnectionError("connection refused"), RegistryUnavailable),
    (MlflowException("bad tag value", error_code=INVALID_PARAMETER_VALUE), RegistryError),
])
def test_every_library_exception_is_classified_once(exc, kind):
    with pytest.raises(kind) as err, translate("recording"):
        raise exc
    assert type(err.value) is kind
    assert is_retryable(err.value) == (kind in (StorageUnavailable, RegistryUnavailable, RegistryConflict))


def test_a_bug_is_not_retryable_and_not_reclassified():
    with pytest.raises(KeyError), translate("x"):
        raise KeyError("bug")
    assert not is_retryable(KeyError("bug"))


def test_mlflow_client_defaults_never_override_the_operator():
    env = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "9"}
    assert configure_client(Settings(), env) == {"MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                                                 "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}
    assert env["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "9"


def test_new_settings_read_from_the_environment():
    s = Settings.from_env({"CKPT_STAGE_LEASE_S": "1", "CKPT_STAGE_S3_READ_TIMEOUT_S": "7",
                           "CKPT_STAGE_MLFLOW_MAX_RETRIES": "2"})
    assert s.lease_s == 3.0  # at least MIN_LEASE_S: the heartbeat needs room
    assert s.s3_read_timeout_s == 7.0 and s.mlflow_max_retries == 2
    assert Settings().lease_s == 60.0


class _Client:
    def __init__(self):
        self.writes = []

    def set_model_version_tag(self, name, version, key, value):
        self.writes.append((key, value))


def test_the_heartbeat_renews_the_lease_while_the_attempt_runs(monkeypatch):
    client = _Client()
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    registry = Registry(Settings(lease_s=3.0), client=client)
    with registry.heartbeat(VersionRef("m", "1"), "me"):
        time.sleep(2.4)
    beats = [w for w in client.writes if w[0] == LEASE_UNTIL]
    assert len(beats) == 2
    n = len(client.writes)
    time.sleep(1.2)
    assert len(client.writes) == n  # stopped with the attempt
