"""The dashboard's JSON API, pages, /metrics and re-run against a real MLflow server and S3 API server.

The app is served by uvicorn on a loopback port and spoken to with httpx, as a browser or Prometheus
would. The registry holds promoted, quarantined, error and never-validated versions (dashboard_seed).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator

import httpx
import pytest

from ckpt_stage.config import Settings
from ckpt_stage.dashboard.app import create_app
from ckpt_stage.dashboard.auth import CSRF_COOKIE, CSRF_HEADER, SESSION_COOKIE
from tests.integration.dashboard_seed import Seeded, seed_once, serve, stack_env
from tests.unit.test_dashboard_metrics import parse_prometheus

pytestmark = pytest.mark.integration

TOKEN = "op-token-for-tests"


@pytest.fixture(scope="module")
def seeded(stack, tmp_path_factory) -> Iterator[Seeded]:
    with stack_env(stack, tmp_path_factory.mktemp("dashboard-cache")):
        yield seed_once(stack)


@pytest.fixture(scope="module")
def api(seeded) -> Iterator[httpx.Client]:
    """The dashboard with an operator token configured."""
    with serve(create_app(Settings.from_env().replace(dashboard_token=TOKEN))) as url, \
            httpx.Client(base_url=url, timeout=60) as client:
        yield client


@pytest.fixture(scope="module")
def api_without_token(seeded) -> Iterator[httpx.Client]:
    with serve(create_app(Settings.from_env().replace(dashboard_token=""))) as url, \
            httpx.Client(base_url=url, timeout=60) as client:
        yield client


def _versions(api: httpx.Client, **params) -> dict:
    resp = api.get("/api/versions", params=params)
    assert resp.status_code == 200, resp.text
    return resp.json()


def _pairs(listing: dict) -> list[tuple[str, str, str | None]]:
    return [(r["model"], r["version"], r["status"]) for r in listing["items"]]


def test_list_is_problems_first_and_filters_server_side(api, seeded):
    a, b = seeded.a, seeded.b
    assert _pairs(_versions(api, model=a)) == [(a, "2", "quarantined"), (a, "3", "error"), (a, "1", "promoted")]
    row = _versions(api, model=a)["items"][0]
    assert row["reasons"] == ["SHAPE_MISMATCH"] and row["attempt"] == 2 and row["run_id"]
    assert row["summary"].startswith(f"{a} version 2") and row["age_s"] >= 0

    assert _pairs(_versions(api, reason="SHAPE_MISMATCH", model=a)) == [(a, "2", "quarantined")]
    quarantined_b = _versions(api, status="quarantined", model=b)
    assert {v for _, v, _ in _pairs(quarantined_b)} == {"1", "2", "4"}
    corrupt = [p for p in _pairs(_versions(api, reason="CORRUPT_ARCHIVE")) if p[0] in (a, b)]
    assert corrupt == [(b, "2", "quarantined")]
    # INTEGRITY_MISMATCH shares a version with CORRUPT_ARCHIVE; a LIKE match must not leak others.
    assert [p for p in _pairs(_versions(api, reason="INTEGRITY_MISMATCH")) if p[0] in (a, b)] == [(b, "2", "quarantined")]
    assert _pairs(_versions(api, status="none", model=b)) == [(b, "3", None)]
    assert _pairs(_versions(api, status="error", model=a)) == [(a, "3", "error")]

    counts = api.get("/api/stats/status", params={"model": b}).json()["counts"]
    assert counts["quarantined"] == 3 and counts["none"] == 1 and counts["promoted"] == 0
    assert {a, b} <= set(api.get("/api/models").json()["models"])


def test_pagination(api, seeded):
    first = _versions(api, model=seeded.b, page=1, page_size=3)
    second = _versions(api, model=seeded.b, page=2, page_size=3)
    assert (first["total"], first["pages"], len(first["items"]), len(second["items"])) == (4, 2, 3, 1)
    assert not {r["version"] for r in first["items"]} & {r["version"] for r in second["items"]}
    assert second["items"][0]["status"] is None  # never validated sorts after the problems
    assert api.get("/api/versions", params={"page_size": 0}).status_code == 422
    assert api.get("/api/versions", params={"status": "bogus"}).status_code == 422
    assert api.get("/api/versions", params={"reason": "NOT_A_CODE"}).status_code == 422


def test_version_detail_has_every_attempt_with_its_report_and_drift(api, seeded):
    resp = api.get(f"/api/versions/{seeded.a}/2")
    assert resp.status_code == 200, resp.text
    d = resp.json()
    assert d["state"]["status"] == "quarantined" and d["promoted_version"] == "1"
    assert [x["attempt"] for x in d["attempts"]] == [2, 1]
    assert [x["verdict"] for x in d["attempts"]] == ["quarantine", "error"]
    newest = d["attempts"][0]["report"]
    assert newest["schema"] == "ckpt-stage/report/v1" and newest["attempt"] == 2
    shape = next(f for f in newest["findings"] if f["code"] == "SHAPE_MISMATCH")
    assert shape["hint"].startswith("re-export")
    assert {f["path"]: f["format"] for f in newest["files"]} == {"model.pt": "torch-zip", "MLmodel": "unknown"}
    assert newest["recorded"]["torch"] == "2.12.1" and newest["runtime"]["torch"] == "2.13.0"
    assert newest["timings_s"]["total"] == 2.5 and newest["isolation"]["network_namespace"] is True
    assert d["attempts"][1]["report"]["reasons"][0]["code"] == "STORAGE_UNAVAILABLE"
    drift = d["drift"]
    assert drift["against"] == "1"
    assert [x["name"] for x in drift["added"]] == ["extra.scale"]
    assert {x["name"] for x in drift["changed"]} == {"weight", "bias"}
    assert drift["findings"][0]["detail"]["kind"] == "drift"
    tracking = os.environ["MLFLOW_TRACKING_URI"]
    assert d["links"]["mlflow_version"] == f"{tracking}/#/models/{seeded.a}/versions/2"
    assert d["attempts"][0]["links"]["mlflow_run"].endswith(d["attempts"][0]["run_id"])
    assert api.get(f"/api/versions/{seeded.a}/99").status_code == 404


def test_reason_stats_count_quarantined_versions_per_day(api, seeded):
    stats = api.get("/api/stats/reasons", params={"days": 7, "model": seeded.b}).json()
    assert len(stats["buckets"]) == 7 and stats["buckets"][-1] == time.strftime("%Y-%m-%d", time.gmtime())
    assert stats["totals"]["UNSAFE_PICKLE"] == 1 and stats["totals"]["CORRUPT_ARCHIVE"] == 1
    assert stats["series"]["INTEGRITY_MISMATCH"][-1] == 1
    assert stats["current"]["ARTIFACT_MISSING"] == 1
    assert api.get("/api/stats/reasons", params={"days": 0}).status_code == 422


def test_metrics_parse_and_count_verdicts(api, seeded):
    resp = api.get("/metrics")
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/plain; version=0.0.4")
    m = parse_prometheus(resp.text)
    # The session's registry is shared with other test modules: at least what this module wrote.
    assert m[("ckpt_stage_versions", frozenset({("status", "quarantined")}))] >= 4
    assert m[("ckpt_stage_versions", frozenset({("status", "error")}))] >= 1
    assert m[("ckpt_stage_version_reasons", frozenset({("status", "quarantined"), ("reason", "SHAPE_MISMATCH")}))] >= 1
    count = m[("ckpt_stage_validation_duration_seconds_count", frozenset())]
    assert count >= 7  # 6 recorded by dashboard_seed, 1 real validation
    assert m[("ckpt_stage_validation_duration_seconds_bucket", frozenset({("le", "+Inf")}))] == count
    assert m[("ckpt_stage_validation_duration_seconds_bucket", frozenset({("le", "1")}))] <= count
    assert m[("ckpt_stage_validated_bytes_total", frozenset())] >= 6 * (4096 + 321)
    assert m[("ckpt_stage_validation_attempts_total", frozenset({("verdict", "quarantine")}))] >= 4


def test_rerun_without_a_configured_token_is_disabled(api_without_token, seeded):
    resp = api_without_token.post("/api/rerun", json={"model": seeded.b, "versions": ["4"]},
                                  headers={"Authorization": "Bearer anything"})
    assert resp.status_code == 403
    assert "CKPT_STAGE_DASHBOARD_TOKEN" in resp.json()["detail"]


def test_rerun_needs_the_token(api, seeded):
    body = {"model": seeded.b, "versions": ["4"]}
    anonymous = api.post("/api/rerun", json=body)
    assert anonymous.status_code == 401 and anonymous.headers["www-authenticate"].startswith("Bearer")
    wrong = api.post("/api/rerun", json=body, headers={"Authorization": "Bearer not-the-token"})
    assert wrong.status_code == 403
    # A signed-in browser session still needs the CSRF header (double submit).
    # Module-level httpx calls: the shared client must not keep the session cookie for later tests.
    login = httpx.post(f"{api.base_url}/login", data={"token": TOKEN, "next": "/"}, follow_redirects=False)
    assert login.status_code == 303 and SESSION_COOKIE in login.cookies
    cookies = {SESSION_COOKIE: login.cookies[SESSION_COOKIE], CSRF_COOKIE: "csrf-value"}
    no_csrf = httpx.post(f"{api.base_url}/api/rerun", json=body, cookies=cookies)
    assert no_csrf.status_code == 403 and CSRF_HEADER in no_csrf.json()["detail"]
    bad_body = httpx.post(f"{api.base_url}/api/rerun", json={"model": seeded.b}, cookies=cookies,
                          headers={CSRF_HEADER: "csrf-value"})
    assert bad_body.status_code == 422  # authenticated and CSRF-checked; only the body is wrong
    assert httpx.post(f"{api.base_url}/login", data={"token": "nope"}).status_code == 403


def _wait_for_job(api: httpx.Client, job_id: str, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = api.get(f"/api/rerun/{job_id}").json()
        if job["state"] in ("done", "failed"):
            return job
        time.sleep(0.3)
    raise AssertionError(f"re-run job {job_id} did not finish: {job}")


def test_rerun_with_the_token_records_a_new_attempt(api, seeded):
    auth = {"Authorization": f"Bearer {TOKEN}"}
    before = api.get(f"/api/versions/{seeded.b}/4").json()
    assert before["state"]["reasons"] == ["ARTIFACT_MISSING"]
    n = before["state"]["attempt"]

    started = time.monotonic()
    resp = api.post("/api/rerun", json={"model": seeded.b, "versions": ["4"]}, headers=auth)
    assert resp.status_code == 202, resp.text
    assert time.monotonic() - started < 5  # answers before the validation finishes
    job = resp.json()
    assert job["mode"] == "in-process" and job["versions"] == [{"name": seeded.b, "version": "4"}]
    done = _wait_for_job(api, job["job_id"])
    assert done["state"] == "done" and done["results"][0]["verdict"] == "quarantine", done
    after = api.get(f"/api/versions/{seeded.b}/4").json()
    assert after["state"]["attempt"] == n + 1
    assert [x["attempt"] for x in after["attempts"]][:2] == [n + 1, n]
    assert after["attempts"][0]["report"]["reasons"][0]["code"] == "ARTIFACT_MISSING"

    # The filtered list's button: every quarantined version of the model with this reason.
    resp = api.post("/api/rerun", json={"status": "quarantined", "reason": "ARTIFACT_MISSING", "model": seeded.b},
                    headers=auth)
    assert resp.status_code == 202, resp.text
    assert resp.json()["versions"] == [{"name": seeded.b, "version": "4"}]
    assert _wait_for_job(api, resp.json()["job_id"])["state"] == "done"
    assert api.get(f"/api/versions/{seeded.b}/4").json()["state"]["attempt"] == n + 2
    nothing = api.post("/api/rerun", json={"status": "quarantined", "reason": "TIMEOUT", "model": seeded.b},
                       headers=auth)
    assert nothing.status_code == 404


def test_the_alias_holder_and_a_skipped_version(api, api_without_token, seeded):
    """The list marks the version that holds @validated (MLflow's version search returns no aliases); a
    skipped version reads as not validated; a read-only dashboard offers no re-run button."""
    c = seeded.c
    rows = {r["version"]: r for r in _versions(api, model=c)["items"]}
    assert rows["1"]["holds_alias"] and rows["1"]["aliases"] == ["validated"]
    assert rows["2"]["status"] == "skipped" and not rows["2"]["holds_alias"] and rows["2"]["aliases"] == []
    assert rows["2"]["summary"].startswith("Not validated: sklearn flavor")
    assert api.get("/api/stats/status", params={"model": c}).json()["counts"]["skipped"] == 1
    home = api.get("/", params={"model": c}).text
    assert 'class="alias holds"' in home and "Skipped" in home
    page = api.get(f"/versions/{c}/2").text
    assert 'id="skipped-note"' in page and 'id="holds-alias"' not in page and 'id="rerun-version"' in page
    assert 'id="holds-alias"' in api.get(f"/versions/{c}/1").text
    # Read-only: no button that would only answer 403.
    for html in (api_without_token.get("/").text, api_without_token.get(f"/versions/{c}/2").text):
        assert "data-rerun" not in html and 'id="readonly-note"' in html
    skipped_rerun = api.post("/api/rerun", json={"status": "skipped", "model": c}, headers={"Authorization": "Bearer x"})
    assert skipped_rerun.status_code == 403  # wrong token: refused, but the status itself is accepted
    assert api.post("/api/rerun", json={"status": "pending"}).status_code in (401, 422)


def test_pages_render(api, seeded):
    home = api.get("/", params={"model": seeded.a})
    assert home.status_code == 200 and home.headers["content-type"].startswith("text/html")
    assert f"/versions/{seeded.a}/2" in home.text and "<svg" in home.text and "SHAPE_MISMATCH" in home.text
    # The page issues a CSRF cookie unless the client already holds one (an earlier test's page view).
    assert CSRF_COOKIE in home.cookies or CSRF_COOKIE in api.cookies
    page = api.get(f"/versions/{seeded.a}/2")
    assert page.status_code == 200
    for text in ("Attempt 2", "Attempt 1", "re-export from the declared architecture", "extra.scale",
                 "2.12.1", "network namespace", "torch-zip"):
        assert text in page.text, text
    assert api.get(f"/versions/{seeded.a}/99").status_code == 404
    assert api.get("/", params={"reason": "NOPE"}).status_code == 422
    assert api.get("/static/style.css").status_code == 200


def _cli(*args: str):
    """The command in-process (CliRunner keeps stdout and stderr apart); wide, as on a terminal."""
    from click.testing import CliRunner

    from ckpt_stage.cli import main

    return CliRunner(env={"COLUMNS": "200"}).invoke(main, list(args), catch_exceptions=False)


def test_show_and_ls_in_the_terminal(api, seeded):
    result = _cli("show", "--model", seeded.a, "--version", "2", "--json")
    assert result.exit_code == 0, result.stderr[-2000:]
    shown = json.loads(result.stdout)
    served = api.get(f"/api/versions/{seeded.a}/2").json()
    assert [x["run_id"] for x in shown["attempts"]] == [x["run_id"] for x in served["attempts"]]
    assert shown["drift"]["against"] == "1"

    result = _cli("show", "--model", seeded.a, "--version", "2")
    assert result.exit_code == 0, result.stderr[-2000:]
    for text in ("quarantined", "SHAPE_MISMATCH", "re-export", "model.pt", "extra.scale", "Attempts"):
        assert text in result.stdout, text
    missing = _cli("show", "--model", seeded.a, "--version", "99")
    assert missing.exit_code == 2 and "no version 99" in missing.stderr

    result = _cli("ls", "--model", seeded.a)
    assert result.exit_code == 0, result.stderr[-2000:]
    for text in ("quarantined", "SHAPE_MISMATCH", "promoted", "3 versions"):
        assert text in result.stdout, text
    rows = json.loads(_cli("ls", "--model", seeded.a, "--status", "error", "--json").stdout)
    assert [(r["version"], r["reasons"]) for r in rows] == [("3", ["STORAGE_UNAVAILABLE"])]


_MOUNTED = r'''
import json
from fastapi.testclient import TestClient
from airflow.api_fastapi.app import create_app

client = TestClient(create_app())
out = {"anonymous": client.get("/ckpt-stage/api/versions").status_code}
tokens = {u: client.post("/auth/token", json={"username": u, "password": u + "-pw"}).json()["access_token"]
          for u in ("admin", "viewer")}
bearer = lambda u: {"Authorization": "Bearer " + tokens[u]}
out["whoami"] = client.get("/ckpt-stage/api/whoami", headers=bearer("admin")).json()
out["viewer_rerun"] = client.post("/ckpt-stage/api/rerun", json={"model": "m", "versions": ["1"]},
                                  headers=bearer("viewer")).status_code
out["admin_rerun_bad_body"] = client.post("/ckpt-stage/api/rerun", json={}, headers=bearer("admin")).status_code
client.cookies.set("_token", tokens["admin"])
out["cookie_user"] = client.get("/ckpt-stage/api/whoami").json()["user"]
out["cookie_rerun_without_csrf"] = client.post("/ckpt-stage/api/rerun", json={}).status_code
plugins = client.get("/api/v2/plugins", headers=bearer("admin")).json()["plugins"]
mine = next(p for p in plugins if p["name"] == "ckpt_stage")
out["prefixes"] = [a["url_prefix"] for a in mine["fastapi_apps"]]
out["views"] = [(v["url_route"], v["href"], v["destination"]) for v in mine["external_views"]]
print("RESULT " + json.dumps(out))  # Airflow logs to stdout too
'''


def test_mounted_in_airflow_uses_airflow_login(tmp_path):
    """The plugin inside Airflow 3.3's real API server app, with the simple auth manager's JWTs."""
    home = tmp_path / "airflow"
    (home / "dags").mkdir(parents=True)
    (home / "passwords.json").write_text(json.dumps({"admin": "admin-pw", "viewer": "viewer-pw"}))
    env = {
        **os.environ, "AIRFLOW_HOME": str(home), "AIRFLOW__CORE__LOAD_EXAMPLES": "false",
        "AIRFLOW__CORE__DAGS_FOLDER": str(home / "dags"),
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home / 'airflow.db'}",
        "AIRFLOW__CORE__AUTH_MANAGER": "airflow.api_fastapi.auth.managers.simple.simple_auth_manager.SimpleAuthManager",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": "admin:admin,viewer:viewer",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(home / "passwords.json"),
        "AIRFLOW__API_AUTH__JWT_SECRET": "dashboard-test-jwt-secret-0123456789",
        "MLFLOW_TRACKING_URI": "http://127.0.0.1:9",  # nothing here reads MLflow
    }
    bin_dir = os.path.dirname(sys.executable)
    migrate = subprocess.run([os.path.join(bin_dir, "airflow"), "db", "migrate"], env=env, capture_output=True,
                             text=True, timeout=300)
    assert migrate.returncode == 0, migrate.stderr[-3000:]
    proc = subprocess.run([sys.executable, "-c", _MOUNTED], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(next(line[7:] for line in proc.stdout.splitlines() if line.startswith("RESULT ")))
    assert out["anonymous"] == 401
    assert out["whoami"]["auth"] == "airflow" and out["whoami"]["user"] == "admin"
    assert out["viewer_rerun"] == 403  # the simple auth manager's viewer role may not trigger DAG runs
    assert out["admin_rerun_bad_body"] == 422  # authenticated and authorized; only the body is wrong
    assert out["cookie_user"] == "admin"
    assert out["cookie_rerun_without_csrf"] == 403
    assert out["prefixes"] == ["/ckpt-stage", "/ckpt-stage-webhook"]
    assert out["views"] == [["ckpt-stage", "ckpt-stage/", "nav"]]
