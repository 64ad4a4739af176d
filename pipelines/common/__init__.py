"""What every stage shares: errors, typed configs, storage, MLflow tracking, the Ray session, trained models."""
