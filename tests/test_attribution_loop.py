"""In-run attribution in the project's own loop (`train` with attribute_to): each step's contribution
against per-sample autograd in float64, the epoch's fidelity figures against their definitions, and
a `train` run whose contribution.npy `scores`, `influence` and the data split read."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import folded, module_store
from sample_importance.config import TrainConfig
from sample_importance.data import training_data
from sample_importance.models import model_for
from sample_importance.training import fit

pytestmark = pytest.mark.integration  # real processes, stores, servers or trained runs


def per_sample_reference(model, x, y, G: dict, factor: float) -> torch.Tensor:
    """(B, layers): each L_i backpropagated alone, phi_i = factor * g_i / B, dotted with G layer by layer."""
    names = list(model.layers)
    out = torch.zeros(len(y), len(names), dtype=torch.float64)
    for i in range(len(y)):
        loss = F.cross_entropy(model(x[i:i + 1]), y[i:i + 1])
        for d, name in enumerate(names):
            params = list(model.layers[name].parameters())
            for g, p in zip(torch.autograd.grad(loss, params, retain_graph=True), params):
                out[i, d] += (factor * g / len(y) * G[p]).sum()
    return out


@pytest.mark.parametrize("momentum,nesterov,every", [(0.0, 0, 1), (0.9, 1, 1), (0.0, 0, 3)])
def test_each_step_s_contribution_in_the_loop_is_the_per_sample_autograd_one(float64, momentum, nesterov, every):
    cfg = TrainConfig(subset=40, depth=1, width=8, batch_size=12, epochs=2, lr=0.2, weight_decay=1e-2,
                      momentum=momentum, nesterov=nesterov, attribute_to="test", target_size=15, target_every=every,
                      device="cpu").check()
    data = training_data(cfg)
    model = model_for(cfg, data).double()
    xv, yv = torch.tensor(data.x_target, dtype=torch.float64), torch.tensor(data.y_target)
    xt, yt = torch.tensor(data.x_train, dtype=torch.float64), torch.tensor(data.y_train)
    factor = -cfg.lr * (1 + momentum if nesterov else 1.0)  # torch.optim.SGD's d(delta theta)/dg, dampening 0
    expected = [torch.zeros(data.n_train, 2, dtype=torch.float64) for _ in range(cfg.epochs)]
    decay = [0.0] * cfg.epochs  # sum over the epoch's steps of G . (-lr * wd * theta): plain SGD's rest of delta theta
    state = {"step": 0, "G": None}

    def probe(m, ids):
        if state["step"] % every == 0:  # the target gradient at the step's parameters, evaluation mode
            params = list(m.parameters())
            state["G"] = dict(zip(params, torch.autograd.grad(F.cross_entropy(m(xv), yv), params)))
        epoch = state["step"] // 4  # 40 samples in batches of 12: 4 steps an epoch
        ids = ids.cpu().numpy()
        expected[epoch][ids] = per_sample_reference(m, xt[ids], yt[ids], state["G"], factor)
        decay[epoch] += float(sum((g * (-cfg.lr * cfg.weight_decay) * p.detach()).sum() for p, g in state["G"].items()))
        state["step"] += 1

    records = []
    fit(model, data, cfg, on_epoch=records.append, on_batch=probe)
    for rec, want in zip(records, expected):
        got = rec.contribution.astype(np.float64)  # float32 on the host, as stored
        np.testing.assert_allclose(got, want.numpy(), rtol=1e-5, atol=1e-7 * np.abs(want.numpy()).max())
        assert rec.metrics["contribution_total"] == pytest.approx(float(want.sum()), rel=1e-5)
    if momentum == 0 and every == 1:  # plain SGD: delta theta = the samples' phi + the weight decay's step
        for rec, dec in zip(records, decay):
            assert rec.metrics["target_first_order"] == pytest.approx(rec.metrics["contribution_total"] + dec, rel=1e-6)
    # L_V after each epoch, and its change, as evaluated on the final model
    with torch.no_grad():
        model.eval()
        final = float(F.cross_entropy(model(xv), yv))
    assert records[-1].metrics["target_loss"] == pytest.approx(final, rel=1e-12)
    assert records[-1].metrics["target_change"] == pytest.approx(final - records[0].metrics["target_loss"], rel=1e-9)


def test_at_a_small_learning_rate_the_first_order_explains_the_change_within_one_percent(float64):
    cfg = TrainConfig(subset=60, depth=1, width=8, batch_size=20, epochs=2, lr=2e-3, attribute_to="holdout",
                      target_size=20, device="cpu").check()
    data = training_data(cfg)
    assert data.n_train == 40 and data.target_split == "train" and list(data.target_ids) == list(range(40, 60))
    records = []
    fit(model_for(cfg, data).double(), data, cfg, on_epoch=records.append)
    for rec in records:
        assert abs(rec.metrics["target_explained"] - 1) < 0.01, rec.metrics


def test_attribution_is_checked_before_training():
    from sample_importance.config import ConfigError

    for bad, words in (({"attribute_to": "val"}, "Unknown attribute_to"), ({"target_every": 0}, "at least 1"),
                       ({"attribute_to": "test", "track": "outputs"}, "needs track=importance")):
        with pytest.raises(ConfigError, match=words):
            TrainConfig(**bad).check()
    with pytest.raises(ConfigError, match="would hold out all 40"):
        training_data(TrainConfig(subset=40, attribute_to="holdout", target_size=40))
    # Runs trained before the option existed keep their fingerprint; without a target its size and
    # schedule change nothing; with one, each does.
    assert TrainConfig().fingerprint() == TrainConfig(target_size=7, target_every=3).fingerprint()
    on = TrainConfig(attribute_to="test")
    assert len({TrainConfig().fingerprint(), on.fingerprint(), TrainConfig(attribute_to="test", target_size=7).fingerprint(),
                TrainConfig(attribute_to="test", target_every=3).fingerprint()}) == 4


@pytest.fixture(scope="module")
def attributed(tmp_path_factory):
    """A digits `train` run with attribute_to=test and 10% flipped labels: (store, run id, dynamics)."""
    from sample_importance import mlflow_io

    args = ["--dataset", "digits", "--subset", "300", "--epochs", "3", "--depth", "1", "--width", "16",
            "--batch_size", "50", "--device", "cpu", "--label_noise", "0.1", "--attribute_to", "test",
            "--target_size", "40"]
    with module_store(tmp_path_factory, "attribution", args) as (tmp, run_id):
        yield tmp, args, run_id, mlflow_io.load_dynamics(run_id)


def test_a_train_run_writes_the_contribution_and_its_target(attributed):
    from mlflow.tracking import MlflowClient

    _, _, run_id, d = attributed
    assert d.contribution.shape == (3, 300, 2) and d.contribution.dtype == np.float32
    meta = d.metadata
    assert meta["contribution"] is True and meta["target_split"] == "test" and meta["target_ids"] == list(range(40))
    assert meta["target_every"] == 1 and "40 test samples" in meta["target"]
    assert np.all(np.abs(np.asarray(d.contribution)).sum(2) > 0)  # every sample stepped once an epoch
    history = MlflowClient().get_metric_history(run_id, "contribution_total")
    assert [m.step for m in history] == [1, 2, 3]
    for m in history:
        assert m.value == pytest.approx(float(np.asarray(d.contribution[m.step - 1], np.float64).sum()), rel=1e-5)
    metrics = MlflowClient().get_run(run_id).data.metrics
    assert {"target_loss", "target_change", "target_first_order", "target_explained"} <= set(metrics)


def test_scores_and_influence_read_the_contribution(attributed):
    import influence as influence_entry
    import mlflow
    import pandas as pd
    import scores as scores_entry

    from sample_importance.analysis import scores as S

    _, args, run_id, d = attributed
    scores_id = scores_entry.main(folded("scores", [*args, "--train_run_ids", run_id]))
    table = pd.read_csv(mlflow.artifacts.download_artifacts(f"runs:/{scores_id}/scores.csv"))
    np.testing.assert_allclose(table["contribution_total"], np.asarray(d.contribution, np.float64).sum((0, 2)), rtol=1e-6)
    # The in-run self-contribution: -(B / lr) alpha summed over the sample's steps (the last batch of 300/50 is full).
    alpha = np.asarray(d.importance, np.float64).sum(2)
    np.testing.assert_allclose(table["self_contribution"], -(50 / 0.1) * alpha.sum(0), rtol=1e-9)
    found = pd.read_csv(mlflow.artifacts.download_artifacts(f"runs:/{scores_id}/label_noise_detection.csv"))
    row = found.set_index("score").loc["final_nll"]
    flipped = table["flipped"].to_numpy()
    top = np.argsort(-table["final_nll"].to_numpy(), kind="stable")[:15]  # 5% of 300
    assert row["found_at_5"] == pytest.approx(flipped[top].sum() / flipped.sum())
    assert {"contribution_total", "self_contribution"} <= set(found["score"])
    assert S.HARDER_IS_LARGER["self_contribution"] is False

    influence_id = influence_entry.main(folded("influence", [*args, "--train_run_ids", run_id, "--targets", "test_loss",
                                                              "--per_layer", "0", "--num_test", "7"]))
    targets = mlflow.artifacts.load_dict(f"runs:/{influence_id}/targets.json")
    assert targets["test_ids"] == list(range(40))  # the run's own target set, not num_test drawn ones
    inf_table = pd.read_csv(mlflow.artifacts.download_artifacts(f"runs:/{influence_id}/influence.csv"))
    np.testing.assert_allclose(inf_table["inrun_contribution"], table["contribution_total"], rtol=1e-6)
    metrics = mlflow.tracking.MlflowClient().get_run(influence_id).data.metrics
    rho = metrics["pearson_inrun_unrolled_test_loss"]
    assert rho == pytest.approx(np.corrcoef(inf_table["inrun_contribution"], inf_table["unrolled_test_loss"])[0, 1])


def test_lds_is_dattri_s_mean_spearman_over_targets_of_subset_sums():
    from scipy.stats import spearmanr

    from sample_importance.analysis.attribution import lds, lds_subsets

    subsets = lds_subsets(30, 12, 0.5, seed=3)
    assert subsets.shape == (12, 30) and (subsets.sum(1) == 15).all()
    assert np.array_equal(subsets[4], np.isin(np.arange(30), np.random.default_rng(7).choice(30, 15, replace=False)))
    rng = np.random.default_rng(0)
    scores = rng.normal(size=(4, 30))
    additive = subsets @ scores.T  # a model exactly linear in the subset
    assert lds(scores, subsets, additive)[0] == pytest.approx(1.0)
    assert lds(-scores, subsets, additive)[0] == pytest.approx(-1.0)
    noisy = additive + rng.normal(scale=2.0, size=additive.shape)
    noisy[:, 2] = 1.0  # a constant target: its correlation is undefined and left out
    value, per_target = lds(scores, subsets, noisy)
    expected = [spearmanr((subsets * scores[k]).sum(1), noisy[:, k]).statistic for k in (0, 1, 3)]
    assert np.isnan(per_target[2]) and value == pytest.approx(np.mean(expected))
