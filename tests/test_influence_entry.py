"""The `influence` entry point end to end on a small digits run, and its refusals."""
from __future__ import annotations

import os
import subprocess
import sys

import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from conftest import REPO, all_runs, folded, module_store
from sample_importance.errors import UserError

pytestmark = pytest.mark.integration  # real processes, stores, servers or trained runs

TRAIN = ["--subset", "60", "--depth", "1", "--width", "8", "--batch_size", "20", "--epochs", "3", "--lr", "0.2",
         "--weight_decay", "1e-3", "--device", "cpu", "--seed", "1"]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A temporary tracking store holding one small train run."""
    with module_store(tmp_path_factory, "influence", TRAIN) as (tmp, run_id):
        yield tmp, run_id


def run_influence(argv: list[str]) -> str:
    """The influence entry point, with its block options (num_test, solver, ...) given as flags."""
    import influence

    return influence.main(folded("influence", argv))


def table(run_id: str, name: str) -> pd.DataFrame:
    path = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=name)
    return pd.read_csv(path)


def test_validate_mode_logs_influence_and_checks_it_against_retraining(store):
    _, train_id = store
    run_id = run_influence(["--train_run_ids", train_id, "--mode", "validate", "--targets", "test_loss,class_prob,self",
                         "--num_test", "20", "--num_validate", "3", "--solver", "direct", "--damping", "0.05",
                         "--polish_steps", "30", "--loo_steps", "30", "--device", "cpu"])
    run = MlflowClient().get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["sample_importance.train_run_id"] == train_id
    inf = table(run_id, "influence.csv")
    assert inf["sample_id"].tolist() == list(range(60))
    for col in ("influence_test_loss", "influence_test_loss_L1", "influence_test_loss_Out", "unrolled_test_loss",
                "influence_class_prob", "unrolled_class_prob", "influence_self", "total_importance", "final_nll"):
        assert col in inf and np.isfinite(inf[col]).all(), col
    assert (inf["influence_self"] < 0).all()  # up-weighting a sample lowers its own loss (H + lambda I > 0)
    summary = table(run_id, "validation_summary.csv").set_index(["method", "counterfactual"])
    assert len(summary) == 6
    # The unrolled derivative predicts the replayed small change: end-to-end check of the derivative.
    assert summary.loc[("unrolled", "small"), "pearson"] > 0.999
    assert summary.loc[("unrolled", "small"), "sign_agreement"] == 1.0
    val = table(run_id, "validation.csv")
    assert len(val) == 6 and set(val["group"]) == {"top", "random"}
    np.testing.assert_allclose(val["actual_small"] / -1e-6, val["influence_unrolled"], rtol=1e-3,
                               atol=1e-3 * np.abs(val["influence_unrolled"]).max())
    artifacts = {f.path for f in MlflowClient().list_artifacts(run_id, "figures")}
    assert {"figures/top_test_loss.png", "figures/influence_test_loss.png", "figures/validation_fixed.png",
            "figures/validation_unrolled.png"} <= artifacts


def test_default_damping_is_logged_and_every_solve_converges(store):
    _, train_id = store
    run_id = run_influence(["--train_run_ids", train_id, "--targets", "test_loss", "--num_test", "20", "--unrolled", "0",
                         "--device", "cpu"])
    run = MlflowClient().get_run(run_id)
    metrics = run.data.metrics
    assert {"damping", "min_eigenvalue", "min_eigenvalue_residual"} <= set(metrics)
    assert metrics["damping"] == 0.0 or metrics["damping"] > -metrics["min_eigenvalue"]
    solves = table(run_id, "solves.csv")
    assert solves["converged"].all() and (solves["residual"] <= solves["tol"]).all()
    assert (solves["damping"] == metrics["damping"]).all()
    assert "sample_importance.unconverged" not in run.data.tags
    assert "influence_test_loss" in table(run_id, "influence.csv")


def test_the_explorer_shows_the_influence_of_the_newest_influence_run(store):
    """An influence run of a train run adds its influence columns to the run's explorer as scores
    (the values of influence.csv, per sample id), and the run to the page's list of runs."""
    import json

    from sample_importance import load_dynamics, mlflow_io
    from sample_importance.explorer import data as X
    from sample_importance.stages.explore import explorer_html

    _, train_id = store
    inf_id = run_influence(["--train_run_ids", train_id, "--targets", "test_loss,self", "--num_test", "20", "--device",
                         "cpu"])
    assert mlflow_io.find_influence_run(train_id) == inf_id  # the newest finished one
    inf = mlflow_io.load_table(inf_id, "influence.csv").set_index("sample_id")
    d = load_dynamics(train_id)
    page = explorer_html({train_id: d}, "", 2, influence=(inf_id, inf.reset_index()))
    start = page.index('id="si-data">') + len('id="si-data">')
    payload = json.loads(page[start:page.index("</script>", start)])
    shown = {s["name"]: s for s in payload["scores"]}
    for col in ("influence_test_loss", "influence_self", "unrolled_test_loss"):
        np.testing.assert_allclose(X.unblob(shown[col]["values"]), inf.loc[np.asarray(d.sample_id), col], rtol=1e-6)
    assert shown["influence_test_loss"]["harder_is_larger"] is True  # rank 1: raises the test loss most
    assert shown["influence_self"]["harder_is_larger"] is False
    assert inf_id in [r["run_id"] for r in payload["runs"]]


def test_a_solve_that_did_not_converge_is_not_reported_as_a_result(store, capfd):
    _, train_id = store
    run_id = run_influence(["--train_run_ids", train_id, "--targets", "test_loss", "--num_test", "20", "--unrolled", "0",
                         "--per_layer", "0", "--cg_maxiter", "1", "--device", "cpu"])
    assert "WARNING: 1 solve(s) did not converge" in capfd.readouterr().err
    run = MlflowClient().get_run(run_id)
    assert run.data.tags["sample_importance.unconverged"].startswith("test_loss/all: residual")
    assert run.data.metrics["residual_test_loss_all"] > 1e-6
    inf = table(run_id, "influence.csv")
    assert "influence_test_loss" not in inf and "unconverged_influence_test_loss" in inf
    assert not table(run_id, "solves.csv")["converged"].any()


def test_breakdown_mode_maps_linear_response(store):
    run_id = run_influence(TRAIN[:10] + ["--device", "cpu", "--mode", "breakdown", "--breakdown_lrs", "0.2",
                                      "--breakdown_epochs", "2", "--breakdown_changes", "1e-6,1",
                                      "--num_validate", "3", "--num_test", "20"])
    bd = table(run_id, "breakdown.csv")
    assert len(bd) == 2 and list(bd["change"]) == [1e-6, 1.0]
    assert bd.loc[bd["change"] == 1e-6, "pearson"].item() > 0.999
    assert len(table(run_id, "breakdown_samples.csv")) == 2 * 6


@pytest.mark.parametrize("args, message", [
    (["--solver", "newton"], "Unknown solver 'newton'"),
    (["--damping", "-1"], "damping must be auto or a number >= 0"),
    (["--damping", "lots"], "damping must be auto or a number >= 0"),
    (["--test_ids", "3,100000"], "test id 100000 is out of range"),
    (["--targets", "loss"], "Unknown target"),
])
def test_bad_input_is_refused(store, args, message):
    _, train_id = store
    before = {r.info.run_id for r in all_runs(None)}
    with pytest.raises(UserError, match=message):
        run_influence(["--train_run_ids", train_id, "--device", "cpu"] + args)
    new = [r for r in all_runs(None) if r.info.run_id not in before]
    assert all(r.info.status == "FAILED" for r in new)  # nothing left RUNNING


def test_a_run_without_a_model_is_refused_with_exit_status_2(store):
    tmp, train_id = store
    other = MlflowClient().create_run(MlflowClient().get_run(train_id).info.experiment_id).info.run_id
    MlflowClient().set_terminated(other)
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp}/mlflow.db"}
    proc = subprocess.run([sys.executable, str(REPO / "entry_points" / "influence.py"), "--train_run_ids", other,
                           "--train", "device=cpu"], capture_output=True, text=True, cwd=tmp, env=env)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "not a finished `train` run" in lines[0], proc.stderr
    assert all(r.info.status != "RUNNING" for r in all_runs(None))
