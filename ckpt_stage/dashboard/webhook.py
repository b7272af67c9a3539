"""MLflow webhook receiver: ``model_version.created`` → an Airflow asset event → ``ckpt_stage_validate``.

Mounted into Airflow's API server by the stage's plugin (``/ckpt-stage-webhook``), or served alone with
``ckpt-stage webhook serve``. MLflow posts to ``POST {prefix}/mlflow``.

Every request must carry MLflow's signature (``mlflow/webhooks/delivery.py`` of MLflow 3.17, which follows
Standard Webhooks): ``X-MLflow-Signature: v1,<base64 HMAC-SHA256(secret, f"{delivery_id}.{timestamp}.{body}")>``
with ``X-MLflow-Delivery-Id`` and ``X-MLflow-Timestamp`` (Unix seconds). A request without a valid
signature, or with a timestamp outside the replay window, is refused with 401 before anything else.

MLflow retries a delivery (same delivery id, same timestamp) up to 3 times on 429/5xx/connection errors
and then drops it for good: so Airflow being unreachable answers 503 (MLflow retries), and a delivery id
is remembered only once its asset event was posted (a retry after a 503 must not be mistaken for a
duplicate). Another delivery id for a model version already posted (two webhooks, or the event sent
again) is a duplicate too: one asset event per version and receiver process. Whatever is lost anyway, the
sweep of ``ckpt_stage_validate`` finds; a duplicate that gets through (another receiver process) or
arrives late is harmless: the DAG run's ``discover`` and the claim skip a version that is decided or
held by a live lease, so it makes no second attempt.
"""

from __future__ import annotations

import base64
import collections
import hashlib
import hmac
import json
import logging
import threading
import time
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from ckpt_stage.airflow_client import AirflowClient
from ckpt_stage.config import PREFIX, Settings
from ckpt_stage.errors import CkptStageError, TransientError
from ckpt_stage.orchestrate import REGISTRATIONS_ASSET_URI

log = logging.getLogger(__name__)

SIGNATURE_HEADER = "X-MLflow-Signature"
DELIVERY_ID_HEADER = "X-MLflow-Delivery-Id"
TIMESTAMP_HEADER = "X-MLflow-Timestamp"
SIGNATURE_VERSION = "v1"
REPLAY_WINDOW_S = 300
MAX_BODY_BYTES = 1 << 20
URL_PREFIX = "/ckpt-stage-webhook"
PATH = "/mlflow"


class DeliveryLog:
    """Bounded LRU of delivery ids and model versions already handled (per process; a duplicate that slips
    through is harmless)."""

    def __init__(self, size: int = 4096):
        self._ids: collections.OrderedDict[str, float] = collections.OrderedDict()
        self._size = size
        self._lock = threading.Lock()

    def seen(self, delivery_id: str) -> bool:
        with self._lock:
            if delivery_id in self._ids:
                self._ids.move_to_end(delivery_id)
                return True
            return False

    def add(self, delivery_id: str) -> None:
        with self._lock:
            self._add(delivery_id)

    def _add(self, key: str) -> None:
        self._ids[key] = time.time()
        self._ids.move_to_end(key)
        while len(self._ids) > self._size:
            self._ids.popitem(last=False)

    def take(self, key: str) -> bool:
        """Remember ``key`` and return True, or False when it is remembered already (atomic: of two
        deliveries at once, one takes it)."""
        with self._lock:
            if key in self._ids:
                self._ids.move_to_end(key)
                return False
            self._add(key)
            return True

    def discard(self, key: str) -> None:
        with self._lock:
            self._ids.pop(key, None)


def sign(secret: str, delivery_id: str, timestamp: str, body: bytes) -> str:
    """The ``X-MLflow-Signature`` value MLflow sends (``_generate_hmac_signature`` in delivery.py)."""
    content = f"{delivery_id}.{timestamp}.".encode() + body
    digest = hmac.new(secret.encode("utf-8"), content, hashlib.sha256).digest()
    return f"{SIGNATURE_VERSION},{base64.b64encode(digest).decode('ascii')}"


def verify(secret: str, headers: Any, body: bytes, *, now: float | None = None,
           window_s: float = REPLAY_WINDOW_S) -> str | None:
    """None when the request is authentic and fresh, else why not (never echoed in detail to the caller)."""
    if not secret:
        return f"{PREFIX}WEBHOOK_SECRET is not set: every delivery is refused"
    delivery_id = headers.get(DELIVERY_ID_HEADER) or ""
    timestamp = headers.get(TIMESTAMP_HEADER) or ""
    signature = headers.get(SIGNATURE_HEADER) or ""
    if not (delivery_id and timestamp and signature):
        return "missing signature headers"
    try:
        ts = int(timestamp)
    except ValueError:
        return "malformed timestamp"
    now = time.time() if now is None else now
    if abs(now - ts) > window_s:
        return f"timestamp outside the {window_s:.0f} s replay window"
    expected = sign(secret, delivery_id, timestamp, body).split(",", 1)[1].encode()
    # Standard Webhooks allows several space-separated signatures (secret rotation); any valid v1 one counts.
    for candidate in signature.split():
        version, _, value = candidate.partition(",")
        if version == SIGNATURE_VERSION and hmac.compare_digest(value.encode(), expected):
            return None
    return "signature mismatch"


def create_webhook_router(settings: Settings | None = None, *, client: AirflowClient | None = None,
                          deliveries: DeliveryLog | None = None) -> APIRouter:
    router = APIRouter()
    state: dict[str, Any] = {"settings": settings, "client": client}
    deliveries = deliveries or DeliveryLog()
    client_lock = threading.Lock()

    def current() -> tuple[Settings, AirflowClient]:
        # Settings are read on first use, not at import: the plugin is imported by every Airflow component.
        with client_lock:
            if state["settings"] is None:
                state["settings"] = Settings.from_env()
            if state["client"] is None:
                state["client"] = AirflowClient(state["settings"])
            return state["settings"], state["client"]

    @router.get("/health")
    def health() -> dict[str, Any]:
        s, c = current()
        return {"ok": True, "secret_configured": bool(s.webhook_secret), "airflow_configured": c.configured()}

    @router.post(PATH)
    async def receive(request: Request) -> JSONResponse:
        s, airflow = current()
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > MAX_BODY_BYTES:  # refuse before reading an unsigned body
            return JSONResponse({"detail": "payload too large"}, status_code=413)
        body = await request.body()
        if len(body) > MAX_BODY_BYTES:
            return JSONResponse({"detail": "payload too large"}, status_code=413)
        problem = verify(s.webhook_secret, request.headers, body)
        if problem is not None:
            log.warning("refused a webhook delivery from %s: %s",
                        request.client.host if request.client else "?", problem)
            return JSONResponse({"detail": "invalid or missing signature"}, status_code=401)
        delivery_id = request.headers[DELIVERY_ID_HEADER]
        if deliveries.seen(delivery_id):
            return JSONResponse({"status": "duplicate", "delivery_id": delivery_id})
        try:
            payload = json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError):
            return JSONResponse({"detail": "body is not JSON"}, status_code=400)
        if not isinstance(payload, dict):
            return JSONResponse({"detail": "body is not a JSON object"}, status_code=400)
        entity, action = payload.get("entity"), payload.get("action")
        if (entity, action) != ("model_version", "created"):
            deliveries.add(delivery_id)
            return JSONResponse({"status": "ignored", "event": f"{entity}.{action}"})
        data: dict[str, Any] = payload["data"] if isinstance(payload.get("data"), dict) else {}
        name, version = data.get("name"), data.get("version")
        if not isinstance(name, str) or not name or version in (None, ""):
            return JSONResponse({"detail": "model_version.created without name and version"}, status_code=400)
        # A version is created once: another delivery id for the same version (two webhooks on one
        # registry, or MLflow sending the event again) is the same event, and makes no second asset event.
        version_key = f"model_version.created:{name}/{version}"
        if not deliveries.take(version_key):
            deliveries.add(delivery_id)
            return JSONResponse({"status": "duplicate", "delivery_id": delivery_id,
                                 "model": {"name": name, "version": str(version)}})
        extra = {"name": name, "version": str(version), "delivery_id": delivery_id, "source": "mlflow-webhook"}
        try:
            event = await run_in_threadpool(airflow.post_asset_event, REGISTRATIONS_ASSET_URI, extra)
        except TransientError as exc:
            deliveries.discard(version_key)  # not delivered: MLflow's retry (or another webhook) may post it
            log.warning("webhook %s for %s v%s: Airflow unavailable, asking MLflow to retry: %s",
                        delivery_id, name, version, exc)
            return JSONResponse({"detail": "Airflow is unavailable; retry later"}, status_code=503,
                                headers={"Retry-After": "5"})
        except CkptStageError as exc:
            deliveries.discard(version_key)
            # Bad credentials or configuration: log loudly for the operator; 502 tells MLflow it was not us
            # who accepted it (MLflow retries 502 a few times; the sweep catches the version anyway).
            log.error("webhook %s for %s v%s: cannot post the asset event: %s%s", delivery_id, name, version,
                      exc, f" (hint: {exc.hint})" if exc.hint else "")
            return JSONResponse({"detail": "the receiver cannot reach Airflow with its configuration"},
                                status_code=502)
        deliveries.add(delivery_id)
        log.info("webhook %s: %s v%s registered → asset event %s", delivery_id, name, version, event.get("id"))
        return JSONResponse({"status": "queued", "model": {"name": name, "version": str(version)},
                             "asset_event_id": event.get("id")}, status_code=202)

    return router


def create_webhook_app(settings: Settings | None = None, *, client: AirflowClient | None = None) -> FastAPI:
    """The receiver as its own FastAPI app: mounted by the Airflow plugin, or served by ``ckpt-stage webhook serve``."""
    app = FastAPI(title="ckpt-stage webhook receiver", docs_url=None, redoc_url=None, openapi_url=None)
    app.include_router(create_webhook_router(settings, client=client))
    return app
