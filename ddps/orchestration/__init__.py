"""Orchestration: Ray Train around the engine's loops, the pipeline of steps, MLflow tracking.

Thin by design: the per-worker functions call the engine's plain loops; ``tracking`` is the only module
that imports mlflow.
"""
