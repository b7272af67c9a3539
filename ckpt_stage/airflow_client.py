"""A small client of Airflow 3's public REST API (``/api/v2``), for the webhook receiver and the dashboard.

Only what the stage needs: trigger a DAG run, read one back, post an asset event. Credentials come from
``Settings`` (``CKPT_STAGE_AIRFLOW_URL`` plus ``CKPT_STAGE_AIRFLOW_TOKEN``, or ``CKPT_STAGE_AIRFLOW_USER``
and ``CKPT_STAGE_AIRFLOW_PASSWORD`` exchanged for a JWT at ``POST {url}/auth/token``, the endpoint of
Airflow's auth managers). Nothing is hard-coded.

Errors follow the stage's taxonomy: Airflow unreachable or answering 5xx → ``AirflowUnavailable``
(transient: the webhook receiver answers 503 so MLflow redelivers); 401/403 → ``AirflowAuthError``
naming the settings to fix; other 4xx → ``AirflowRequestError``. The client does not retry by itself:
its callers already have a retrying party (MLflow's webhook delivery, a person pressing a button).
"""

from __future__ import annotations

import logging
import threading
from typing import Any
from urllib.parse import quote

import httpx

from ckpt_stage.config import PREFIX, Settings
from ckpt_stage.errors import (
    AirflowAuthError,
    AirflowRequestError,
    AirflowUnavailable,
    AssetNotFound,
    ConfigError,
)

log = logging.getLogger(__name__)

API = "/api/v2"


class AirflowClient:
    """``AirflowClient(settings).trigger_dag("ckpt_stage_rerun", {...})``. Thread-safe; one token cache."""

    def __init__(self, settings: Settings, *, transport: httpx.BaseTransport | None = None,
                 timeout_s: float = 10.0):
        self.settings = settings
        self.base = settings.airflow_url.rstrip("/")
        self._transport = transport
        self._timeout = timeout_s
        self._token = settings.airflow_token or ""
        self._lock = threading.Lock()
        self._asset_ids: dict[str, int] = {}
        self._http: httpx.Client | None = None

    # -- public API ----------------------------------------------------------------------------
    def configured(self) -> bool:
        """True when a URL and either a token or a user/password pair are set."""
        s = self.settings
        return bool(s.airflow_url and (s.airflow_token or (s.airflow_user and s.airflow_password)))

    def trigger_dag(self, dag_id: str, conf: dict) -> dict:
        """Start a run of ``dag_id`` now (``logical_date`` null); returns the DAG run, incl. ``dag_run_id``."""
        return self._call("POST", f"/dags/{_seg(dag_id)}/dagRuns", json={"logical_date": None, "conf": conf},
                          what=f"triggering DAG {dag_id!r}")

    def dag_run(self, dag_id: str, dag_run_id: str) -> dict:
        return self._call("GET", f"/dags/{_seg(dag_id)}/dagRuns/{_seg(dag_run_id)}",
                          what=f"reading run {dag_run_id!r} of DAG {dag_id!r}")

    def post_asset_event(self, asset_uri: str, extra: dict) -> dict:
        """Record an event on the asset with this URI (its DAGs get scheduled); returns the event.

        Airflow 3.3's ``POST /api/v2/assets/events`` takes an asset *id*, so the id is looked up by URI
        first (and cached; a stale id after the asset was re-created is looked up again).
        """
        for attempt in (1, 2):
            asset_id = self._asset_id(asset_uri, refresh=attempt == 2)
            try:
                return self._call("POST", "/assets/events", json={"asset_id": asset_id, "extra": extra},
                                  what=f"posting an event on asset {asset_uri!r}")
            except AirflowRequestError as exc:
                if exc.status_code != 404 or attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def close(self) -> None:
        if self._http is not None:
            self._http.close()
            self._http = None

    # -- internals -----------------------------------------------------------------------------
    def _asset_id(self, uri: str, *, refresh: bool = False) -> int:
        if not refresh and uri in self._asset_ids:
            return self._asset_ids[uri]
        # uri_prefix_pattern is an index-friendly prefix match; keep only the exact URI.
        page = self._call("GET", "/assets", params={"uri_prefix_pattern": uri, "limit": 100},
                          what=f"looking up asset {uri!r}")
        for asset in page.get("assets", []):
            if asset.get("uri") == uri:
                self._asset_ids[uri] = int(asset["id"])
                return self._asset_ids[uri]
        raise AssetNotFound(
            f"Airflow has no asset with URI {uri!r} yet",
            hint="the DAG that schedules on it (ckpt_stage_validate) has not been parsed yet, or the "
                 "dags folder is not the stage's",
        )

    def _client(self) -> httpx.Client:
        if self._http is None:
            self._http = httpx.Client(transport=self._transport, timeout=self._timeout)
        return self._http

    def _require_config(self) -> None:
        if not self.settings.airflow_url:
            raise ConfigError(f"{PREFIX}AIRFLOW_URL is not set: the stage cannot reach Airflow's REST API",
                              hint=f"set {PREFIX}AIRFLOW_URL (e.g. http://airflow-api:8080) and "
                                   f"{PREFIX}AIRFLOW_TOKEN or {PREFIX}AIRFLOW_USER/{PREFIX}AIRFLOW_PASSWORD")
        if not self.configured():
            raise ConfigError(f"no Airflow credentials: set {PREFIX}AIRFLOW_TOKEN, or {PREFIX}AIRFLOW_USER "
                              f"and {PREFIX}AIRFLOW_PASSWORD")

    def _send(self, method: str, url: str, *, what: str, **kwargs: Any) -> httpx.Response:
        try:
            return self._client().request(method, url, **kwargs)
        except httpx.TransportError as exc:  # connect refused, DNS, timeouts, resets
            raise AirflowUnavailable(f"{what}: cannot reach Airflow at {self.base}: {type(exc).__name__}: {exc}",
                                     hint=f"check {PREFIX}AIRFLOW_URL and that the API server is up") from exc

    def _login(self, *, what: str) -> str:
        """A JWT for the configured user (``POST /auth/token``); the static token when one is set."""
        if self.settings.airflow_token:
            return self.settings.airflow_token
        resp = self._send("POST", f"{self.base}/auth/token", what=what,
                          json={"username": self.settings.airflow_user, "password": self.settings.airflow_password})
        if resp.status_code in (401, 403):
            raise AirflowAuthError(
                f"{what}: Airflow refused the login of {self.settings.airflow_user!r} ({resp.status_code})",
                hint=f"check {PREFIX}AIRFLOW_USER and {PREFIX}AIRFLOW_PASSWORD")
        _raise_for_status(resp, what=f"{what} (login)")
        token = resp.json().get("access_token")
        if not token:
            raise AirflowRequestError(f"{what}: Airflow's /auth/token answered without an access_token",
                                      status_code=resp.status_code)
        return str(token)

    def _call(self, method: str, path: str, *, what: str, **kwargs: Any) -> Any:
        self._require_config()
        url = f"{self.base}{API}{path}"
        for attempt in (1, 2):
            with self._lock:
                if not self._token:
                    self._token = self._login(what=what)
                token = self._token
            resp = self._send(method, url, what=what, headers={"Authorization": f"Bearer {token}"}, **kwargs)
            if resp.status_code == 401 and attempt == 1 and not self.settings.airflow_token:
                # JWTs expire (api_auth.jwt_expiration_time): log in again once.
                with self._lock:
                    if self._token == token:
                        self._token = ""
                continue
            if resp.status_code in (401, 403):
                names = (f"{PREFIX}AIRFLOW_TOKEN" if self.settings.airflow_token
                         else f"{PREFIX}AIRFLOW_USER/{PREFIX}AIRFLOW_PASSWORD")
                verb = "refused the credentials" if resp.status_code == 401 else "denied the permission"
                raise AirflowAuthError(f"{what}: Airflow {verb} ({resp.status_code}): {_detail(resp)}",
                                       hint=f"check {names}; the user needs access to DAG runs and assets")
            _raise_for_status(resp, what=what)
            return resp.json() if resp.content else {}
        raise AssertionError("unreachable")


def _raise_for_status(resp: httpx.Response, *, what: str) -> None:
    if resp.status_code >= 500:
        raise AirflowUnavailable(f"{what}: Airflow answered {resp.status_code}: {_detail(resp)}")
    if resp.status_code >= 400:
        raise AirflowRequestError(f"{what}: Airflow answered {resp.status_code}: {_detail(resp)}",
                                  status_code=resp.status_code)


def _detail(resp: httpx.Response) -> str:
    try:
        body = resp.json()
    except ValueError:
        return resp.text[:300]
    if isinstance(body, dict) and "detail" in body:
        return str(body["detail"])[:500]
    return str(body)[:300]


def _seg(text: str) -> str:
    """One URL path segment: run ids hold ``:`` and ``+`` (``manual__2026-01-01T00:00:00+00:00``)."""
    return quote(text, safe="")
