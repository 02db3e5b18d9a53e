from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

import numpy as np
import pytest

if "PYTEST_XDIST_WORKER" in os.environ:  # the workers share the cores: one thread each (and their children)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("MKL_NUM_THREADS", "1")

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
def private_store(tmp_path_factory, name: str):
    """For a module-scoped fixture: a private tracking store (SQLite) as the working directory and
    tracking URI for the block; yields its folder."""
    import mlflow

    tmp = tmp_path_factory.mktemp(name)
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(tmp)
        uri = f"sqlite:///{tmp}/mlflow.db"
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mlflow.set_tracking_uri(uri)
        try:
            yield tmp
        finally:
            mlflow.set_tracking_uri(None)


@contextlib.contextmanager
def module_store(tmp_path_factory, name: str, train_args: list[str]):
    """For a module-scoped fixture: a private tracking store holding one `train` run made with
    `train_args`; yields (store folder, run id)."""
    import train as train_entry

    with private_store(tmp_path_factory, name) as tmp:
        yield tmp, train_entry.main(train_args)


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


def start_mlflow_server(folder: Path, backend_uri: str):
    """A real `mlflow server` on a loopback port with `backend_uri` as its backend store and a
    proxied artifact store in `folder`; returns (process, URL, log file)."""
    import subprocess
    import time
    import urllib.request

    port = free_port()
    log = open(folder / "server.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", backend_uri, "--artifacts-destination", str(folder / "artifacts"),
         "--workers", "1"], stdout=log, stderr=subprocess.STDOUT, cwd=folder,
        env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})  # no job consumers: none is used
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 90
    while True:
        try:
            urllib.request.urlopen(f"{url}/health", timeout=2)
            return proc, url, log
        except Exception:
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                raise RuntimeError("mlflow server did not start: " + (folder / "server.log").read_text()[-2000:])
            time.sleep(0.5)


def stop(proc, log=None) -> None:
    import subprocess

    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
    if log is not None:
        log.close()


@pytest.fixture
def mlflow_server(tmp_path):
    """A real `mlflow server` on a loopback port: SQLite backend, proxied artifact store."""
    proc, url, log = start_mlflow_server(tmp_path, f"sqlite:///{tmp_path}/server.db")
    yield url
    stop(proc, log)


def _postgres_bin(name: str) -> str:
    """A PostgreSQL program: on PATH, or where Debian's `postgresql` package puts it."""
    import shutil

    found = shutil.which(name) or next(iter(sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"), reverse=True)),
                                       None)
    if found is None:
        raise RuntimeError(f"PostgreSQL's {name} is not installed: apt-get install postgresql (.ci/run does).")
    return str(found)


@pytest.fixture(scope="session")
def postgres():
    """A real PostgreSQL server for the session: a fresh cluster in a temporary folder on a loopback
    port, trust authentication, superuser `postgres`. The server refuses to run as root, so as root
    it runs as the `postgres` user that Debian's package creates. Yields a function that creates a
    database and returns its SQLAlchemy URL (psycopg2)."""
    import os
    import pwd
    import shutil
    import subprocess
    import tempfile

    folder = Path(tempfile.mkdtemp(prefix="si-postgres-"))  # under /tmp: pytest's folders are closed to other users
    data, port = folder / "data", free_port()
    as_user: list[str] = []
    if os.getuid() == 0:
        user = pwd.getpwnam("postgres")
        os.chown(folder, user.pw_uid, user.pw_gid)
        as_user = ["runuser", "-u", "postgres", "--"]

    def run(*cmd: str) -> None:
        proc = subprocess.run([*as_user, *cmd], capture_output=True, text=True, cwd=folder)
        if proc.returncode:
            raise RuntimeError(f"{' '.join(cmd)} failed: {proc.stdout[-2000:]} {proc.stderr[-2000:]}")

    run(_postgres_bin("initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8")
    run(_postgres_bin("pg_ctl"), "-D", str(data), "-l", str(folder / "server.log"), "-w", "start", "-o",
        f"-p {port} -k {folder} -c listen_addresses=127.0.0.1 -c max_connections=200")

    def database(name: str) -> str:
        run(_postgres_bin("createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", name)
        return f"postgresql+psycopg2://postgres@127.0.0.1:{port}/{name}"

    try:
        yield database
    finally:
        run(_postgres_bin("pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop")
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def float64():
    """float64 as the default dtype and seed 0, for one test (`pytestmark = usefixtures("float64")`)."""
    import torch

    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    torch.manual_seed(0)
    yield
    torch.set_default_dtype(old)


def folded(stage: str, argv: list[str]) -> list[str]:
    """`argv` with every option that belongs to a block of the stage's configuration (--epochs 3,
    --num_test=20) moved into that block's one flag (--train "epochs=3"), as the entry point takes it."""
    import dataclasses

    from sample_importance.stages import STAGES

    owner = {d.name: f.name for f in dataclasses.fields(STAGES[stage].config) if "block" in f.metadata
             for d in dataclasses.fields(f.metadata["block"])}
    out, blocks, i = [], {}, 0
    while i < len(argv):
        name, eq, value = argv[i][2:].partition("=")
        step = 1 if eq else 2
        value = value if eq else argv[i + 1]
        if name in owner:
            blocks.setdefault(owner[name], []).append(f"{name}={value}")
        else:
            out += argv[i:i + step]
        i += step
    return out + [x for block, parts in blocks.items() for x in (f"--{block}", " ".join(parts))]


def pytest_collection_modifyitems(items):
    """The integration tests first (stable order otherwise): under xdist the long ones start early
    and the short unit tests fill the end, so neither process waits for the other at the end."""
    items.sort(key=lambda item: item.get_closest_marker("integration") is None)
