"""The quarantine dashboard: FastAPI app (``app.create_app``), its JSON API and ``/metrics``, and the
Airflow plugin that mounts it (``plugin.CkptStagePlugin``).

Nothing is imported here on purpose: the webhook receiver and ``ckpt-stage show`` import modules of
this package without paying for FastAPI, Jinja or Airflow.
"""
