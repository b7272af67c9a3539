"""AirflowClient against a stand-in of Airflow 3.3's REST API (httpx.MockTransport): auth, routes, errors."""

from __future__ import annotations

import json
import pickle

import httpx
import pytest

from ckpt_stage.airflow_client import (
    AirflowAuthError,
    AirflowClient,
    AirflowRequestError,
    AirflowUnavailable,
    AssetNotFound,
)
from ckpt_stage.config import Settings
from ckpt_stage.errors import ConfigError, PermanentError, TransientError

URL = "http://airflow.test:8080"
ASSET = "x-ckpt-stage://mlflow/model-version-created"


class FakeAirflow:
    """Just enough of /auth/token and /api/v2 to exercise the client; records every request."""

    def __init__(self, *, password: str = "pw", tokens: list[str] | None = None):
        self.password = password
        self.tokens = list(tokens or ["jwt-1", "jwt-2", "jwt-3"])
        self.valid: set[str] = set()
        self.requests: list[httpx.Request] = []
        self.assets = [{"id": 7, "uri": ASSET + "-old"}, {"id": 3, "uri": ASSET}]
        self.fail_with: int | None = None

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        path = request.url.path
        if path == "/auth/token" and request.method == "POST":
            body = json.loads(request.content)
            if body != {"username": "admin", "password": self.password}:
                return httpx.Response(401, json={"detail": "Invalid credentials"})
            token = self.tokens.pop(0)
            self.valid.add(token)
            return httpx.Response(201, json={"access_token": token})
        auth = request.headers.get("Authorization", "")
        if not auth.startswith("Bearer ") or auth[7:] not in self.valid:
            return httpx.Response(401, json={"detail": "Not authenticated"})
        if self.fail_with:
            return httpx.Response(self.fail_with, json={"detail": "boom"})
        if path == "/api/v2/dags/ckpt_stage_rerun/dagRuns" and request.method == "POST":
            body = json.loads(request.content)
            return httpx.Response(200, json={"dag_run_id": "manual__2026-01-01T00:00:00+00:00", "state": "queued",
                                             "conf": body["conf"], "logical_date": body["logical_date"]})
        if path.startswith("/api/v2/dags/ckpt_stage_rerun/dagRuns/"):
            return httpx.Response(200, json={"dag_run_id": path.rsplit("/", 1)[1], "state": "success"})
        if path == "/api/v2/assets" and request.method == "GET":
            prefix = request.url.params["uri_prefix_pattern"]
            return httpx.Response(200, json={"assets": [a for a in self.assets if a["uri"].startswith(prefix)],
                                             "total_entries": 2})
        if path == "/api/v2/assets/events" and request.method == "POST":
            body = json.loads(request.content)
            if body["asset_id"] not in {a["id"] for a in self.assets}:
                return httpx.Response(404, json={"detail": "Asset not found"})
            return httpx.Response(200, json={"id": 11, "asset_id": body["asset_id"],
                                             "extra": {**body["extra"], "from_rest_api": True}})
        return httpx.Response(404, json={"detail": "Not Found"})


def _client(fake, **settings) -> AirflowClient:
    base = {"airflow_url": URL, "airflow_user": "admin", "airflow_password": "pw"}
    return AirflowClient(Settings(**{**base, **settings}), transport=httpx.MockTransport(fake))


def test_configured_needs_a_url_and_credentials():
    assert not AirflowClient(Settings()).configured()
    assert not AirflowClient(Settings(airflow_url=URL)).configured()
    assert not AirflowClient(Settings(airflow_url=URL, airflow_user="admin")).configured()
    assert AirflowClient(Settings(airflow_url=URL, airflow_user="admin", airflow_password="pw")).configured()
    assert AirflowClient(Settings(airflow_url=URL, airflow_token="t")).configured()


def test_unconfigured_client_names_the_setting():
    with pytest.raises(ConfigError, match="CKPT_STAGE_AIRFLOW_URL"):
        AirflowClient(Settings()).trigger_dag("x", {})
    with pytest.raises(ConfigError, match="CKPT_STAGE_AIRFLOW_TOKEN"):
        AirflowClient(Settings(airflow_url=URL)).trigger_dag("x", {})


def test_trigger_dag_logs_in_once_and_posts_a_run_without_logical_date():
    fake = FakeAirflow()
    client = _client(fake)
    run = client.trigger_dag("ckpt_stage_rerun", {"model": "clf", "versions": ["3"]})
    assert run["dag_run_id"].startswith("manual__")
    assert run["conf"] == {"model": "clf", "versions": ["3"]}
    post = fake.requests[-1]
    assert json.loads(post.content) == {"logical_date": None, "conf": {"model": "clf", "versions": ["3"]}}
    assert post.headers["Authorization"] == "Bearer jwt-1"
    client.trigger_dag("ckpt_stage_rerun", {})
    assert [r.url.path for r in fake.requests].count("/auth/token") == 1


def test_static_token_skips_the_login():
    fake = FakeAirflow()
    fake.valid.add("static")
    client = AirflowClient(Settings(airflow_url=URL, airflow_token="static"), transport=httpx.MockTransport(fake))
    client.trigger_dag("ckpt_stage_rerun", {})
    assert [r.url.path for r in fake.requests] == ["/api/v2/dags/ckpt_stage_rerun/dagRuns"]


def test_an_expired_token_is_renewed_once():
    fake = FakeAirflow()
    client = _client(fake)
    client.trigger_dag("ckpt_stage_rerun", {})
    fake.valid.clear()  # the JWT expired
    client.trigger_dag("ckpt_stage_rerun", {})
    assert [r.url.path for r in fake.requests].count("/auth/token") == 2
    assert fake.requests[-1].headers["Authorization"] == "Bearer jwt-2"


def test_dag_run_quotes_the_run_id():
    fake = FakeAirflow()
    run = _client(fake).dag_run("ckpt_stage_rerun", "manual__2026-01-01T00:00:00+00:00")
    assert run["state"] == "success"
    assert fake.requests[-1].url.raw_path.decode().endswith("/dagRuns/manual__2026-01-01T00%3A00%3A00%2B00%3A00")


def test_post_asset_event_looks_up_the_exact_uri_and_caches_the_id():
    fake = FakeAirflow()
    client = _client(fake)
    event = client.post_asset_event(ASSET, {"name": "clf", "version": "3"})
    assert event["asset_id"] == 3
    posted = json.loads(fake.requests[-1].content)
    assert posted == {"asset_id": 3, "extra": {"name": "clf", "version": "3"}}
    client.post_asset_event(ASSET, {"name": "clf", "version": "4"})
    assert [r.url.path for r in fake.requests].count("/api/v2/assets") == 1


def test_a_recreated_asset_is_looked_up_again():
    fake = FakeAirflow()
    client = _client(fake)
    client.post_asset_event(ASSET, {"name": "clf", "version": "3"})
    fake.assets = [{"id": 42, "uri": ASSET}]
    assert client.post_asset_event(ASSET, {"name": "clf", "version": "4"})["asset_id"] == 42


def test_unknown_asset_is_transient():
    fake = FakeAirflow()
    fake.assets = []
    with pytest.raises(AssetNotFound) as info:
        _client(fake).post_asset_event(ASSET, {})
    assert isinstance(info.value, TransientError)
    assert "ckpt_stage_validate" in info.value.hint


def test_wrong_password_is_permanent_and_names_the_settings():
    with pytest.raises(AirflowAuthError) as info:
        _client(FakeAirflow(password="other")).trigger_dag("ckpt_stage_rerun", {})
    assert isinstance(info.value, PermanentError)
    assert "CKPT_STAGE_AIRFLOW_USER" in info.value.hint and "CKPT_STAGE_AIRFLOW_PASSWORD" in info.value.hint


def test_bad_static_token_and_forbidden_name_the_setting():
    fake = FakeAirflow()
    client = AirflowClient(Settings(airflow_url=URL, airflow_token="nope"), transport=httpx.MockTransport(fake))
    with pytest.raises(AirflowAuthError, match="401") as info:
        client.trigger_dag("ckpt_stage_rerun", {})
    assert "CKPT_STAGE_AIRFLOW_TOKEN" in info.value.hint
    fake.fail_with = 403
    with pytest.raises(AirflowAuthError, match="403"):
        _client(fake).trigger_dag("ckpt_stage_rerun", {})


@pytest.mark.parametrize("status", [500, 502, 503])
def test_5xx_is_transient(status):
    fake = FakeAirflow()
    fake.fail_with = status
    with pytest.raises(AirflowUnavailable):
        _client(fake).trigger_dag("ckpt_stage_rerun", {})


def test_unreachable_is_transient():
    def refuse(request):
        raise httpx.ConnectError("connection refused", request=request)

    client = AirflowClient(Settings(airflow_url=URL, airflow_token="t"), transport=httpx.MockTransport(refuse))
    with pytest.raises(AirflowUnavailable, match="cannot reach Airflow") as info:
        client.post_asset_event(ASSET, {})
    assert isinstance(info.value, TransientError)


def test_unknown_dag_is_a_request_error():
    with pytest.raises(AirflowRequestError) as info:
        _client(FakeAirflow()).trigger_dag("no_such_dag", {})
    assert info.value.status_code == 404


def test_errors_survive_pickling():
    err = AirflowRequestError("nope", status_code=404, hint="h")
    again = pickle.loads(pickle.dumps(err))
    assert (type(again), again.status_code, again.hint, str(again)) == (AirflowRequestError, 404, "h", "nope")
