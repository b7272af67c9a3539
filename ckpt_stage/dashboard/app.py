"""The dashboard: FastAPI app serving HTML pages, the JSON API they use, and ``/metrics``.

``create_app()`` is what ``ckpt-stage dashboard`` serves and what the Airflow plugin mounts at
``/ckpt-stage`` (``create_app(mounted=True)``, which switches to Airflow's login). Pages are
rendered on the server (Jinja, inline SVG charts); one small script adds the re-run buttons and
polls the JSON API for the new attempt. Every link is built from the ASGI ``root_path`` so the app
works at ``/`` and under any mount prefix or proxy path.

Routes (all reads are ``GET``; the only write is ``POST /api/rerun``):
    /                                   versions by status, problems first; filters; chart; bulk re-run
    /versions/{model}/{version}         every attempt's report, drift, links; re-run
    /login, /logout                     standalone only: the operator token → session cookie
    /api/versions                       ?status=&model=&reason=&page=&page_size=
    /api/versions/{model}/{version}     the version, its attempts with reports, drift, links
    /api/models                         model names
    /api/stats/status                   versions per status (?model=&reason=)
    /api/stats/reasons                  quarantined versions per reason per day (?days=&model=)
    /api/whoami                         auth mode, current user, whether re-run is possible
    POST /api/rerun                     {"model", "versions"} or {"status", "reason", "model"} → 202
    /api/rerun/{job_id}                 progress of an in-process re-run
    /metrics                            Prometheus text format
    /healthz                            liveness (no MLflow call)
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool

from ckpt_stage.config import Settings
from ckpt_stage.dashboard import charts, metrics
from ckpt_stage.dashboard.auth import (
    CSRF_COOKIE,
    CSRF_HEADER,
    SESSION_COOKIE,
    TOKEN_ENV,
    AirflowAuth,
    AuthError,
    Principal,
    TokenAuth,
    new_csrf_token,
)
from ckpt_stage.dashboard.data import (
    STATUS_FILTERS,
    DashboardData,
    human_age,
    human_bytes,
    human_seconds,
)
from ckpt_stage.dashboard.rerun import Rerunner, RerunError, RerunRequest
from ckpt_stage.domain import RERUNNABLE_STATUSES, ReasonCode, Status
from ckpt_stage.errors import CkptStageError

log = logging.getLogger(__name__)

HERE = Path(__file__).resolve().parent
STATUS_LABELS = {
    None: "All", "quarantined": "Quarantined", "error": "Error", "validating": "Validating",
    "pending": "Pending", "none": "Never validated", "skipped": "Skipped", "promoted": "Promoted",
}
TAB_ORDER = (None, "quarantined", "error", "validating", "pending", "none", "skipped", "promoted")


class BadRequest(Exception):
    def __init__(self, detail: str):
        super().__init__(detail)
        self.detail = detail


def _jinja() -> Any:
    import jinja2

    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(HERE / "templates")),
        autoescape=jinja2.select_autoescape(("html",), default=True),
        trim_blocks=True, lstrip_blocks=True,
    )
    env.filters.update(age=human_age, bytes=human_bytes, seconds=human_seconds, colour=charts.reason_colour,
                       pretty=lambda v: json.dumps(v, indent=2, sort_keys=True, default=str))
    env.globals.update(status_labels=STATUS_LABELS)
    return env


@dataclass(frozen=True)
class Dashboard:
    """What every route needs, built once by ``create_app`` and found again through ``request.app``."""

    settings: Settings
    data: DashboardData
    auth: TokenAuth | AirflowAuth
    rerunner: Rerunner
    templates: Any


def _ctx(request: Request) -> Dashboard:
    return request.app.state.ctx


def create_app(settings: Settings | None = None, *, mounted: bool = False, data: DashboardData | None = None,
               auth: TokenAuth | AirflowAuth | None = None, rerunner: Rerunner | None = None) -> FastAPI:
    """The dashboard app. ``mounted=True``: inside Airflow's API server, using Airflow's login."""
    settings = settings or Settings.from_env()
    data = data or DashboardData(settings)
    auth = auth or (AirflowAuth() if mounted else TokenAuth(settings.dashboard_token))
    rerunner = rerunner or Rerunner(settings, data)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        rerunner.shutdown()

    app = FastAPI(title="ckpt-stage dashboard", version="1", lifespan=lifespan, docs_url="/api/docs",
                  redoc_url=None, openapi_url="/api/openapi.json")
    app.state.ctx = Dashboard(settings, data, auth, rerunner, _jinja())
    app.state.settings, app.state.data, app.state.auth, app.state.rerunner = settings, data, auth, rerunner
    app.mount("/static", StaticFiles(directory=str(HERE / "static")), name="static")
    for exc_type, handler in ERROR_HANDLERS.items():
        app.add_exception_handler(exc_type, handler)
    app.include_router(pages)
    app.include_router(api)
    return app


# -- helpers -----------------------------------------------------------------------------------------
def base(request: Request) -> str:
    return str(request.scope.get("root_path", "")).rstrip("/")


def cookie_path(request: Request) -> str:
    return base(request) or "/"


def wants_html(request: Request) -> bool:
    return not request.url.path.startswith(f"{base(request)}/api/") and request.url.path != f"{base(request)}/metrics"


def render(request: Request, name: str, ctx: dict[str, Any], status_code: int = 200,
           who: Principal | None = None) -> HTMLResponse:
    d = _ctx(request)
    csrf = request.cookies.get(CSRF_COOKIE) or new_csrf_token()
    body = d.templates.get_template(name).render(
        base=base(request), csrf=csrf, csrf_header=CSRF_HEADER, who=who, auth_mode=d.auth.mode,
        rerun_enabled=d.auth.enabled, rerun_mode=d.rerunner.mode, token_env=TOKEN_ENV, alias=d.settings.alias,
        request_path=_path_in_app(request), **ctx)
    resp = HTMLResponse(body, status_code=status_code)
    if request.cookies.get(CSRF_COOKIE) != csrf:
        resp.set_cookie(CSRF_COOKIE, csrf, path=cookie_path(request), samesite="strict", httponly=True,
                        secure=request.url.scheme == "https")
    # Pages show live state; an old copy from a cache would hide a new verdict.
    resp.headers["Cache-Control"] = "no-store"
    return resp


def _path_in_app(request: Request) -> str:
    path = request.url.path
    b = base(request)
    if b and path.startswith(b):
        path = path[len(b):] or "/"
    return path + (f"?{request.url.query}" if request.url.query else "")


def check_filters(status: str | None, reason: str | None) -> tuple[str | None, str | None]:
    status, reason = status or None, reason or None
    if status is not None and status not in STATUS_FILTERS:
        raise BadRequest(f"status must be one of {', '.join(STATUS_FILTERS)}")
    if reason is not None and reason not in ReasonCode.__members__:
        raise BadRequest(f"reason {reason!r} is not a reason code")
    return status, reason


# -- errors: one handler per error type --------------------------------------------------------------
async def _auth_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, AuthError)
    login = exc.login_url
    if login == "login":
        login = f"{base(request)}/login?{urlencode({'next': _path_in_app(request)})}"
    if wants_html(request):
        return render(request, "error.html", {"title": "Sign in needed" if exc.status == 401 else "Not allowed",
                                            "message": exc.detail, "login_url": login}, exc.status)
    return JSONResponse({"detail": exc.detail, "login_url": login}, exc.status, headers=exc.headers)


async def _bad_request(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, BadRequest)
    if wants_html(request):
        return render(request, "error.html", {"title": "Bad request", "message": exc.detail}, 422)
    return JSONResponse({"detail": exc.detail}, 422)


async def _rerun_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RerunError)
    return JSONResponse({"detail": exc.detail}, exc.status)


async def _stage_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, CkptStageError)
    log.warning("dashboard request %s failed: %s", request.url.path, exc)
    detail = f"cannot read the registry: {exc.message}"
    if wants_html(request):
        return render(request, "error.html", {"title": "MLflow is not answering", "message": detail}, 503)
    return JSONResponse({"detail": detail, "code": exc.code.value}, 503)


ERROR_HANDLERS: dict[type[Exception], Callable[[Request, Exception], Awaitable[Response]]] = {
    AuthError: _auth_error, BadRequest: _bad_request, RerunError: _rerun_error, CkptStageError: _stage_error,
}


# -- pages -------------------------------------------------------------------------------------------
pages = APIRouter(include_in_schema=False)


@pages.get("/", response_class=HTMLResponse)
async def home(request: Request, status: str | None = None, model: str | None = None,
               reason: str | None = None, page: int = 1, page_size: int = 50) -> Response:
    d = _ctx(request)
    who = await d.auth.require_viewer(request)
    status, reason = check_filters(status, reason)
    model = model or None
    page_no, size = max(1, page), max(1, min(page_size, 500))

    def load() -> dict[str, Any]:
        listing = d.data.page(status=status, model=model, reason=reason, page=page_no, page_size=size)
        return {
            "listing": listing,
            "counts": d.data.counts(model=model, reason=reason),
            "models": d.data.models(),
            "stats": d.data.reason_stats(days=14, model=model),
        }

    loaded = await run_in_threadpool(load)
    bulk_status = status if status in RERUNNABLE_STATUSES else Status.QUARANTINED.value
    bulk_count = loaded["counts"].get(bulk_status, 0)
    return render(request, "home.html", {
        **loaded,
        "title": "Checkpoint verdicts",
        "filters": {"status": status, "model": model, "reason": reason},
        "tabs": [(s, STATUS_LABELS[s], sum(loaded["counts"].values()) if s is None else loaded["counts"].get(s, 0))
                 for s in TAB_ORDER],
        "reasons": [c.value for c in ReasonCode],
        "chart": charts.reasons_chart(loaded["stats"]),
        "bulk": {"status": bulk_status, "reason": reason, "model": model, "count": bulk_count},
        "link": lambda **kw: _link(base(request), {"status": status, "model": model, "reason": reason}, kw),
        "run_url": d.data.mlflow_run_url,
    }, who=who)


@pages.get("/versions/{model:path}/{version}", response_class=HTMLResponse)
async def version_page(request: Request, model: str, version: str) -> Response:
    d = _ctx(request)
    who = await d.auth.require_viewer(request)
    detail = await run_in_threadpool(d.data.detail, model, version)
    if detail is None:
        return render(request, "error.html", {"title": "No such version",
                                            "message": f"MLflow has no version {version} of model {model!r}."},
                      404, who=who)
    return render(request, "version.html", {"title": f"{model} v{version}", "d": detail,
                                          "quote": lambda s: quote(str(s), safe="")}, who=who)


@pages.get("/login", response_class=HTMLResponse)
async def login_form(request: Request, next: str = "/") -> Response:  # noqa: A002 - the usual name
    auth = _ctx(request).auth
    if not isinstance(auth, TokenAuth):
        return RedirectResponse(auth.login_url() or f"{base(request)}/", 303)
    return render(request, "login.html", {"title": "Sign in", "next": _safe_next(next), "error": None},
                  who=await auth.identify(request))


@pages.post("/login", response_class=HTMLResponse)
async def login(request: Request) -> Response:
    auth = _ctx(request).auth
    if not isinstance(auth, TokenAuth):
        return RedirectResponse(auth.login_url() or f"{base(request)}/", 303)
    form = await request.form()
    token, nxt = str(form.get("token", "")), _safe_next(str(form.get("next", "/")))
    if not auth.enabled:
        return render(request, "login.html", {"title": "Sign in", "next": nxt, "error":
                      f"Re-run is disabled: set {TOKEN_ENV} where the dashboard runs."}, 403)
    if not auth.token_ok(token):
        return render(request, "login.html", {"title": "Sign in", "next": nxt, "error":
                      f"That token does not match {TOKEN_ENV}."}, 403)
    resp = RedirectResponse(f"{base(request)}{nxt}", 303)
    resp.set_cookie(SESSION_COOKIE, auth.session_value(), max_age=int(auth.max_age_s), path=cookie_path(request),
                    httponly=True, samesite="strict", secure=request.url.scheme == "https")
    return resp


@pages.post("/logout")
async def logout(request: Request) -> Response:
    resp = RedirectResponse(f"{base(request)}/", 303)
    resp.delete_cookie(SESSION_COOKIE, path=cookie_path(request))
    return resp


@pages.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


# -- JSON API and /metrics ---------------------------------------------------------------------------
api = APIRouter()


@api.get("/api/versions")
async def api_versions(request: Request, status: str | None = None, model: str | None = None,
                       reason: str | None = None, page: int = 1, page_size: int = 50) -> dict[str, Any]:
    d = _ctx(request)
    await d.auth.require_viewer(request)
    status, reason = check_filters(status, reason)
    if page < 1 or not 1 <= page_size <= 500:
        raise BadRequest("page must be ≥ 1 and page_size between 1 and 500")
    return await run_in_threadpool(lambda: d.data.page(status=status, model=model or None, reason=reason,
                                                       page=page, page_size=page_size))


@api.get("/api/versions/{model:path}/{version}")
async def api_version(request: Request, model: str, version: str) -> Response:
    d = _ctx(request)
    await d.auth.require_viewer(request)
    detail = await run_in_threadpool(d.data.detail, model, version)
    if detail is None:
        return JSONResponse({"detail": f"no version {version} of model {model!r}"}, 404)
    return JSONResponse(detail, headers={"Cache-Control": "no-store"})


@api.get("/api/models")
async def api_models(request: Request) -> dict[str, Any]:
    d = _ctx(request)
    await d.auth.require_viewer(request)
    return {"models": await run_in_threadpool(d.data.models)}


@api.get("/api/stats/status")
async def api_status_counts(request: Request, model: str | None = None, reason: str | None = None) -> dict:
    d = _ctx(request)
    await d.auth.require_viewer(request)
    _, reason = check_filters(None, reason)
    return {"counts": await run_in_threadpool(lambda: d.data.counts(model=model or None, reason=reason))}


@api.get("/api/stats/reasons")
async def api_reason_stats(request: Request, days: int = 14, model: str | None = None) -> dict[str, Any]:
    d = _ctx(request)
    await d.auth.require_viewer(request)
    if not 1 <= days <= 366:
        raise BadRequest("days must be between 1 and 366")
    stats, current = await run_in_threadpool(
        lambda: (d.data.reason_stats(days=days, model=model or None), d.data.reason_counts(model=model or None)))
    return {**stats, "current": current}


@api.get("/api/whoami")
async def api_whoami(request: Request) -> dict[str, Any]:
    d = _ctx(request)
    who = await d.auth.identify(request)
    return {"auth": d.auth.mode, "user": who.name if who else None, "via": who.via if who else None,
            "rerun_enabled": d.auth.enabled, "rerun_mode": d.rerunner.mode,
            "login_url": f"{base(request)}/login" if isinstance(d.auth, TokenAuth) else d.auth.login_url()}


@api.post("/api/rerun", status_code=202)
async def api_rerun(request: Request) -> Response:
    d = _ctx(request)
    who = await d.auth.require_operator(request)
    if "json" not in request.headers.get("content-type", ""):
        # JSON only: a cross-site HTML form cannot send it without a CORS preflight.
        return JSONResponse({"detail": "send the re-run request as application/json"}, 415)
    try:
        body = await request.json()
    except ValueError:
        return JSONResponse({"detail": "the body is not valid JSON"}, 422)
    req = RerunRequest.parse(body)
    result = await run_in_threadpool(d.rerunner.submit, req, who.name)
    return JSONResponse(result, 202)


@api.get("/api/rerun/{job_id}")
async def api_rerun_job(request: Request, job_id: str) -> Response:
    d = _ctx(request)
    await d.auth.require_viewer(request)
    job = d.rerunner.job(job_id)
    if job is None:
        return JSONResponse({"detail": f"no re-run job {job_id} in this dashboard process"}, 404)
    return JSONResponse(job)


@api.get("/metrics", response_class=PlainTextResponse)
async def prometheus(request: Request) -> Response:
    data = _ctx(request).data

    def load() -> str:
        counts = data.counts()
        reasons = {s: data.reason_counts(status=s) for s in (Status.QUARANTINED.value, Status.ERROR.value)}
        return metrics.render(counts, reasons, data.run_stats())

    return Response(await run_in_threadpool(load), media_type=metrics.CONTENT_TYPE)


def _safe_next(path: str) -> str:
    """Only paths inside this app: never an open redirect to another site."""
    if not path.startswith("/") or path.startswith("//") or "\\" in path or "://" in path:
        return "/"
    return path


def _link(base: str, current: dict[str, Any], changes: dict[str, Any]) -> str:
    params = {**current, **changes}
    query = urlencode({k: v for k, v in params.items() if v not in (None, "")})
    return f"{base}/" + (f"?{query}" if query else "")
