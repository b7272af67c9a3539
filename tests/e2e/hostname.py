"""``[core] hostname_callable`` for the Celery e2e test: each worker names itself (``CKPT_E2E_HOSTNAME``), so a
task instance's ``hostname`` in Airflow's REST API says which worker ran it. Both workers share this machine."""

from __future__ import annotations

import os
import socket


def worker_hostname() -> str:
    return os.environ.get("CKPT_E2E_HOSTNAME") or socket.getfqdn()
