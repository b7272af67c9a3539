"""``ckpt-stage webhook register|serve``: connect MLflow's ``model_version.created`` webhook to the stage.

``register`` creates (or updates, by name) the MLflow webhook with a secret; ``serve`` runs the receiver
alone (inside Airflow it is mounted by the stage's plugin at ``/ckpt-stage-webhook``).
"""

from __future__ import annotations

import json
import sys
from typing import Final

import click

from ckpt_stage.config import PREFIX, Settings

EVENT: Final = "model_version.created"
DEFAULT_NAME = "ckpt-stage"


@click.group()
def webhook() -> None:
    """MLflow webhook → Airflow: register the webhook in MLflow, or serve the receiver."""


@webhook.command()
@click.option("--url", required=True,
              help="Where MLflow posts, e.g. http://airflow-api:8080/ckpt-stage-webhook/mlflow")
@click.option("--secret", default=None, help=f"HMAC secret (default: ${PREFIX}WEBHOOK_SECRET).")
@click.option("--name", default=DEFAULT_NAME, show_default=True, help="Webhook name; an existing one is updated.")
@click.option("--json", "as_json", is_flag=True, help="Print the webhook as JSON on stdout.")
def register(url: str, secret: str | None, name: str, as_json: bool) -> None:
    """Create or update the MLflow webhook for model_version.created (needs MLflow's SQL backend)."""
    from ckpt_stage.cli.commands import _run
    from ckpt_stage.errors import UsageError
    from ckpt_stage.registry import translate

    def body() -> int:
        from mlflow import MlflowClient

        key = secret or Settings.from_env().webhook_secret
        if not key:
            raise UsageError(f"give --secret or set {PREFIX}WEBHOOK_SECRET: the receiver refuses unsigned deliveries")
        client = MlflowClient()
        with translate("registering the MLflow webhook"):
            existing = [w for w in _all_webhooks(client) if w.name == name]
            if existing:
                hook = client.update_webhook(existing[0].webhook_id, url=url, events=[EVENT], secret=key,
                                             status="ACTIVE")
                action = "updated"
            else:
                hook = client.create_webhook(name=name, url=url, events=[EVENT], secret=key,
                                             description="ckpt-stage: validate new model versions")
                action = "created"
        doc = {"action": action, "webhook_id": hook.webhook_id, "name": hook.name, "url": hook.url,
               "events": [str(e) for e in hook.events], "status": str(hook.status)}
        if as_json:
            click.echo(json.dumps(doc, indent=2))
        else:
            click.echo(f"{action} MLflow webhook {hook.name!r} ({hook.webhook_id}) → {hook.url} for {EVENT}")
            # MLflow's server caches each event's webhook list (MLFLOW_WEBHOOK_CACHE_TTL, 60 s by default).
            click.echo("note: the MLflow server may take up to MLFLOW_WEBHOOK_CACHE_TTL seconds (default 60) to "
                       "use it", err=True)
        return 0

    _run(body)


def _all_webhooks(client) -> list:
    out, token = [], None
    while True:
        page = client.list_webhooks(max_results=100, page_token=token)
        out.extend(page)
        token = page.token
        if not token:
            return out


@webhook.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8322, show_default=True, type=int)
def serve(host: str, port: int) -> None:
    """Serve the webhook receiver alone: POST /mlflow (signed by MLflow), GET /health."""
    import uvicorn

    from ckpt_stage.dashboard.webhook import create_webhook_app

    settings = Settings.from_env()
    if not settings.webhook_secret:
        click.echo(f"ckpt-stage: warning: {PREFIX}WEBHOOK_SECRET is not set; every delivery will be refused",
                   err=True)
    from ckpt_stage.airflow_client import AirflowClient

    if not AirflowClient(settings).configured():
        click.echo(f"ckpt-stage: warning: {PREFIX}AIRFLOW_URL and credentials are not set; deliveries will "
                   "fail with 502 and the sweep will find the versions instead", err=True)
    uvicorn.run(create_webhook_app(settings), host=host, port=port, log_level="info")
    sys.exit(0)
