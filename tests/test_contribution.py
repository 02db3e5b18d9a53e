"""In-run attribution: the recorder's contribution c_{i,d} = <dL_V/dtheta_d, phi_{i,d}> of each
sample to a target loss's first-order change over a step, against per-sample autograd (float64)."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sample_importance import ImportanceRecorder
from sample_importance.importance.optim import step_factors, step_kind

pytestmark = pytest.mark.usefixtures("float64")
B = 6


def reference(model: nn.Module, loss_fn, target_fn, rec: ImportanceRecorder, optimizer) -> torch.Tensor:
    """(B, L): sum over each column's parameters of <G_p, phi_ip>, phi_i = f * g_i / B, g_i from L_i
    backpropagated alone, G from the target loss, f the optimizer's factor on the batch gradient."""
    own = {id(p): n for n, p in rec.model.named_parameters()}
    named = dict(model.named_parameters())
    columns = [[named[own[id(p)]] for p in rec.layer_parameters(n)] for n in rec.layer_names]
    flat = [p for col in columns for p in col]
    G = torch.autograd.grad(target_fn(model), flat, allow_unused=True)
    G = {id(p): torch.zeros_like(p) if g is None else g for p, g in zip(flat, G)}
    loss_i = loss_fn(model)
    for p in model.parameters():
        p.grad = None
    loss_i.mean().backward(retain_graph=True)  # the batch gradient Adam's factor reads
    f = step_factors(optimizer, None, step_kind(optimizer), flat)
    out = torch.zeros(len(loss_i), len(columns))
    for i in range(len(loss_i)):
        gs = dict(zip(map(id, flat), torch.autograd.grad(loss_i[i], flat, retain_graph=True, allow_unused=True)))
        for d, col in enumerate(columns):
            for p in col:
                g = gs[id(p)]
                if g is not None and id(p) in f:
                    out[i, d] += (f[id(p)] * g / len(loss_i) * G[id(p)]).sum()
    return out


def check(model: nn.Module, x, y, target_x, target_y, kind: str = "sgd", steps: int = 1) -> None:
    twin = copy.deepcopy(model)
    make = {"sgd": lambda ps: torch.optim.SGD(ps, lr=0.3, weight_decay=1e-2),
            "momentum": lambda ps: torch.optim.SGD(ps, lr=0.3, momentum=0.9, nesterov=True),
            "adam": lambda ps: torch.optim.Adam(ps, lr=1e-2, weight_decay=1e-3)}[kind]
    opt, opt_twin = make(model.parameters()), make(twin.parameters())
    loss_fn = lambda m: F.cross_entropy(m(x), y, reduction="none")  # noqa: E731
    target_fn = lambda m: F.cross_entropy(m(target_x), target_y)  # noqa: E731
    with ImportanceRecorder(model) as rec:
        for step in range(steps):  # the last step with the optimizer's state
            target = rec.target_gradient(target_fn(model))
            opt.zero_grad()
            rec.backward(loss_fn(model), optimizer=opt, target=target)
            if step == steps - 1:
                opt_twin.zero_grad()
                expected = reference(twin, loss_fn, target_fn, rec, opt_twin)
            opt.step()
            opt_twin.zero_grad()
            loss_fn(twin).mean().backward()
            opt_twin.step()
        got = rec.contribution
    assert got.shape == expected.shape
    assert (expected.abs().amax(0) > 0).all(), "a layer without contribution tests nothing"
    rel = (got - expected).abs().amax(0) / expected.abs().amax(0)
    assert rel.max() <= 1e-6, dict(zip(rec.layer_names, rel.tolist()))


def labels(n, classes=3):
    return torch.arange(n) % classes


class Text(nn.Module):
    """Embedding (with padding), LayerNorm, self-attention, a linear layer over tokens, a fallback module."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(12, 8, padding_idx=0)
        self.norm = nn.LayerNorm(8)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.tokens = nn.Linear(8, 8)
        self.scale = Scale(8)
        self.out = nn.Linear(8, 3)

    def forward(self, t):
        h = self.norm(self.emb(t))
        h = h + self.attn(h, h, h, need_weights=False)[0]
        return self.out(self.scale(torch.tanh(self.tokens(h))).mean(1))


class Scale(nn.Module):
    """No rule of its own: the torch.func fallback."""

    def __init__(self, n):
        super().__init__()
        self.w = nn.Parameter(torch.linspace(0.5, 1.5, n))

    def forward(self, x):
        return x * self.w


def images():
    return nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.GroupNorm(2, 4), nn.ReLU(), nn.Flatten(), nn.Linear(64, 3))


@pytest.mark.parametrize("kind,steps", [("sgd", 1), ("momentum", 2), ("adam", 2)])
def test_every_rule_and_optimizer(kind, steps):
    torch.manual_seed(0)
    t = torch.randint(0, 12, (B, 5))
    t[0, 3:] = 0
    check(Text(), t, labels(B), torch.randint(1, 12, (4, 5)), labels(4), kind, steps)
    check(images(), torch.randn(B, 2, 4, 4), labels(B), torch.randn(4, 2, 4, 4), labels(4), kind, steps)


def test_huggingface_bert_with_its_broadcast_position_embeddings():
    tf = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = tf.BertForSequenceClassification(tf.BertConfig(
        vocab_size=30, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=16, num_labels=3, hidden_dropout_prob=0, attention_probs_dropout_prob=0))

    class Logits(nn.Module):
        def __init__(self):
            super().__init__()
            self.bert = model

        def forward(self, t):
            return self.bert(input_ids=t).logits

    check(Logits(), torch.randint(1, 30, (B, 7)), labels(B), torch.randint(1, 30, (3, 7)), labels(3), "adam", 2)


@pytest.mark.parametrize("kind", ["sgd", "adam"])
def test_k_stacked_targets_give_k_single_target_contributions_at_once(kind):
    """target_gradient of a (K,) vector of target losses stacks K gradients per parameter; one
    backward with them gives c (B, L, K), column k the contribution to target k alone (every rule's
    dot route with a target axis, the fallback, Adam's elementwise factor)."""
    torch.manual_seed(1)
    t = torch.randint(0, 12, (B, 5))
    for model, x, y, tx, ty in ((Text(), t, labels(B), torch.randint(1, 12, (3, 5)), labels(3)),
                                (images(), torch.randn(B, 2, 4, 4), labels(B), torch.randn(3, 2, 4, 4), labels(3))):
        make = (lambda ps: torch.optim.SGD(ps, lr=0.3, momentum=0.9)) if kind == "sgd" else \
            (lambda ps: torch.optim.Adam(ps, lr=1e-2))
        opt = make(model.parameters())
        with ImportanceRecorder(model) as rec:  # a first step: momentum's and Adam's state in the factor
            opt.zero_grad()
            rec.backward(F.cross_entropy(model(x), y, reduction="none"), optimizer=opt)
            opt.step()

        def second_step(targets):
            """The second step of a copy of the model and optimizer, with target=targets(recorder, copy)."""
            twin = copy.deepcopy(model)
            twin_opt = make(twin.parameters())
            twin_opt.load_state_dict(opt.state_dict())
            with ImportanceRecorder(twin) as r:
                target = targets(r, twin)
                twin_opt.zero_grad()
                beta = r.backward(F.cross_entropy(twin(x), y, reduction="none"), optimizer=twin_opt, target=target)
                return target, r.contribution, beta

        _, _, beta = second_step(lambda r, m: None)
        stacked, got, beta_stacked = second_step(
            lambda r, m: r.target_gradient(F.cross_entropy(m(tx), ty, reduction="none")))
        singles = []
        for k in range(len(ty)):
            one, c, beta_one = second_step(lambda r, m: r.target_gradient(F.cross_entropy(m(tx[k:k + 1]), ty[k:k + 1])))
            for b in (beta_one, beta_stacked):  # a target changes nothing of beta
                torch.testing.assert_close(b, beta, rtol=1e-12, atol=0)
            for a, b in zip(stacked.values(), one.values()):  # the same parameters, in the same order
                torch.testing.assert_close(a[k], b, rtol=1e-12, atol=1e-14)
            singles.append(c)
        assert got.shape == (B, len(singles[0][0]), len(ty))
        torch.testing.assert_close(got, torch.stack(singles, dim=2), rtol=1e-10, atol=1e-15)
        assert (got.abs().amax((0, 2)) > 0).all()
    rec_model = images()
    with pytest.raises(Exception, match="gradients of their shapes"), ImportanceRecorder(rec_model) as rec:
        rec.backward(F.cross_entropy(rec_model(torch.randn(B, 2, 4, 4)), labels(B), reduction="none"), lr=0.1,
                     target={p: torch.zeros(2, 3, *p.shape) for p in rec_model.parameters()})


def test_the_contributions_sum_to_the_first_order_change_of_the_target_loss():
    """Plain SGD with weight decay: sum over samples and layers of c, plus the weight decay's part
    <G, -lr wd theta>, is <G, delta theta> (to rounding); at a small learning rate it explains the
    actual change of L_V within 1%."""
    torch.manual_seed(0)
    model = images()
    x, y, tx, ty = torch.randn(B, 2, 4, 4), labels(B), torch.randn(8, 2, 4, 4), labels(8)
    lr, wd = 2e-4, 1e-2
    opt = torch.optim.SGD(model.parameters(), lr=lr, weight_decay=wd)
    target_fn = lambda: F.cross_entropy(model(tx), ty)  # noqa: E731
    with ImportanceRecorder(model) as rec:
        target = rec.target_gradient(target_fn())
        before = [p.detach().clone() for p in model.parameters()]
        opt.zero_grad()
        rec.backward(F.cross_entropy(model(x), y, reduction="none"), optimizer=opt, target=target)
        decay = sum((target[p] * (-lr * wd) * p.detach()).sum() for p in model.parameters())
        lv = target_fn().item()
        opt.step()
        change = target_fn().item() - lv
    first_order = sum((target[p] * (p.detach() - q)).sum() for p, q in zip(model.parameters(), before))
    explained = rec.contribution.sum() + decay
    assert abs(explained - first_order) <= 1e-10 * abs(first_order)
    assert abs(explained - change) <= 1e-2 * abs(change)


def test_an_own_loop_records_contributions_that_scores_and_explore_read(tracking):
    """track_run(contribution=...): contribution.npy (E, n, L) holds each step's c, the epoch's metric
    its sum, and `scores` ranks by the total."""
    import numpy as np
    from sklearn.datasets import load_digits

    import sample_importance
    from sample_importance import config as C
    from sample_importance.stages.scores import run as run_scores

    torch.set_default_dtype(torch.float32)
    digits = load_digits()
    x = torch.tensor(digits.data[:60] / 16.0, dtype=torch.float32)
    y = torch.tensor(digits.target[:60])
    vx, vy = torch.tensor(digits.data[60:100] / 16.0, dtype=torch.float32), torch.tensor(digits.target[60:100])
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 16), nn.Tanh(), nn.Linear(16, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    steps = []
    with sample_importance.track_run(model, labels=y, epochs=2, batch_size=20, optimizer=opt, dataset="digits",
                                     contribution="40 held-out digits") as run:
        for _ in range(2):
            for b in torch.randperm(60).split(20):
                target = run.recorder.target_gradient(F.cross_entropy(model(vx), vy))
                opt.zero_grad()
                logits = model(x[b])
                loss_i = F.cross_entropy(logits, y[b], reduction="none")
                beta = run.recorder.backward(loss_i, optimizer=opt, target=target)
                steps.append((b, run.recorder.contribution.clone()))
                opt.step()
                run.record(b, beta, loss_i, logits, contribution=run.recorder.contribution)
            run.end_epoch()
        with torch.no_grad():
            run.record_final_loss(torch.arange(60), F.cross_entropy(model(x), y, reduction="none"))
    d = sample_importance.load_dynamics(run.run_id)
    assert d.contribution.shape == (2, 60, 2) and d.metadata["target"] == "40 held-out digits"
    for k, (b, c) in enumerate(steps):
        np.testing.assert_allclose(np.asarray(d.contribution[k // 3])[b.numpy()], c.numpy(), rtol=1e-6)
    metric = mlflow_metric(run.run_id, "contribution_total")
    assert abs(metric - float(np.asarray(d.contribution[-1], np.float64).sum())) <= 1e-6 * abs(metric)
    scores_id = run_scores(C.ScoresConfig(train_run_ids=run.run_id, train="epochs=2 early_epoch=1"))
    import mlflow
    table = mlflow.artifacts.load_text(f"runs:/{scores_id}/scores.csv").splitlines()
    header = table[0].split(",")
    assert "contribution_total" in header and "contribution_0" in header


def mlflow_metric(run_id: str, name: str) -> float:
    from mlflow.tracking import MlflowClient

    return MlflowClient().get_run(run_id).data.metrics[name]
