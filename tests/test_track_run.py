"""track_run: a researcher's own loop with a torchvision model becomes a run the analyses read."""
from __future__ import annotations

import mlflow
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from mlflow.tracking import MlflowClient
from torch import nn

import sample_importance
from conftest import all_runs
from sample_importance import config as C
from sample_importance.errors import UserError

pytestmark = pytest.mark.integration  # real processes, stores, servers or trained runs


def digits(n: int):
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = torch.tensor(bunch.data[:n] / 16.0, dtype=torch.float32).view(n, 1, 8, 8).expand(n, 3, 8, 8)
    return x, torch.tensor(bunch.target[:n])


def resnet():
    from torchvision.models.resnet import BasicBlock, ResNet

    torch.manual_seed(0)
    return ResNet(BasicBlock, [1, 1, 1, 1], num_classes=10, norm_layer=lambda c: nn.GroupNorm(8, c))


def train_own_loop(epochs=2, n=60, batch=20):
    """A researcher's loop: their model, optimizer, loader and sample ids (not 0..n-1)."""
    x, y = digits(n)
    ids = torch.arange(n) * 7 + 1000
    model = resnet()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    with sample_importance.track_run(model, labels=y, sample_ids=ids, epochs=epochs, batch_size=batch,
                                     optimizer=opt, dataset="digits", config={"seed": 0}) as run:
        gen = torch.Generator().manual_seed(0)
        for _ in range(epochs):
            model.train()
            for b in torch.randperm(n, generator=gen).split(batch):
                opt.zero_grad()
                logits = model(x[b])
                loss_i = F.cross_entropy(logits, y[b], reduction="none")
                importance = run.recorder.backward(loss_i, optimizer=opt)
                opt.step()
                run.record(ids[b], importance, loss_i, logits)
            run.end_epoch({"test_error": 0.5})
        model.eval()
        with torch.no_grad():
            run.record_final_loss(ids, F.cross_entropy(model(x), y, reduction="none"))
    return run, ids, y


def test_own_loop_run_feeds_decompose_and_scores(tracking):
    from sample_importance.stages.scores import run as run_scores
    from sample_importance.stages.decompose import run as run_decompose

    run, ids, y = train_own_loop()
    d = sample_importance.load_dynamics(run.run_id)
    assert d.importance.shape == (2, 60, 25) and d.layer_names[0] == "conv1" and d.layer_names[-1] == "fc"
    assert np.array_equal(d.sample_id, ids.numpy()) and np.array_equal(d.label, y.numpy())
    assert (np.asarray(d.importance) > 0).all() and np.isfinite(d.final_loss).all()
    assert sorted(np.asarray(d.batch_order[1]).tolist()) == list(range(60))
    assert all(not m._forward_hooks for m in run.model.modules())  # the recorder was closed

    decompose_id = run_decompose(C.DecomposeConfig(train_run_ids=run.run_id))
    scores_id = run_scores(C.ScoresConfig(train_run_ids=run.run_id, train="epochs=2 early_epoch=1"))
    client = MlflowClient()
    for rid in (decompose_id, scores_id):
        assert client.get_run(rid).info.status == "FINISHED"
    table = mlflow.artifacts.load_text(f"runs:/{scores_id}/scores.csv")
    assert table.splitlines()[1].split(",")[0] == "1000" and "importance_layer1.0.conv1" in table.splitlines()[0]
    metrics = client.get_run(decompose_id).data.metrics
    assert "peak_epoch_fc" in metrics and "top20_share_conv1" in metrics


def test_own_loop_bad_use_is_one_sentence_and_the_run_fails(tracking):
    x, y = digits(20)
    model = resnet()
    with pytest.raises(UserError, match="recorded 10 of the 20 samples"):
        with sample_importance.track_run(model, labels=y, epochs=1, batch_size=10, lr=0.1) as run:
            logits = model(x[:10])
            loss_i = F.cross_entropy(logits, y[:10], reduction="none")
            run.record(torch.arange(10), run.recorder.backward(loss_i, lr=0.1), loss_i, logits)
            run.end_epoch()
    assert [r.info.status for r in all_runs(tracking)] == ["FAILED"]
    with pytest.raises(UserError, match="not one of the run's sample_ids"):
        with sample_importance.track_run(model, labels=y, epochs=1, batch_size=10, lr=0.1) as run:
            run.positions([25])
