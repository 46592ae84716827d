"""The mining results view: an Airflow 3 plugin (FastAPI app) over each run's results."""
