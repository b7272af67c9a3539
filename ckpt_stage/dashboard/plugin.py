"""Airflow 3.3 plugin: the dashboard and the MLflow webhook receiver inside Airflow's API server.

Registered through the ``airflow.plugins`` entry point (pyproject.toml). Airflow mounts each
``fastapi_apps`` entry on its API server (``airflow.api_fastapi.app.init_plugins``; prefixes under
``/api/v2``, ``/ui``, ``/execution``, ``/auth``, ``/pluginsv2`` are reserved) and shows each
``external_views`` entry with a ``url_route`` as an iframe page of its UI at ``/plugin/<url_route>``.
The ``href`` has no leading slash: the UI resolves it against its ``<base href>``, so the link also
works when Airflow is served under a path (``[api] base_url``).

The dashboard mounted here uses Airflow's login (``create_app(mounted=True)``, see ``auth.py``).
Plugins are imported by every Airflow process (scheduler, workers, DAG processor), so building the
apps must never raise: a failure is logged and that app is left out rather than breaking Airflow.
"""

from __future__ import annotations

import logging
from typing import Any

from airflow.plugins_manager import AirflowPlugin

log = logging.getLogger(__name__)

DASHBOARD_PREFIX = "/ckpt-stage"
WEBHOOK_PREFIX = "/ckpt-stage-webhook"


def _dashboard_app() -> Any:
    try:
        from ckpt_stage.dashboard.app import create_app

        return create_app(mounted=True)
    except Exception:  # noqa: BLE001 - a bad setting must not take Airflow's API server down with it
        log.exception("ckpt-stage dashboard not mounted")
        return None


def _webhook_app() -> Any:
    try:
        from ckpt_stage.dashboard.webhook import create_webhook_app
    except ImportError as exc:
        log.info("ckpt-stage webhook receiver not mounted: %s", exc)
        return None
    try:
        return create_webhook_app()
    except Exception:  # noqa: BLE001 - same reason as above
        log.exception("ckpt-stage webhook receiver not mounted")
        return None


def _fastapi_apps() -> list[dict[str, Any]]:
    apps = []
    dashboard = _dashboard_app()
    if dashboard is not None:
        apps.append({"app": dashboard, "url_prefix": DASHBOARD_PREFIX, "name": "ckpt-stage dashboard"})
    webhook = _webhook_app()
    if webhook is not None:
        apps.append({"app": webhook, "url_prefix": WEBHOOK_PREFIX, "name": "ckpt-stage MLflow webhook receiver"})
    return apps


class CkptStagePlugin(AirflowPlugin):
    name = "ckpt_stage"
    fastapi_apps = _fastapi_apps()
    external_views = [
        {
            "name": "Checkpoints",
            "href": DASHBOARD_PREFIX.lstrip("/") + "/",
            "url_route": "ckpt-stage",
            "destination": "nav",
            "category": "browse",
            "icon": DASHBOARD_PREFIX.lstrip("/") + "/static/icon.svg",
        }
    ]
