"""pipelines: the Ray stages, the workflow and the `cdm` command line."""
