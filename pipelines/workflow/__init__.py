"""`cdm run`: the whole pipeline as content-addressed, resumable stages under one MLflow parent run."""
