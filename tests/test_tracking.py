"""Recorded sample importance against per-sample gradients computed one sample at a time."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_dataset
from sample_importance.config import TrainConfig
from sample_importance.models import build_model
from sample_importance.training import fit


def reference_step(model, x, y, lr):
    """beta, loss, p_true, correct per sample, from per-sample autograd in float64, one sample at a time."""
    ref = build_model(x.shape[1], model.layers["Out"].out_features, len(model.layers) - 1,
                      model.layers["Out"].in_features if len(model.layers) > 1 else 1, 0).double()
    ref.load_state_dict({k: v.double() for k, v in model.state_dict().items()})
    B = len(y)
    rows = []
    for i in range(B):
        logits = ref(x[i:i + 1].double())
        loss = F.cross_entropy(logits, y[i:i + 1])  # sample i's own loss, no weight decay
        beta = []
        for layer in ref.layers.values():
            gw, gb = torch.autograd.grad(loss, [layer.weight, layer.bias], retain_graph=True)
            phi_sq = (lr / B) ** 2 * (gw.square().sum() + gb.square().sum())  # phi = -(lr/B) g_i
            beta.append(phi_sq.item())
        p = torch.softmax(logits, 1)[0, y[i]].item()
        rows.append((beta, loss.item(), p, bool(logits.argmax(1).item() == y[i].item())))
    return rows


@pytest.mark.parametrize("depth", [0, 1, 3])
def test_importance_matches_per_sample_autograd(depth):
    data = tiny_dataset(n=42)  # 42 = 5 batches of 8 and a last batch of 2
    cfg = TrainConfig(depth=depth, width=16, lr=0.5, batch_size=8, epochs=3, weight_decay=1e-2, seed=3,
                      device="cpu")
    model = build_model(data.x_train.shape[1], data.num_classes, depth, 16, cfg.seed)
    x, y = torch.as_tensor(data.x_train), torch.as_tensor(data.y_train)
    expected = {}  # (epoch, sample_id) -> reference row
    steps_per_epoch = -(-data.n_train // cfg.batch_size)
    step = [0]

    def on_batch(m, ids):
        rows = reference_step(m, x[ids], y[ids], cfg.lr)
        for sid, row in zip(ids.tolist(), rows):
            expected[(step[0] // steps_per_epoch, sid)] = row
        step[0] += 1

    records = []
    fit(model, data, cfg, on_epoch=records.append, on_batch=on_batch)
    assert len(records) == cfg.epochs and len(expected) == cfg.epochs * data.n_train
    worst = 0.0
    for rec in records:
        for sid in range(data.n_train):
            beta, loss, p, correct = expected[(rec.epoch, sid)]
            beta = np.array(beta)
            assert (beta > 0).all()
            worst = max(worst, float(np.max(np.abs(rec.importance[sid] - beta) / beta)))
            assert rec.loss[sid] == pytest.approx(loss, rel=1e-5, abs=1e-6)
            assert rec.p_true[sid] == pytest.approx(p, rel=1e-5, abs=1e-7)
            assert bool(rec.correct[sid]) == correct
    assert worst <= 1e-5, f"largest relative error of beta: {worst:.2e}"
    # The parameters moved: later epochs are not a copy of the first.
    assert not np.allclose(records[0].importance, records[-1].importance)


def test_untracked_step_trains_identically():
    """Tracking only reads the step: the parameters after training are bit-identical without it."""
    data = tiny_dataset(n=40)
    cfg = TrainConfig(depth=2, width=16, lr=0.3, batch_size=10, epochs=2, seed=1, device="cpu")
    a = build_model(12, 4, 2, 16, 1)
    b = build_model(12, 4, 2, 16, 1)
    fit(a, data, cfg, track=True)
    fit(b, data, cfg, track=False)
    for (k, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(pa, pb), k


def per_sample_reference(model, x, y, lr):
    """beta (B, L) from per-sample autograd in float64, one sample at a time, for any model whose
    weighted layers are `model.layers`."""
    import copy

    ref = copy.deepcopy(model).double()
    B = len(y)
    out = []
    for i in range(B):
        loss = F.cross_entropy(ref(x[i:i + 1].double()), y[i:i + 1])
        params = [p for layer in ref.layers.values() for p in (layer.weight, layer.bias)]
        grads = torch.autograd.grad(loss, params)
        out.append([(lr / B) ** 2 * float(grads[2 * k].square().sum() + grads[2 * k + 1].square().sum())
                    for k in range(len(ref.layers))])
    return np.array(out)


@pytest.mark.parametrize("image", [(1, 8, 8), (3, 6, 10)])
def test_cnn_importance_matches_per_sample_autograd(image):
    """Convolutions: the importance from unfolded inputs and output gradients is each sample's own
    gradient norm. In both shapes C1 takes the per-sample route (fused with its backward) and C2 the
    Gram route."""
    from sample_importance.data import Dataset

    rng = np.random.default_rng(0)
    d = int(np.prod(image))
    x = rng.normal(size=(40, d)).astype(np.float32)
    y = rng.integers(0, 5, size=40)
    data = Dataset("tiny-images", x[:30], y[:30], x[30:], y[30:], image, num_classes=5)
    cfg = TrainConfig(model="cnn", lr=0.2, batch_size=7, epochs=2, weight_decay=1e-3, seed=2, device="cpu")
    from sample_importance.models import model_for

    model = model_for(cfg, data)
    assert model.layer_names == ["C1", "C2", "Out"]
    xt, yt = torch.as_tensor(data.x_train), torch.as_tensor(data.y_train)
    expected = {}
    step = [0]
    steps_per_epoch = -(-30 // 7)

    def on_batch(m, ids):
        for sid, row in zip(ids.tolist(), per_sample_reference(m, xt[ids], yt[ids], cfg.lr)):
            expected[(step[0] // steps_per_epoch, sid)] = row
        step[0] += 1

    records = []
    fit(model, data, cfg, on_epoch=records.append, on_batch=on_batch)
    worst = max(float(np.max(np.abs(rec.importance[sid] - expected[(rec.epoch, sid)]) / expected[(rec.epoch, sid)]))
                for rec in records for sid in range(30))
    assert worst <= 1e-5, f"largest relative error of beta: {worst:.2e}"


def test_both_conv_norm_routes_agree():
    """The Gram route (few positions, wide layer) and the per-sample route of a convolution's
    per-sample norm give each sample's ||D_i U_i^T||^2 + ||D_i 1||^2."""
    from sample_importance.importance.rules import Call, rule_for

    def sample_sq_grad_norms(layer, a, dz):  # by the layer's registered rule
        return sum(rule_for(layer).sq_norms(layer, Call((a,), {}, [dz])).values())

    gen = torch.Generator().manual_seed(0)
    for c, side in ((3, 4), (16, 2)):  # P (O + K) against O K: per-sample, then Gram
        conv = torch.nn.Conv2d(c, 4 * c, 3, padding=1).double()
        a = torch.randn(5, c, side, side, generator=gen, dtype=torch.float64)
        dz = torch.randn(5, 4 * c, side, side, generator=gen, dtype=torch.float64)
        U = F.unfold(a, 3, padding=1)
        D = dz.flatten(2)
        direct = torch.bmm(D, U.transpose(1, 2)).square().sum((1, 2)) + D.sum(2).square().sum(1)
        torch.testing.assert_close(sample_sq_grad_norms(conv, a, dz), direct)
