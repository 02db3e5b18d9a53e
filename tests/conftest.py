from __future__ import annotations

import contextlib
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


@contextlib.contextmanager
def module_store(tmp_path_factory, name: str, train_args: list[str]):
    """For a module-scoped fixture: a private tracking store holding one `train` run made with
    `train_args`; yields (store folder, run id)."""
    import mlflow
    import train as train_entry

    tmp = tmp_path_factory.mktemp(name)
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(tmp)
        uri = f"sqlite:///{tmp}/mlflow.db"
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mlflow.set_tracking_uri(uri)
        yield tmp, train_entry.main(train_args)
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


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def mlflow_server(tmp_path):
    """A real `mlflow server` on a loopback port: SQLite backend, proxied artifact store."""
    import subprocess
    import time
    import urllib.request

    port = free_port()
    log = open(tmp_path / "server.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{tmp_path}/server.db", "--artifacts-destination", str(tmp_path / "artifacts"),
         "--workers", "1"], stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 90
    while True:
        try:
            urllib.request.urlopen(f"{url}/health", timeout=2)
            break
        except Exception:
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                raise RuntimeError("mlflow server did not start: " + (tmp_path / "server.log").read_text()[-2000:])
            time.sleep(0.5)
    yield url
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()
