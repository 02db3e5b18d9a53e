from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "entry_points"))  # the entry points import their `_cli` helper
sys.path.insert(0, str(REPO / "src"))  # this checkout's library, whatever is installed


@pytest.fixture
def tracking(tmp_path, monkeypatch):
    """A private MLflow tracking store (SQLite + ./mlruns) in a temporary working directory."""
    import mlflow

    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    yield tmp_path
    while mlflow.active_run():
        mlflow.end_run()
    mlflow.set_tracking_uri(None)


def tiny_dataset(n: int = 42, d: int = 12, classes: int = 4, m: int = 10, seed: int = 0):
    from sample_importance.data import Dataset

    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n + m, d)).astype(np.float32)
    y = rng.integers(0, classes, size=n + m).astype(np.int64)
    return Dataset("tiny", x[:n], y[:n], x[n:], y[n:], (1, 1, d), num_classes=classes)


def all_runs(tracking_dir):
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    return [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]
