-- One PostgreSQL for the compose stack: MLflow's backend store (webhooks need a SQL store) and Airflow's
-- metadata DB, which is also Celery's result backend (db+postgresql+psycopg2://…/airflow).
CREATE DATABASE mlflow;
CREATE DATABASE airflow;
