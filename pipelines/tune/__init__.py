"""Ray Tune sweeps of training runs: the sweep file, one trial, MLflow tracking, the results, the best trial."""
