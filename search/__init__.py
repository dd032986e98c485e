"""The search driver: Ray Tune + Optuna TPE + ASHA, tracked in MLflow."""
