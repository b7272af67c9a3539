"""The Airflow 3.3 plugin: apps at the right prefixes, a nav entry Airflow accepts, links under the mount."""

from __future__ import annotations

import pytest
from fastapi import FastAPI

pytestmark = pytest.mark.filterwarnings("ignore:Using `httpx` with `starlette.testclient`")


def test_plugin_mounts_the_dashboard_and_the_webhook_receiver():
    from airflow.api_fastapi.app import RESERVED_URL_PREFIXES

    from ckpt_stage.dashboard.plugin import CkptStagePlugin

    apps = {a["url_prefix"]: a for a in CkptStagePlugin.fastapi_apps}
    assert isinstance(apps["/ckpt-stage"]["app"], FastAPI)
    assert apps["/ckpt-stage"]["app"].state.auth.mode == "airflow"
    try:
        import ckpt_stage.dashboard.webhook  # noqa: F401 - written beside the DAGs; optional here
    except ImportError:
        assert "/ckpt-stage-webhook" not in apps
    else:
        assert "/ckpt-stage-webhook" in apps
    for prefix in apps:
        assert not any(prefix.startswith(p) for p in RESERVED_URL_PREFIXES)
    assert all(a["name"] for a in apps.values())


def test_nav_entry_is_a_valid_external_view():
    from airflow.api_fastapi.core_api.datamodels.plugins import ExternalViewResponse

    from ckpt_stage.dashboard.plugin import CkptStagePlugin

    (view,) = CkptStagePlugin.external_views
    parsed = ExternalViewResponse(**view)
    assert parsed.destination == "nav" and parsed.url_route == "ckpt-stage"
    assert parsed.href == "ckpt-stage/"  # relative: resolved against the UI's <base href>


def test_plugin_is_found_through_the_entry_point():
    from importlib.metadata import entry_points

    (ep,) = [e for e in entry_points(group="airflow.plugins") if e.name == "ckpt_stage"]
    assert ep.value == "ckpt_stage.dashboard.plugin:CkptStagePlugin"


def test_links_follow_the_mount_prefix():
    from fastapi.testclient import TestClient

    from ckpt_stage.config import Settings
    from ckpt_stage.dashboard.app import create_app
    from ckpt_stage.dashboard.auth import CSRF_COOKIE, TokenAuth
    from ckpt_stage.dashboard.data import DashboardData
    from tests.unit.dashboard_fakes import FakeRegistry

    reg = FakeRegistry()
    reg.add("m", 1, "quarantined", ["TIMEOUT"])
    settings = Settings(dashboard_token="t")
    parent = FastAPI()
    parent.mount("/ckpt-stage", create_app(settings, data=DashboardData(settings, reg), auth=TokenAuth("t")))
    c = TestClient(parent)
    home = c.get("/ckpt-stage/")
    assert home.status_code == 200
    assert 'href="/ckpt-stage/static/style.css"' in home.text and 'href="/ckpt-stage/versions/m/1"' in home.text
    assert "path=/ckpt-stage" in home.headers["set-cookie"].lower() and CSRF_COOKIE in home.headers["set-cookie"]
    assert c.get("/ckpt-stage/static/app.js").status_code == 200
    assert c.get("/ckpt-stage/versions/m/1").status_code == 200
    login = c.post("/ckpt-stage/login", data={"token": "t", "next": "/versions/m/1"}, follow_redirects=False)
    assert login.headers["location"] == "/ckpt-stage/versions/m/1"
