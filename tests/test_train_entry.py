"""The `train` and `main` entry points end to end, against a temporary tracking store."""
from __future__ import annotations

import os
import subprocess
import sys

import mlflow
import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from conftest import REPO, all_runs, module_store
from sample_importance import load_dynamics
from sample_importance.config import TrainRunConfig
from sample_importance.data import load_dataset
from sample_importance.runs import replay

pytestmark = pytest.mark.integration  # real processes, stores, servers or trained runs

ARGS = ["--subset", "120", "--epochs", "3", "--width", "32", "--batch_size", "25", "--device", "cpu", "--seed", "4"]
METRICS = ["train_loss", "train_error", "test_loss", "test_error", "importance_total", "importance_L1",
           "importance_L2", "importance_L3", "importance_Out", "epoch_seconds", "samples_per_second", "eval_train_loss", "eval_train_error", "eval_seconds"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One short `train` run on digits, shared by the tests of this module."""
    with module_store(tmp_path_factory, "store", ARGS) as (_, run_id):
        yield run_id


def test_run_has_params_metrics_and_every_artifact(trained):
    client = MlflowClient()
    run = client.get_run(trained)
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "train digits seed=4"
    expected = {**TrainRunConfig().to_dict(), "subset": 120, "epochs": 3, "width": 32, "batch_size": 25,
                "device": "cpu", "seed": 4}
    assert run.data.params == {k: str(v) for k, v in expected.items()}

    d = load_dynamics(trained)
    E, n, L = d.importance.shape
    assert (E, n, L) == (3, 120, 4) and d.layer_names == ["L1", "L2", "L3", "Out"]
    for name in METRICS:
        history = client.get_metric_history(trained, name)
        assert sorted(m.step for m in history) == [1, 2, 3], name  # step = 1-based epoch
    by_step = lambda name: np.array([m.value for m in sorted(client.get_metric_history(trained, name),
                                                               key=lambda m: m.step)])
    # The metrics are the artifacts, summed: A^t and B_d^t, in-batch loss and error.
    np.testing.assert_allclose(by_step("importance_total"), d.importance.sum((1, 2), dtype=np.float64), rtol=1e-6)
    for k, name in enumerate(d.layer_names):
        np.testing.assert_allclose(by_step(f"importance_{name}"), d.importance[:, :, k].sum(1, dtype=np.float64),
                                   rtol=1e-6)
    np.testing.assert_allclose(by_step("train_loss"), d.loss.mean(1, dtype=np.float64), rtol=1e-6)
    np.testing.assert_allclose(by_step("train_error"), 1 - d.correct.mean(1), rtol=1e-6)
    np.testing.assert_allclose(np.exp(-d.loss), d.p_true, rtol=1e-5)

    assert (d.importance > 0).all() and np.isfinite(d.importance).all()
    for row in d.batch_order:  # every epoch presents every sample exactly once, in a new order
        assert sorted(row) == list(range(n))
    assert not np.array_equal(d.batch_order[0], d.batch_order[1])
    data = load_dataset("digits", "", subset=120)
    np.testing.assert_array_equal(d.label, data.y_train)
    np.testing.assert_array_equal(d.sample_id, np.arange(n))
    meta = d.metadata
    assert meta["complete"] and meta["epochs_completed"] == 3 and meta["schema_version"] == 3
    # The end-of-epoch evaluation: every sample every epoch; GraNd's gradient norms at early_epoch = 2 only.
    assert meta["eval_train"] and meta["grand_epoch"] == 2 and d.grand_epoch == 2
    assert d.eval_p_true.shape == d.eval_correct.shape == d.eval_grad_norm.shape == (3, n)
    np.testing.assert_allclose(d.eval_p_true, np.exp(-d.eval_loss), rtol=1e-5)
    assert np.isfinite(d.eval_grad_norm[1]).all() and np.isnan(d.eval_grad_norm[[0, 2]]).all()
    assert ((d.error_l2 >= 0) & (d.error_l2 <= np.sqrt(2))).all()
    assert (d.folder / "final_state.pt").is_file() and (d.folder / "init_state.pt").is_file()
    assert meta["parameter_counts"] == {"L1": 65 * 32, "L2": 33 * 32, "L3": 33 * 32, "Out": 33 * 10}
    assert meta["lr"] == 0.1 and meta["batch_size"] == 25 and meta["seed"] == 4 and "phi_convention" in meta

    # The logged model is the final model: its NLL on the training set is final_loss.npy.
    model = mlflow.pytorch.load_model(f"runs:/{trained}/model")
    with torch.no_grad():
        nll = torch.nn.functional.cross_entropy(model(torch.as_tensor(data.x_train)),
                                                torch.as_tensor(data.y_train), reduction="none")
    np.testing.assert_allclose(nll.numpy(), d.final_loss, rtol=1e-5, atol=1e-6)
    artifacts = {f.path for f in client.list_artifacts(trained, "figures")}
    assert artifacts == {"figures/error_curves.png", "figures/layer_importance.png",
                         "figures/total_importance_hist.png"}
    assert "dynamics/init_state.pt" in {f.path for f in client.list_artifacts(trained, "dynamics")}


def test_replay_from_init_state_and_batch_order_reproduces_final_parameters(trained):
    d = load_dynamics(trained)
    result = replay(d)
    logged = mlflow.pytorch.load_model(f"runs:/{trained}/model").state_dict()
    replayed = result.model.state_dict()
    assert list(logged) == list(replayed)
    for k in logged:
        assert torch.equal(logged[k], replayed[k]), k
    np.testing.assert_array_equal(result.final_loss, d.final_loss)


BAD = [
    (["--dataset", "imagenet"], "Unknown dataset"),
    (["--lr", "0"], "lr must be positive"),
    (["--lr", "-0.1"], "lr must be positive"),
    (["--batch_size", "0"], "batch_size must be a positive"),
    (["--batch_size", "2000"], "larger than the 1500 training samples"),
    (["--epochs", "0"], "epochs must be at least 1"),
    (["--subset", "5000"], "subset=5000 is larger than the 1500"),
    (["--dataset", "mnist", "--data_dir", "/nonexistent/folder"], "Dataset mnist was not found"),
]


@pytest.mark.parametrize("args,message", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_input_one_line_error_and_no_running_run(tracking, capsys, args, message):
    import train as train_entry
    from _cli import run_cli

    with pytest.raises(SystemExit) as exit_info:
        run_cli(lambda: train_entry.main(["--epochs", "1", "--width", "8", *args]))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and message in errors[0] and "Traceback" not in err, err
    assert all(r.info.status != "RUNNING" for r in all_runs(tracking))


def _mlflow_run(tmp_path, *args, check=True):
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db"}
    proc = subprocess.run([sys.executable, "-m", "mlflow", "run", str(REPO), "--env-manager", "local", *args],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_mlflow_run_bad_input_marks_run_failed(tracking):
    proc = _mlflow_run(tracking, "-e", "train", "-P", "subset=100", "-P", "batch_size=500", check=False)
    assert proc.returncode != 0
    assert "error: batch_size=500 is larger than the 100 training samples" in proc.stderr
    runs = all_runs(tracking)
    assert [r.info.status for r in runs] == ["FAILED"]
    assert "batch_size=500" in runs[0].data.tags["sample_importance.failure"]
