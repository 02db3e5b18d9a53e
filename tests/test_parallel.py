"""Many models in one loop: each must be what training it alone gives (relative difference <= 1e-5
after one epoch), in its arrays and in its MLflow run."""
from __future__ import annotations

import dataclasses

import mlflow
import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from sample_importance import load_dynamics
from sample_importance.config import TrainConfig, TrainRunConfig
from sample_importance.data import training_data, with_label_noise
from sample_importance.models import model_for
from sample_importance.training import DivergenceError, EpochRecord, fit, fit_many

pytestmark = pytest.mark.integration  # real processes, stores, servers or trained runs

FIELDS = ("importance", "loss", "p_true", "error_l2")


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def alone(cfg, data, order=None):
    records = []
    model = model_for(cfg, data)
    result = fit(model, data, cfg, order=order, on_epoch=records.append)
    return records, result


@pytest.mark.parametrize("batched", [True, False])
def test_fit_many_matches_each_model_trained_alone(batched):
    base = TrainConfig(subset=400, width=48, epochs=1, batch_size=32, device="cpu")  # 400 = 12 x 32 + 16: ragged
    clean = training_data(base)
    cfgs = [base, dataclasses.replace(base, seed=1, lr=0.05), dataclasses.replace(base, seed=2, weight_decay=1e-3),
            dataclasses.replace(base, seed=3, label_noise=0.2)]
    datas = [clean, clean, clean, with_label_noise(clean, 0.2, 3)]
    orders = [None, None, np.stack([np.arange(400)[::-1]]), None]  # one fixed presentation order
    expected = [alone(c, d, o) for c, d, o in zip(cfgs, datas, orders)]
    got: dict[int, list] = {}
    models = [model_for(c, d) for c, d in zip(cfgs, datas)]
    results = fit_many(models, datas, cfgs, orders=orders, batched=batched,
                       on_epoch=lambda m, rec: got.setdefault(m, []).append(rec))
    for m, (records, result) in enumerate(expected):
        (mine,), (theirs,) = got[m], records
        np.testing.assert_array_equal(mine.batch_order, theirs.batch_order)
        for f in FIELDS:
            assert rel(getattr(mine, f), getattr(theirs, f)) <= 1e-5, (m, f)
        assert (mine.correct != theirs.correct).mean() <= 0.005, m  # argmax ties may flip at rounding level
        assert rel(results[m].final_loss, result.final_loss) <= 1e-5
        for (name, p), q in zip(models[m].named_parameters(), result.model.parameters()):
            assert rel(p.detach(), q.detach()) <= 1e-5, (m, name)
        assert mine.metrics["test_error"] == pytest.approx(theirs.metrics["test_error"], abs=1 / 360)
    if batched:  # the stacked computation is not the sequential one: same numbers, other rounding
        assert any(rel(got[m][0].importance, expected[m][0][0].importance) > 0 for m in range(4))


def test_models_that_cannot_be_stacked_step_in_turn():
    base = TrainConfig(subset=120, model="cnn", epochs=1, batch_size=40, device="cpu")
    data = training_data(base)
    cfgs = [base, dataclasses.replace(base, seed=1)]
    results = fit_many([model_for(c, data) for c in cfgs], [data, data], cfgs, batched=True)
    for c, result in zip(cfgs, results):  # the sequential path: bit for bit what alone gives
        np.testing.assert_array_equal(result.final_loss, alone(c, data)[1].final_loss)


def test_a_diverging_model_stops_alone_and_the_others_go_on():
    base = TrainConfig(subset=200, width=32, epochs=2, batch_size=20, device="cpu")
    data = training_data(base)
    cfgs = [base, dataclasses.replace(base, seed=1, lr=1e4)]
    with pytest.raises(DivergenceError) as alone_error:
        alone(cfgs[1], data)
    results = fit_many([model_for(c, data) for c in cfgs], [data, data], cfgs)
    assert isinstance(results[1], DivergenceError)
    assert (results[1].epoch, results[1].step) == (alone_error.value.epoch, alone_error.value.step)
    assert rel(results[0].final_loss, alone(base, data)[1].final_loss) <= 1e-5


def _runs_by_name(store_uri: str) -> dict[str, mlflow.entities.Run]:
    mlflow.set_tracking_uri(store_uri)
    client = MlflowClient()
    runs = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]
    return {r.info.run_name: r for r in runs if r.data.tags.get("sample_importance.entry_point") == "train"}


def test_runs_trained_together_equal_runs_trained_alone(tracking):
    """Stability's seeds trained as one batched group: every run, its dynamics/, metrics, parameters
    and artifacts as when each trained alone (through `mlflow run`)."""
    import stability
    import train

    args = ["--subset", "120", "--epochs", "1", "--batch_size", "20", "--width", "32", "--device", "cpu"]
    alone_uri = mlflow.get_tracking_uri()
    for seed in (0, 1, 2):
        train.main(args + ["--seed", str(seed)])
    together_uri = f"sqlite:///{tracking}/together.db"
    mlflow.set_tracking_uri(together_uri)
    stability.main(args + ["--num_seeds", "3", "--every", "1", "--parallel_models", "3"])
    client = MlflowClient()
    alone_runs, together_runs = _runs_by_name(alone_uri), _runs_by_name(together_uri)
    assert sorted(alone_runs) == sorted(together_runs) == [f"train digits seed={s}" for s in range(3)]
    parent = next(r for r in client.search_runs([e.experiment_id for e in client.search_experiments()])
                  if r.data.tags.get("sample_importance.entry_point") == "stability")
    for name, mine in together_runs.items():
        theirs = alone_runs[name]
        assert mine.info.status == theirs.info.status == "FINISHED"
        assert mine.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert mine.data.tags["sample_importance.config_fingerprint"] == \
            theirs.data.tags["sample_importance.config_fingerprint"]
        assert {k: v for k, v in mine.data.params.items() if k != "parallel_models"} == \
            {k: v for k, v in theirs.data.params.items() if k != "parallel_models"}
        timing = ("epoch_seconds", "samples_per_second", "eval_seconds")
        assert set(mine.data.metrics) == set(theirs.data.metrics)
        for key, value in mine.data.metrics.items():
            if key not in timing:
                assert value == pytest.approx(theirs.data.metrics[key], rel=1e-5, abs=1e-7), (name, key)
        mlflow.set_tracking_uri(together_uri)
        d_mine = load_dynamics(mine.info.run_id)
        files_mine = sorted(p.name for p in d_mine.folder.iterdir())
        mlflow.set_tracking_uri(alone_uri)
        d_theirs = load_dynamics(theirs.info.run_id)
        assert files_mine == sorted(p.name for p in d_theirs.folder.iterdir())
        for f in FIELDS + ("final_loss",):
            assert rel(getattr(d_mine, f), getattr(d_theirs, f)) <= 1e-5, (name, f)
        np.testing.assert_array_equal(d_mine.batch_order, d_theirs.batch_order)
        mine_state = torch.load(d_mine.folder / "final_state.pt", weights_only=True)
        theirs_state = torch.load(d_theirs.folder / "final_state.pt", weights_only=True)
        for key in theirs_state:
            assert rel(mine_state[key], theirs_state[key]) <= 1e-5, (name, key)
    mlflow.set_tracking_uri(together_uri)


def test_a_failing_run_fails_alone_in_its_group(tracking):
    from sample_importance.runs import get_or_train

    base = TrainRunConfig(subset=100, epochs=2, batch_size=20, width=16, device="cpu")
    cfgs = [base, dataclasses.replace(base, seed=1, lr=1e4), dataclasses.replace(base, seed=2)]
    with mlflow.start_run(run_name="parent"), pytest.raises(DivergenceError):
        get_or_train(cfgs, parallel_models=3)
    runs = {r.info.run_name: r for r in MlflowClient().search_runs(["0"])}
    assert runs["train digits seed=0"].info.status == runs["train digits seed=2"].info.status == "FINISHED"
    bad = runs["train digits seed=1"]
    assert bad.info.status == "FAILED" and "sample_importance.diverged" in bad.data.tags
    # Asked again, the finished runs are reused and only the failed one trains (and fails) again.
    with mlflow.start_run(run_name="again"), pytest.raises(DivergenceError):
        get_or_train(cfgs, parallel_models=3)
    names = [r.info.run_name for r in MlflowClient().search_runs(["0"])]
    assert names.count("train digits seed=0") == names.count("train digits seed=2") == 1
    assert names.count("train digits seed=1") == 2


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_models_trained_at_once_on_a_gpu_match_the_cpu():
    torch.backends.cuda.matmul.allow_tf32 = False
    base = TrainConfig(subset=400, width=48, epochs=1, batch_size=32, device="cuda")
    data = training_data(base)
    cfgs = [dataclasses.replace(base, seed=s) for s in range(3)]
    got: dict[int, EpochRecord] = {}
    fit_many([model_for(c, data) for c in cfgs], [data] * 3, cfgs, on_epoch=lambda m, rec: got.__setitem__(m, rec))
    for m, c in enumerate(cfgs):
        (theirs,), _ = alone(dataclasses.replace(c, device="cpu"), data)
        for f in FIELDS:
            assert rel(getattr(got[m], f), getattr(theirs, f)) <= 1e-4, (m, f)


def test_an_interrupted_group_leaves_no_run_running_and_resumes(tracking):
    from sample_importance.runs import get_or_train

    base = TrainRunConfig(subset=100, epochs=3, batch_size=20, width=16, device="cpu")
    cfgs = [base, dataclasses.replace(base, seed=1)]

    def interrupt(group, epoch, rows):
        if epoch == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt), mlflow.start_run(run_name="parent"):
        get_or_train(cfgs, parallel_models=2, epoch_callback=interrupt)
    runs = [r for r in MlflowClient().search_runs(["0"]) if r.info.run_name.startswith("train")]
    assert sorted(r.info.status for r in runs) == ["KILLED", "KILLED"]
    with mlflow.start_run(run_name="again"):
        ids = get_or_train(cfgs, parallel_models=2)  # each resumes in its own run after epoch 2
    assert sorted(ids) == sorted(r.info.run_id for r in runs)
    for run_id, cfg in zip(ids, cfgs):
        assert MlflowClient().get_run(run_id).info.status == "FINISHED"
        records, _ = alone(cfg, training_data(cfg))
        assert rel(load_dynamics(run_id).importance[-1], records[-1].importance) <= 1e-5
