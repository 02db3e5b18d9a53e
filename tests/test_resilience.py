"""Nothing lost: resume after kill -9, integrity checks, divergence, a real tracking server."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.parse
import urllib.request

import mlflow
import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from conftest import REPO, all_runs, folded
from sample_importance import load_dynamics
from sample_importance.dynamics import DynamicsError

pytestmark = pytest.mark.integration  # real processes, stores, servers or trained runs

ARGS = ["--epochs", "25", "--width", "128", "--batch_size", "50", "--subset", "1000", "--device", "cpu"]
TIMING = {"epoch_seconds", "samples_per_second", "eval_seconds"}  # wall-clock: the only numbers allowed to differ


def _train(store, *args, mlflow_run=False):
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{store}/mlflow.db", "PYTHONUNBUFFERED": "1"}
    if mlflow_run:
        params = [x for a, v in zip(args[::2], args[1::2]) for x in ("-P", f"{a[2:]}={v}")]
        cmd = [sys.executable, "-m", "mlflow", "run", str(REPO), "-e", "train", "--env-manager", "local", *params]
    else:
        cmd = [sys.executable, str(REPO / "entry_points" / "train.py"), *args]
    # A session of its own, so that a kill reaches `mlflow run` and the training process it started.
    return subprocess.Popen(cmd, cwd=store, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def _kill_during_epoch(proc, epoch: int) -> str:
    """SIGKILL the process group while it trains the epoch after `epoch` (its progress line is out)."""
    lines = []
    deadline = time.time() + 300
    for line in proc.stdout:
        lines.append(line)
        if line.startswith(f"epoch {epoch:3d}/"):
            time.sleep(0.05)  # into the next epoch
            os.killpg(proc.pid, signal.SIGKILL)
            break
        assert time.time() < deadline
    proc.wait()
    return "".join(lines)


def _compare_runs(a: str, store_a, b: str, store_b):
    """Every dynamics array and every metric (but wall-clock timings) identical."""
    def read(run_id, store):
        mlflow.set_tracking_uri(f"sqlite:///{store}/mlflow.db")
        client = MlflowClient()
        run = client.get_run(run_id)
        d = load_dynamics(run_id)
        arrays = {k: np.array(getattr(d, k)) for k in ("importance", "loss", "p_true", "correct", "batch_order",
                                                       "param_projection", "final_loss", "label", "sample_id",
                                                       "eval_loss", "eval_p_true", "eval_correct", "eval_error_l2",
                                                       "eval_grad_norm")}
        metrics = {k: [(m.step, m.value) for m in sorted(client.get_metric_history(run_id, k), key=lambda m: m.step)]
                   for k in run.data.metrics if k not in TIMING}
        return run, arrays, metrics

    run_a, arrays_a, metrics_a = read(a, store_a)
    run_b, arrays_b, metrics_b = read(b, store_b)
    assert run_a.data.params == run_b.data.params
    for k in arrays_a:
        np.testing.assert_array_equal(arrays_a[k], arrays_b[k], err_msg=k)  # NaN (GraNd's other epochs) = NaN
    assert metrics_a == metrics_b
    return run_a, run_b


def test_kill_9_mid_epoch_then_rerun_resumes_the_same_run_bit_identically(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    whole = _train(tmp_path / "a", *ARGS)
    out = whole.communicate(timeout=600)[0]
    assert whole.returncode == 0, out
    reference_id = out.strip().splitlines()[-1].split()[2]

    first = _train(tmp_path / "b", *ARGS)
    _kill_during_epoch(first, 7)
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'b'}/mlflow.db")
    try:
        [killed] = all_runs(tmp_path / "b")
        assert killed.info.status == "RUNNING"  # what kill -9 leaves behind
        partial = load_dynamics(killed.info.run_id, allow_partial=True)
        assert 7 <= partial.metadata["epochs_completed"] < 25  # the finished epochs are readable
        again = _train(tmp_path / "b", *ARGS)
        out = again.communicate(timeout=600)[0]
        assert again.returncode == 0, out
        assert f"resuming run {killed.info.run_id} after epoch" in out
        runs = all_runs(tmp_path / "b")
        assert [r.info.run_id for r in runs] == [killed.info.run_id]  # the same run, finished
        assert runs[0].info.status == "FINISHED" and "sample_importance.failure" not in runs[0].data.tags
        _compare_runs(killed.info.run_id, tmp_path / "b", reference_id, tmp_path / "a")
    finally:
        mlflow.set_tracking_uri(None)


def test_mlflow_run_again_resumes_and_points_to_the_resumed_run(tmp_path):
    first = _train(tmp_path, *ARGS, mlflow_run=True)
    _kill_during_epoch(first, 3)  # kills `mlflow run` and its training process
    time.sleep(0.5)
    again = _train(tmp_path, *ARGS, mlflow_run=True)
    out = again.communicate(timeout=600)[0]
    assert again.returncode == 0, out
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    try:
        runs = sorted(all_runs(tmp_path), key=lambda r: r.info.start_time)
        assert len(runs) == 2
        resumed, pointer = runs
        assert resumed.info.status == "FINISHED" and load_dynamics(resumed.info.run_id).metadata["complete"]
        assert pointer.data.tags["sample_importance.resumed_run_id"] == resumed.info.run_id
    finally:
        mlflow.set_tracking_uri(None)


def test_a_damaged_file_is_named(tracking):
    import train as train_entry

    run_id = train_entry.main(["--subset", "100", "--epochs", "2", "--width", "8", "--batch_size", "50"])
    d = load_dynamics(run_id)
    path = d.folder / "loss.npy"
    raw = bytearray(path.read_bytes())
    raw[-3] ^= 0xFF  # flip one byte of the last row
    path.write_bytes(bytes(raw))
    with pytest.raises(DynamicsError, match=r"loss\.npy is damaged: row 1 does not match the checksum"):
        load_dynamics(run_id)
    (d.folder / "label.npy").write_bytes(b"not a numpy file")
    with pytest.raises(DynamicsError, match=r"label\.npy is damaged"):
        load_dynamics(run_id)


def test_divergence_fails_the_run_with_where_and_keeps_earlier_epochs(tracking, capsys):
    import train as train_entry
    from _cli import run_cli

    # Logistic regression whose weight decay step overshoots (lr * weight_decay = 100): the weights
    # grow a hundredfold per step and overflow during epoch 4.
    args = ["--depth", "0", "--lr", "1000", "--weight_decay", "0.1", "--subset", "300", "--batch_size", "50",
            "--epochs", "40"]
    with pytest.raises(SystemExit) as info:
        run_cli(lambda: train_entry.main(args))
    assert info.value.code == 2
    err = [l for l in capsys.readouterr().err.splitlines() if l.startswith("error: ")]
    assert err == ["error: Training diverged: the loss became nan at epoch 4, step 2; lower lr (it is too large "
                   "for this model and data)."]
    [run] = all_runs(tracking)
    assert run.info.status == "FAILED"
    assert run.data.tags["sample_importance.diverged"] == "epoch 4, step 2"
    d = load_dynamics(run.info.run_id, allow_partial=True)
    assert d.metadata["epochs_completed"] == 3 and d.loss.shape == (3, 300) and np.isfinite(d.loss).all()
    with pytest.raises(DynamicsError, match="unfinished run"):
        load_dynamics(run.info.run_id)


def _rest(base, endpoint, **query):
    url = f"{base}/api/2.0/mlflow/{endpoint}" + ("?" + urllib.parse.urlencode(query) if query else "")
    with urllib.request.urlopen(url, timeout=30) as r:
        return json.loads(r.read())


def test_train_analysis_and_registry_through_a_real_server(tmp_path, mlflow_server):
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_server}
    tiny = ["--subset", "100", "--epochs", "2", "--width", "8", "--batch_size", "50"]

    def run(entry, *args):
        proc = subprocess.run([sys.executable, str(REPO / "entry_points" / f"{entry}.py"), *folded(entry, [*tiny, *args])],
                              cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
        return proc.stdout

    train_id = run("train").strip().splitlines()[-1].split()[2]
    run("decompose", "--train_run_ids", train_id)
    run("ordering", "--methods", "shuffle,nlo", "--num_seeds", "1")

    got = _rest(mlflow_server, "runs/get", run_id=train_id)["run"]
    assert got["info"]["status"] == "FINISHED" and got["info"]["artifact_uri"].startswith("mlflow-artifacts:")
    history = _rest(mlflow_server, "metrics/get-history", run_id=train_id, metric_key="test_error")["metrics"]
    assert sorted(m["step"] for m in history) == [1, 2]
    files = {f["path"] for f in _rest(mlflow_server, "artifacts/list", run_id=train_id, path="dynamics")["files"]}
    assert {"dynamics/importance.npy", "dynamics/metadata.json", "dynamics/init_state.pt"} <= files
    exps = _rest(mlflow_server, "experiments/search", max_results=10)["experiments"]
    found = json.loads(urllib.request.urlopen(urllib.request.Request(
        f"{mlflow_server}/api/2.0/mlflow/runs/search", method="POST", headers={"Content-Type": "application/json"},
        data=json.dumps({"experiment_ids": [e["experiment_id"] for e in exps], "max_results": 100}).encode()),
        timeout=30).read())["runs"]
    kinds = sorted(r["data"]["tags"] and {t["key"]: t["value"] for t in r["data"]["tags"]}.get(
        "sample_importance.entry_point") for r in found)
    assert kinds == ["decompose", "ordering", "train", "train"]
    assert all(r["info"]["status"] == "FINISHED" for r in found)
    model = _rest(mlflow_server, "registered-models/get", name="ordering-digits")["registered_model"]
    assert {a["alias"] for a in model["aliases"]} == {"shuffle", "nlo", "champion"}
    # and the analysis read the train run's dynamics through the server's artifact proxy
    mlflow.set_tracking_uri(mlflow_server)
    try:
        d = load_dynamics(train_id)
        assert d.importance.shape == (2, 100, 4)
    finally:
        mlflow.set_tracking_uri(None)
