"""The webhook receiver: MLflow's signature, replay window, duplicates, event filtering, Airflow outages.

Signatures are made with MLflow's own ``_generate_hmac_signature`` (mlflow/webhooks/delivery.py), and one
test sends through MLflow's real delivery code, so a change in MLflow's scheme breaks these tests.
"""

from __future__ import annotations

import json
import threading
import time
import uuid

import httpx
import pytest
import uvicorn
from fastapi.testclient import TestClient
from mlflow.webhooks.delivery import _generate_hmac_signature

from ckpt_stage.dev import devstack
from ckpt_stage.airflow_client import AirflowClient
from ckpt_stage.config import Settings
from ckpt_stage.dashboard.webhook import create_webhook_app, sign, verify
from ckpt_stage.orchestrate import REGISTRATIONS_ASSET_URI

SECRET = "s3cr3t-for-tests"


class FakeAirflow:
    def __init__(self):
        self.events: list[dict] = []
        self.down = False
        self.status = 200

    def __call__(self, request: httpx.Request) -> httpx.Response:
        if self.down:
            raise httpx.ConnectError("connection refused", request=request)
        if self.status != 200:
            return httpx.Response(self.status, json={"detail": "nope"})
        if request.url.path == "/api/v2/assets":
            return httpx.Response(200, json={"assets": [{"id": 5, "uri": REGISTRATIONS_ASSET_URI}]})
        if request.url.path == "/api/v2/assets/events":
            body = json.loads(request.content)
            self.events.append(body)
            return httpx.Response(200, json={"id": len(self.events), **body})
        return httpx.Response(404, json={"detail": "Not Found"})


@pytest.fixture
def airflow():
    return FakeAirflow()


@pytest.fixture
def receiver(airflow):
    settings = Settings(webhook_secret=SECRET, airflow_url="http://airflow.test", airflow_token="t")
    client = AirflowClient(settings, transport=httpx.MockTransport(airflow))
    return TestClient(create_webhook_app(settings, client=client))


def _payload(entity="model_version", action="created", **data) -> str:
    data = {"name": "clf", "version": "3", "source": "s3://b/x", "run_id": None, "tags": {}, "description": None,
            **data}
    # The exact shape MLflow 3.17's _send_webhook_request posts.
    return json.dumps({"entity": entity, "action": action, "timestamp": "2026-01-01T00:00:00+00:00", "data": data})


def _headers(body: str, *, secret=SECRET, delivery_id=None, timestamp=None) -> dict[str, str]:
    delivery_id = delivery_id or str(uuid.uuid4())
    timestamp = str(int(time.time())) if timestamp is None else str(timestamp)
    return {
        "Content-Type": "application/json",
        "X-MLflow-Delivery-Id": delivery_id,
        "X-MLflow-Timestamp": timestamp,
        "X-MLflow-Signature": _generate_hmac_signature(secret, delivery_id, timestamp, body),
    }


def test_our_signature_is_mlflows():
    assert sign(SECRET, "d", "1", b'{"a": 1}') == _generate_hmac_signature(SECRET, "d", "1", '{"a": 1}')


def test_valid_delivery_posts_an_asset_event(receiver, airflow):
    body = _payload()
    resp = receiver.post("/mlflow", content=body, headers=_headers(body))
    assert resp.status_code == 202, resp.text
    assert resp.json()["model"] == {"name": "clf", "version": "3"}
    assert len(airflow.events) == 1
    assert airflow.events[0]["asset_id"] == 5
    assert airflow.events[0]["extra"]["name"] == "clf"
    assert airflow.events[0]["extra"]["version"] == "3"


def test_non_ascii_body_is_verified_on_its_bytes(receiver, airflow):
    body = _payload(name="modèle-ü")
    resp = receiver.post("/mlflow", content=body.encode(), headers=_headers(body))
    assert resp.status_code == 202, resp.text
    assert airflow.events[0]["extra"]["name"] == "modèle-ü"


@pytest.mark.parametrize("mutate", [
    lambda h: {**h, "X-MLflow-Signature": "v1," + "A" * 44},
    lambda h: {**h, "X-MLflow-Signature": h["X-MLflow-Signature"].replace("v1,", "v2,")},
    lambda h: {**h, "X-MLflow-Delivery-Id": "another-id"},  # the id is part of what is signed
    lambda h: {k: v for k, v in h.items() if k != "X-MLflow-Signature"},
    lambda h: {k: v for k, v in h.items() if k != "X-MLflow-Timestamp"},
    lambda h: {**h, "X-MLflow-Timestamp": "yesterday"},
])
def test_bad_signature_is_refused(receiver, airflow, mutate):
    body = _payload()
    resp = receiver.post("/mlflow", content=body, headers=mutate(_headers(body)))
    assert resp.status_code == 401
    assert airflow.events == []


def test_tampered_body_is_refused(receiver, airflow):
    body = _payload()
    headers = _headers(body)
    resp = receiver.post("/mlflow", content=body.replace('"3"', '"4"'), headers=headers)
    assert resp.status_code == 401
    assert airflow.events == []


def test_wrong_secret_is_refused(receiver, airflow):
    body = _payload()
    assert receiver.post("/mlflow", content=body, headers=_headers(body, secret="guess")).status_code == 401


@pytest.mark.parametrize("age_s", [301, -301, 3600])
def test_stale_or_future_timestamp_is_refused(receiver, airflow, age_s):
    body = _payload()
    resp = receiver.post("/mlflow", content=body, headers=_headers(body, timestamp=int(time.time()) - age_s))
    assert resp.status_code == 401
    assert airflow.events == []


def test_without_a_configured_secret_everything_is_refused(airflow):
    settings = Settings(airflow_url="http://airflow.test", airflow_token="t")
    client = TestClient(create_webhook_app(settings, client=AirflowClient(
        settings, transport=httpx.MockTransport(airflow))))
    body = _payload()
    assert client.post("/mlflow", content=body, headers=_headers(body, secret="")).status_code == 401
    assert client.post("/mlflow", content=body, headers=_headers(body, secret="x")).status_code == 401
    assert verify("", {}, b"") is not None and "CKPT_STAGE_WEBHOOK_SECRET" in verify("", {}, b"")


def test_rotated_secrets_any_valid_signature_counts(receiver, airflow):
    body = _payload()
    headers = _headers(body)
    headers["X-MLflow-Signature"] = "v1,bm90LWl0 " + headers["X-MLflow-Signature"]
    assert receiver.post("/mlflow", content=body, headers=headers).status_code == 202


def test_duplicate_delivery_is_ignored(receiver, airflow):
    body = _payload()
    headers = _headers(body)
    assert receiver.post("/mlflow", content=body, headers=headers).status_code == 202
    again = receiver.post("/mlflow", content=body, headers=headers)
    assert again.status_code == 200
    assert again.json()["status"] == "duplicate"
    assert len(airflow.events) == 1


def test_another_delivery_of_the_same_version_is_a_duplicate(receiver, airflow):
    """Two webhooks on one registry, or MLflow sending the event again under a new delivery id: one asset
    event per model version, so one DAG run, one attempt."""
    body = _payload()
    assert receiver.post("/mlflow", content=body, headers=_headers(body)).status_code == 202
    again = receiver.post("/mlflow", content=body, headers=_headers(body))  # a different delivery id
    assert again.status_code == 200 and again.json()["status"] == "duplicate"
    other = _payload(version="4")
    assert receiver.post("/mlflow", content=other, headers=_headers(other)).status_code == 202
    assert [e["extra"]["version"] for e in airflow.events] == ["3", "4"]


def test_a_version_whose_event_was_not_posted_is_not_a_duplicate(receiver, airflow):
    body = _payload()
    airflow.down = True
    assert receiver.post("/mlflow", content=body, headers=_headers(body)).status_code == 503
    airflow.down = False
    # The second webhook's delivery of the same version goes through: the first one posted nothing.
    assert receiver.post("/mlflow", content=body, headers=_headers(body)).status_code == 202
    assert len(airflow.events) == 1


@pytest.mark.parametrize(("entity", "action"), [
    ("model_version", "tag_set"), ("registered_model", "created"), ("model_version_alias", "created"),
])
def test_other_events_are_acknowledged_and_ignored(receiver, airflow, entity, action):
    body = _payload(entity=entity, action=action)
    resp = receiver.post("/mlflow", content=body, headers=_headers(body))
    assert resp.status_code == 200
    assert resp.json()["status"] == "ignored"
    assert airflow.events == []


def test_airflow_down_answers_503_and_the_retry_goes_through(receiver, airflow):
    body = _payload()
    headers = _headers(body)
    airflow.down = True
    resp = receiver.post("/mlflow", content=body, headers=headers)
    assert resp.status_code == 503
    assert airflow.events == []
    # MLflow redelivers with the same id and timestamp: not a duplicate, since nothing was posted.
    airflow.down = False
    assert receiver.post("/mlflow", content=body, headers=headers).status_code == 202
    assert len(airflow.events) == 1


def test_airflow_5xx_answers_503(receiver, airflow):
    airflow.status = 500
    body = _payload()
    assert receiver.post("/mlflow", content=body, headers=_headers(body)).status_code == 503


def test_airflow_refusing_credentials_answers_502(receiver, airflow):
    airflow.status = 401
    body = _payload()
    resp = receiver.post("/mlflow", content=body, headers=_headers(body))
    assert resp.status_code == 502
    assert "configuration" in resp.json()["detail"]


def test_signed_garbage_is_a_bad_request(receiver, airflow):
    odd = json.dumps({"entity": "model_version", "action": "created", "data": [1]})
    for body in ("not json", "[1, 2]", _payload(name=""), odd):
        assert receiver.post("/mlflow", content=body, headers=_headers(body)).status_code == 400
    assert airflow.events == []


def test_oversized_body_is_refused_unread(receiver, airflow):
    body = " " * (2 << 20)
    assert receiver.post("/mlflow", content=body, headers=_headers(body)).status_code == 413


def test_health_reveals_only_whether_it_is_configured(receiver):
    assert receiver.get("/health").json() == {"ok": True, "secret_configured": True, "airflow_configured": True}


def test_mlflows_own_delivery_code_is_accepted(airflow, monkeypatch):
    """MLflow 3.17's sender (the code the tracking server runs), over a real socket, against the receiver."""
    from mlflow.entities.webhook import Webhook, WebhookEvent, WebhookStatus
    from mlflow.webhooks import delivery

    monkeypatch.setenv("MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS", "true")
    monkeypatch.setenv("MLFLOW_WEBHOOK_ALLOWED_SCHEMES", "http,https")
    settings = Settings(webhook_secret=SECRET, airflow_url="http://airflow.test", airflow_token="t")
    app = create_webhook_app(settings, client=AirflowClient(settings, transport=httpx.MockTransport(airflow)))
    port = devstack.free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.05)
        hook = Webhook(webhook_id="w1", name="ckpt-stage", url=f"http://127.0.0.1:{port}/mlflow",
                       events=[WebhookEvent.from_str("model_version.created")], creation_timestamp=0,
                       last_updated_timestamp=0, status=WebhookStatus.ACTIVE, secret=SECRET)
        payload = {"name": "clf", "version": "9", "source": "s3://b/x", "run_id": None, "tags": {},
                   "description": None}
        resp = delivery._send_webhook_request(hook, payload, hook.events[0], delivery._create_webhook_session())
        assert resp.status_code == 202, resp.text
        assert airflow.events[0]["extra"]["version"] == "9"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
