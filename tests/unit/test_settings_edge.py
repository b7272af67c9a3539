"""Configuration is read once at the edge and passed down; secrets never print."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

from ckpt_stage.config import Settings
from ckpt_stage.storage import S3Storage

PACKAGE = Path(__file__).resolve().parents[2] / "ckpt_stage"

# The edge: the CLI, the app factories (the dashboard, the webhook receiver read settings on first use),
# the local dev stack. DAG files and the bench are outside the package.
EDGE = ("cli", "cli_show", "cli_webhook", "cli/", "dashboard/app.py", "dashboard/webhook.py", "dashboard/data.py",
        "devstack.py", "demo.py", "dev/")


def test_secrets_and_credentials_in_urls_never_print():
    s = Settings(airflow_password="hunter2", airflow_token="tok-123", webhook_secret="whsec", dashboard_token="dash",
                 airflow_url="https://admin:pw@airflow.example:8080/", s3_endpoint_url="http://k:s@minio:9000",
                 mlflow_ui_url="https://mlflow.example/?token=abc")
    text = repr(s)
    for secret in ("hunter2", "tok-123", "whsec", "dash'", "admin:pw", "k:s", "token=abc"):
        assert secret not in text, secret
    assert "airflow.example:8080" in text and "minio:9000" in text and "airflow_password='***'" in text
    assert "webhook_secret=''" in repr(Settings())


def test_the_s3_endpoint_is_a_setting():
    env = {"AWS_ENDPOINT_URL_S3": "http://s3.local:9000", "MLFLOW_S3_ENDPOINT_URL": "http://other:1"}
    assert Settings.from_env(env).s3_endpoint_url == "http://s3.local:9000"
    assert Settings.from_env({"MLFLOW_S3_ENDPOINT_URL": "http://other:1"}).s3_endpoint_url == "http://other:1"
    client = S3Storage(Settings(s3_endpoint_url="http://s3.local:9000")).client
    assert client.meta.endpoint_url == "http://s3.local:9000"


def test_importing_the_registry_leaves_the_environment_alone():
    code = ("import os; before = dict(os.environ); import ckpt_stage.registry; "
            "assert dict(os.environ) == before, set(os.environ) ^ set(before)")
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=60)


def test_settings_are_read_from_the_environment_only_at_the_edge():
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).as_posix()
        if rel == "config.py" or rel.startswith(EDGE):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            # Settings.from_env() with no argument reads os.environ; with an explicit mapping it parses that.
            if (isinstance(node, ast.Call) and not node.args and not node.keywords
                    and isinstance(node.func, ast.Attribute) and node.func.attr == "from_env"
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == "Settings"):
                offenders.append(f"{rel}:{node.lineno}")
    assert offenders == []
