"""Running on a Ray cluster from here: job submission through the Jobs API, and the MLflow UI server."""
