"""The end-of-epoch evaluation of the training set (dynamics eval_*.npy) against a separate, plain
evaluation of the saved end-of-epoch parameters, and GraNd at the checkpoint against per-sample autograd."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_dataset
from sample_importance.config import TrainConfig
from sample_importance.models import build_model
from sample_importance.training import fit, fit_many


def plain_evaluation(model, data):
    """Every training sample one at a time, float64: loss, p_true, correct, EL2N, ||grad of its loss||."""
    rows = []
    for x, y in zip(torch.as_tensor(data.x_train, dtype=torch.float64), torch.as_tensor(data.y_train)):
        model.zero_grad()
        logits = model(x[None])[0]
        loss = F.cross_entropy(logits[None], y[None])
        loss.backward()
        grad = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
        logits = logits.detach()
        p = torch.softmax(logits, 0)
        onehot = F.one_hot(y, len(p)).double()
        rows.append([float(loss.detach()), float(p[y]), float(logits.argmax() == y), float((p - onehot).norm()),
                     float(grad.norm())])
    return np.array(rows).T  # (5, n)


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_end_of_epoch_arrays_equal_a_separate_evaluation_of_the_saved_parameters(kind):
    data = tiny_dataset(n=30, d=16, classes=3)
    data = type(data)(data.name, data.x_train, data.y_train, data.x_test, data.y_test, (1, 4, 4), 3)
    cfg = TrainConfig(depth=2, width=8, lr=0.2, batch_size=7, epochs=3, weight_decay=1e-3, early_epoch=2,
                      device="cpu", model=kind)
    model = build_model(16, 3, 2, 8, 0, kind, image_shape=(1, 4, 4)).double() if kind == "cnn" else \
        build_model(16, 3, 2, 8, 0).double()
    saved, records = [], []

    def on_epoch(record):
        saved.append(copy.deepcopy(model.state_dict()))  # the end-of-epoch parameters: the checkpoint
        records.append(record)

    fit(model, data, cfg, on_epoch=on_epoch)
    for epoch, (state, rec) in enumerate(zip(saved, records), start=1):
        check = copy.deepcopy(model)
        check.load_state_dict(state)
        loss, p_true, correct, error_l2, grad_norm = plain_evaluation(check, data)
        np.testing.assert_allclose(rec.eval_loss, loss, rtol=1e-6)  # stored as float32
        np.testing.assert_allclose(rec.eval_p_true, p_true, rtol=1e-6)
        np.testing.assert_array_equal(rec.eval_correct, correct.astype(bool))
        np.testing.assert_allclose(rec.eval_error_l2, error_l2, rtol=1e-6)
        if epoch == cfg.early_epoch:  # GraNd at the checkpoint: exact per-sample gradient norms
            np.testing.assert_allclose(rec.eval_grad_norm, grad_norm, rtol=1e-6)
        else:
            assert np.isnan(rec.eval_grad_norm).all()
        # Not the in-batch values: those were taken at other parameters within the epoch.
        assert not np.allclose(rec.p_true, rec.eval_p_true)


def test_eval_train_off_records_nothing_and_models_trained_together_match_alone():
    data = tiny_dataset(n=30, d=6, classes=3)
    cfgs = [TrainConfig(depth=1, width=5, lr=0.2, batch_size=10, epochs=2, seed=s, early_epoch=1, device="cpu")
            for s in (0, 1)]
    alone = []
    for c in cfgs:
        recs = []
        fit(build_model(6, 3, 1, 5, c.seed), data, c, on_epoch=recs.append)
        alone.append(recs)
    together = [[], []]
    fit_many([build_model(6, 3, 1, 5, c.seed) for c in cfgs], [data, data], cfgs, batched=True,
             on_epoch=lambda m, rec: together[m].append(rec))
    for mine, theirs in zip(together, alone):
        for a, b in zip(mine, theirs):
            for name in ("eval_loss", "eval_p_true", "eval_error_l2", "eval_grad_norm"):
                np.testing.assert_allclose(getattr(a, name), getattr(b, name), rtol=1e-5, atol=1e-7)
    off = []
    fit(build_model(6, 3, 1, 5, 0), data, TrainConfig(**{**cfgs[0].to_dict(), "eval_train": 0}), on_epoch=off.append)
    assert all(r.eval_loss is None and r.eval_grad_norm is None and "eval_train_loss" not in r.metrics for r in off)
    assert "eval_train_loss" in alone[0][0].metrics and "eval_seconds" in alone[0][0].metrics
