"""Who may re-run: the standalone operator token (bearer or session + CSRF) and Airflow's login when mounted.

The app runs over an in-memory registry; re-runs go to a recording stand-in for the pipeline.
"""

from __future__ import annotations

import threading

import jwt
import pytest

from ckpt_stage.config import Settings
from ckpt_stage.dashboard.app import _safe_next, create_app
from ckpt_stage.dashboard.auth import CSRF_COOKIE, CSRF_HEADER, SESSION_COOKIE, AirflowAuth, TokenAuth
from ckpt_stage.dashboard.data import DashboardData
from ckpt_stage.dashboard.rerun import Rerunner
from tests.unit.dashboard_fakes import FakeRegistry

# Starlette 1.x deprecates httpx under TestClient (it wants httpx2, not installed here).
pytestmark = pytest.mark.filterwarnings("ignore:Using `httpx` with `starlette.testclient`")
TOKEN = "s3cret-operator-token"
BODY = {"model": "m", "versions": ["2"]}


class Recorder:
    """Stands in for ``pipeline.validate_version_safely``: records calls, returns no report."""

    def __init__(self) -> None:
        self.calls: list = []
        self.done = threading.Event()

    def __call__(self, ref, **kwargs):
        self.calls.append((ref, kwargs.get("force")))
        self.done.set()
        return type("Outcome", (), {"report": None, "run_id": None, "skipped": ""})()


def client_for(settings: Settings, *, auth=None, recorder: Recorder | None = None):
    from fastapi.testclient import TestClient

    reg = FakeRegistry()
    reg.add("m", 1, "promoted")
    reg.add("m", 2, "quarantined", ["SHAPE_MISMATCH"])
    data = DashboardData(settings, reg)
    rerunner = Rerunner(settings, data, validate=recorder or Recorder())
    return TestClient(create_app(settings, data=data, auth=auth, rerunner=rerunner))


# -- standalone ------------------------------------------------------------------------------------
def test_reads_are_open_and_rerun_needs_the_token():
    rec = Recorder()
    c = client_for(Settings(dashboard_token=TOKEN), recorder=rec)
    assert c.get("/").status_code == 200 and c.get("/api/versions").status_code == 200
    r = c.post("/api/rerun", json=BODY)
    assert r.status_code == 401 and r.headers["www-authenticate"] == 'Bearer realm="ckpt-stage"'
    assert c.post("/api/rerun", json=BODY, headers={"Authorization": "Basic x"}).status_code == 401
    assert c.post("/api/rerun", json=BODY, headers={"Authorization": "Bearer wrong"}).status_code == 403
    ok = c.post("/api/rerun", json=BODY, headers={"Authorization": f"Bearer {TOKEN}"})
    assert ok.status_code == 202, ok.text
    assert ok.json()["mode"] == "in-process" and ok.json()["versions"] == [{"name": "m", "version": "2"}]
    assert rec.done.wait(5)
    assert [(str(ref), force) for ref, force in rec.calls] == [("m/2", True)]


def test_no_configured_token_disables_rerun_and_says_which_variable():
    c = client_for(Settings(dashboard_token=""))
    for headers in ({}, {"Authorization": f"Bearer {TOKEN}"}):
        r = c.post("/api/rerun", json=BODY, headers=headers)
        assert r.status_code == 403 and "CKPT_STAGE_DASHBOARD_TOKEN" in r.json()["detail"]
    assert "read-only" in c.get("/").text
    assert c.post("/login", data={"token": "x"}).status_code == 403
    assert c.get("/api/whoami").json()["rerun_enabled"] is False


def test_login_sets_a_session_that_still_needs_the_csrf_header():
    c = client_for(Settings(dashboard_token=TOKEN))
    bad = c.post("/login", data={"token": "nope", "next": "/versions/m/2"})
    assert bad.status_code == 403 and "does not match" in bad.text
    login = c.post("/login", data={"token": TOKEN, "next": "/versions/m/2"}, follow_redirects=False)
    assert login.status_code == 303 and login.headers["location"] == "/versions/m/2"
    assert SESSION_COOKIE in login.cookies
    set_cookie = login.headers["set-cookie"].lower()
    assert "httponly" in set_cookie and "samesite=strict" in set_cookie and TOKEN.lower() not in set_cookie
    assert c.get("/api/whoami").json()["via"] == "session"
    # Replace the CSRF cookie the page issued: two cookies of one name would go out in an order that
    # depends on the HTTP client (httpx and httpx2 differ).
    c.cookies.delete(CSRF_COOKIE)
    c.cookies.set(CSRF_COOKIE, "abc")
    assert c.post("/api/rerun", json=BODY).status_code == 403
    assert c.post("/api/rerun", json=BODY, headers={CSRF_HEADER: "other"}).status_code == 403
    assert c.post("/api/rerun", json=BODY, headers={CSRF_HEADER: "abc"}).status_code == 202
    # JSON only: a cross-site form post cannot produce it without a CORS preflight.
    form = c.post("/api/rerun", data={"model": "m"}, headers={CSRF_HEADER: "abc"})
    assert form.status_code == 415
    c.post("/logout")
    assert c.post("/api/rerun", json=BODY, headers={CSRF_HEADER: "abc"}).status_code == 401


def test_pages_set_the_csrf_cookie_they_embed():
    c = client_for(Settings(dashboard_token=TOKEN))
    r = c.get("/")
    token = r.cookies[CSRF_COOKIE]
    assert f'<meta name="ckpt-csrf" content="{token}">' in r.text
    assert "samesite=strict" in r.headers["set-cookie"].lower()
    assert c.get("/").headers.get("set-cookie") is None  # kept once set


def test_sessions_expire_and_die_with_a_new_token():
    now = [1_000_000.0]
    auth = TokenAuth(TOKEN, max_age_s=3600, clock=lambda: now[0])
    value = auth.session_value()
    assert auth.session_ok(value)
    now[0] += 3601
    assert not auth.session_ok(value)
    assert not TokenAuth("another-token").session_ok(value)
    assert not auth.session_ok("garbage") and not auth.session_ok("1.2")


@pytest.mark.parametrize(("given", "expected"), [
    ("/versions/m/2", "/versions/m/2"), ("//evil.example/x", "/"), ("https://evil.example", "/"),
    ("versions", "/"), ("/\\evil", "/"), ("/?status=quarantined", "/?status=quarantined"),
])
def test_login_redirects_only_inside_the_app(given, expected):
    assert _safe_next(given) == expected


def test_rerun_body_is_validated():
    c = client_for(Settings(dashboard_token=TOKEN))
    auth = {"Authorization": f"Bearer {TOKEN}"}
    for body in ({}, {"versions": ["1"]}, {"model": "m", "versions": []}, {"status": "validating"},
                 {"status": "quarantined", "reason": "NOT_A_CODE"}, {"model": "m", "versions": ["1"],
                                                                      "status": "quarantined"}, [1]):
        assert c.post("/api/rerun", json=body, headers=auth).status_code == 422, body
    assert c.post("/api/rerun", content=b"{", headers={**auth, "Content-Type": "application/json"}).status_code == 422
    assert c.post("/api/rerun", json={"status": "error"}, headers=auth).status_code == 404  # nothing matches


# -- mounted in Airflow ----------------------------------------------------------------------------
class FakeUser:
    def __init__(self, name: str) -> None:
        self.name = name

    def get_name(self) -> str:
        return self.name


class FakeAuthManager:
    """Airflow's auth manager surface the plugin uses: JWT → user, and DAG permissions."""

    def __init__(self, allowed: set[str]) -> None:
        self.allowed = allowed
        self.checks: list = []

    async def get_user_from_token(self, token: str):
        if token == "expired":
            raise jwt.ExpiredSignatureError("expired")
        if not token.startswith("jwt-"):
            raise jwt.InvalidTokenError("bad")
        return FakeUser(token[4:])

    def is_authorized_dag(self, *, method, user, access_entity=None, details=None) -> bool:
        self.checks.append((method, access_entity.value, details.id, user.name))
        return user.name in self.allowed

    def get_url_login(self, **kwargs) -> str:
        return "/auth/login"


def airflow_client(am: FakeAuthManager, recorder: Recorder | None = None):
    return client_for(Settings(), auth=AirflowAuth(lambda: am), recorder=recorder)


def test_mounted_pages_need_an_airflow_login():
    c = airflow_client(FakeAuthManager(set()))
    page = c.get("/")
    assert page.status_code == 401 and "/auth/login" in page.text
    api = c.get("/api/versions")
    assert api.status_code == 401 and api.json()["login_url"] == "/auth/login"
    c.cookies.set("_token", "jwt-ann")
    assert c.get("/").status_code == 200 and "ann" in c.get("/").text
    c.cookies.set("_token", "expired")
    assert c.get("/api/versions").status_code == 401
    c.cookies.set("_token", "forged")
    assert c.get("/api/versions").status_code == 403
    assert c.get("/login", follow_redirects=False).headers["location"] == "/auth/login"


def test_mounted_rerun_needs_permission_to_trigger_the_rerun_dag():
    rec = Recorder()
    am = FakeAuthManager({"ops"})
    c = airflow_client(am, rec)
    assert c.post("/api/rerun", json=BODY).status_code == 401
    denied = c.post("/api/rerun", json=BODY, headers={"Authorization": "Bearer jwt-viewer"})
    assert denied.status_code == 403 and "ckpt_stage_rerun" in denied.json()["detail"]
    assert am.checks[-1] == ("POST", "RUN", "ckpt_stage_rerun", "viewer")
    assert c.post("/api/rerun", json=BODY, headers={"Authorization": "Bearer jwt-ops"}).status_code == 202
    assert rec.done.wait(5)
    # Airflow's own cookie is ambient, so it needs the CSRF header too.
    c.cookies.set("_token", "jwt-ops")
    assert c.post("/api/rerun", json=BODY).status_code == 403
    c.cookies.set(CSRF_COOKIE, "k")
    assert c.post("/api/rerun", json=BODY, headers={CSRF_HEADER: "k"}).status_code == 202


def test_a_read_only_dashboard_shows_no_rerun_buttons():
    """No operator token: every re-run would answer 403, so no page offers one (the pages say why)."""
    ro = client_for(Settings(dashboard_token=""))
    home, page = ro.get("/"), ro.get("/versions/m/2")
    assert home.status_code == page.status_code == 200
    for html in (home.text, page.text):
        assert "data-rerun" not in html and "Re-run" not in html.replace("re-runs are off", "")
    assert 'id="readonly-note"' in page.text and "CKPT_STAGE_DASHBOARD_TOKEN" in page.text
    rw = client_for(Settings(dashboard_token=TOKEN))
    assert 'id="rerun-version"' in rw.get("/versions/m/2").text
    assert 'id="rerun-filtered"' in rw.get("/").text
