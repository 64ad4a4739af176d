"""Training on Ray Train: the config, one step, the per-worker loop, validation, the run folder and the trainer."""
