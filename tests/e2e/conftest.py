"""End-to-end tests run a real Airflow (``tests/e2e/cluster.py``); select them with ``-m e2e``."""


def pytest_configure(config):
    config.addinivalue_line("markers", "e2e: runs a real Airflow (scheduler, DAG processor, API server, triggerer)")
