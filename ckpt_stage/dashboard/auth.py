"""Who may look and who may re-run.

Standalone (``ckpt-stage dashboard``): pages and the read API are open (bind to loopback or put it
behind your proxy); re-running needs the operator token ``CKPT_STAGE_DASHBOARD_TOKEN``, either as
``Authorization: Bearer <token>`` (scripts) or through the login form, which sets an HttpOnly,
SameSite=Strict session cookie holding an HMAC of the token (never the token itself). No token
configured → re-run is refused with 403 and a message naming the variable.

Mounted in Airflow (plugin): Airflow's own login. The user comes from Airflow's JWT, sent by the
Airflow UI as the ``_token`` cookie (or a bearer header from scripts), verified by Airflow's auth
manager; viewing needs a signed-in user, re-running needs permission to trigger the re-run DAG.

CSRF: a request authenticated by a cookie (session or Airflow's) must also carry ``X-CSRF-Token``
equal to the ``ckpt_stage_csrf`` cookie (double submit). A cross-site page can neither read that
cookie nor set the header without a CORS preflight; bearer requests carry no ambient credential and
need no CSRF token. Together with SameSite cookies and JSON-only bodies this covers the re-run POST.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request

from ckpt_stage.orchestrate import RERUN_DAG_ID

TOKEN_ENV = "CKPT_STAGE_DASHBOARD_TOKEN"
SESSION_COOKIE = "ckpt_stage_session"
CSRF_COOKIE = "ckpt_stage_csrf"
CSRF_HEADER = "X-CSRF-Token"
AIRFLOW_COOKIE = "_token"  # airflow.api_fastapi.auth.managers.base_auth_manager.COOKIE_NAME_JWT_TOKEN
SESSION_MAX_AGE_S = 12 * 3600


@dataclass(frozen=True)
class Principal:
    name: str
    via: str
    """``bearer``, ``session`` or ``airflow``."""
    cookie: bool = False
    """Authenticated by an ambient cookie (then CSRF applies)."""
    user: Any = field(default=None, compare=False, repr=False)


class AuthError(Exception):
    def __init__(self, status: int, detail: str, *, login_url: str | None = None):
        super().__init__(detail)
        self.status, self.detail, self.login_url = status, detail, login_url

    @property
    def headers(self) -> dict[str, str]:
        return {"WWW-Authenticate": 'Bearer realm="ckpt-stage"'} if self.status == 401 else {}


def new_csrf_token() -> str:
    return secrets.token_urlsafe(24)


def check_csrf(request: Request) -> None:
    cookie = request.cookies.get(CSRF_COOKIE, "")
    header = request.headers.get(CSRF_HEADER, "")
    if not cookie or not header or not hmac.compare_digest(cookie, header):
        raise AuthError(403, f"missing or wrong {CSRF_HEADER}; reload the page and try again")


def _bearer(request: Request) -> str | None:
    """The bearer credential, '' for a malformed Authorization header, None when there is none."""
    raw = request.headers.get("authorization")
    if raw is None:
        return None
    scheme, _, cred = raw.strip().partition(" ")
    return cred.strip() if scheme.lower() == "bearer" else ""


class TokenAuth:
    """Standalone: one operator token from the environment."""

    mode = "standalone"
    login_form = True

    def __init__(self, token: str, *, max_age_s: float = SESSION_MAX_AGE_S, clock: Callable[[], float] = time.time):
        self.token, self.max_age_s, self.clock = token, max_age_s, clock

    @property
    def enabled(self) -> bool:
        return bool(self.token)

    def token_ok(self, given: str) -> bool:
        return bool(self.token) and hmac.compare_digest(given.encode(), self.token.encode())

    def _sign(self, issued: str) -> str:
        return hmac.new(self.token.encode(), f"ckpt-stage-session:v1:{issued}".encode(), hashlib.sha256).hexdigest()

    def session_value(self) -> str:
        issued = str(int(self.clock()))
        return f"{issued}.{self._sign(issued)}"

    def session_ok(self, value: str) -> bool:
        if not self.token or "." not in value:
            return False
        issued, _, sig = value.partition(".")
        if not issued.isdigit() or not hmac.compare_digest(sig, self._sign(issued)):
            return False
        return 0 <= self.clock() - int(issued) <= self.max_age_s

    async def identify(self, request: Request) -> Principal | None:
        bearer = _bearer(request)
        if bearer and self.token_ok(bearer):
            return Principal("operator", "bearer")
        session = request.cookies.get(SESSION_COOKIE)
        if bearer is None and session and self.session_ok(session):
            return Principal("operator", "session", cookie=True)
        return None

    async def require_viewer(self, request: Request) -> Principal | None:
        return await self.identify(request)

    async def require_operator(self, request: Request) -> Principal:
        if not self.token:
            raise AuthError(403, f"re-run is disabled on this dashboard: no operator token is configured; set "
                                 f"{TOKEN_ENV} where the dashboard runs and sign in with it")
        bearer = _bearer(request)
        if bearer is not None:
            if not bearer:
                raise AuthError(401, "the Authorization header must be 'Bearer <token>'")
            if not self.token_ok(bearer):
                raise AuthError(403, f"wrong token: it does not match {TOKEN_ENV}")
            return Principal("operator", "bearer")
        session = request.cookies.get(SESSION_COOKIE)
        if session:
            if not self.session_ok(session):
                raise AuthError(401, "your session expired or the token changed; sign in again", login_url="login")
            check_csrf(request)
            return Principal("operator", "session", cookie=True)
        raise AuthError(401, f"sign in with the operator token ({TOKEN_ENV}) or send it as a bearer token",
                        login_url="login")


class AirflowAuth:
    """Mounted in Airflow's API server: reuse its login (JWT) and its permissions.

    ``auth_manager`` is looked up lazily (the plugin is imported before Airflow initialises its auth
    manager) and can be injected for tests.
    """

    mode = "airflow"
    login_form = False
    enabled = True

    def __init__(self, auth_manager: Callable[[], Any] | None = None, *, dag_id: str = RERUN_DAG_ID):
        self._auth_manager = auth_manager
        self.dag_id = dag_id

    def auth_manager(self) -> Any:
        if self._auth_manager is not None:
            return self._auth_manager()
        from airflow.api_fastapi.app import get_auth_manager

        return get_auth_manager()

    def login_url(self) -> str | None:
        try:
            return str(self.auth_manager().get_url_login())
        except Exception:  # noqa: BLE001 - no login page is still a clear 401
            return None

    async def _resolve(self, request: Request) -> Principal | None:
        from jwt import ExpiredSignatureError, InvalidTokenError

        bearer = _bearer(request)
        token = bearer if bearer is not None else request.cookies.get(AIRFLOW_COOKIE)
        if not token:
            return None
        try:
            user = await self.auth_manager().get_user_from_token(token)
        except ExpiredSignatureError:
            raise AuthError(401, "your Airflow session expired; sign in to Airflow again", login_url=self.login_url())
        except InvalidTokenError:
            raise AuthError(403, "invalid Airflow token")
        name = getattr(user, "get_name", lambda: "airflow user")()
        return Principal(str(name), "airflow", cookie=bearer is None, user=user)

    async def identify(self, request: Request) -> Principal | None:
        try:
            return await self._resolve(request)
        except AuthError:
            return None

    async def require_viewer(self, request: Request) -> Principal:
        who = await self._resolve(request)
        if who is None:
            raise AuthError(401, "sign in to Airflow to see the checkpoint dashboard", login_url=self.login_url())
        return who

    async def require_operator(self, request: Request) -> Principal:
        who = await self.require_viewer(request)
        if who.cookie:
            check_csrf(request)
        from airflow.api_fastapi.auth.managers.models.resource_details import DagAccessEntity, DagDetails

        am = self.auth_manager()
        allowed = await run_in_threadpool(
            am.is_authorized_dag, method="POST", access_entity=DagAccessEntity.RUN,
            details=DagDetails(id=self.dag_id), user=who.user,
        )
        if not allowed:
            raise AuthError(403, f"{who.name} may not trigger DAG {self.dag_id} in Airflow, so may not re-run")
        return who
