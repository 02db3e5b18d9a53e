"""The recorder in the ways researchers train: gradient accumulation, torch.compile (float64 unless
said otherwise)."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sample_importance import ImportanceRecorder
from sample_importance.errors import UserError


@pytest.fixture(autouse=True)
def _float64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    torch.manual_seed(0)
    yield
    torch.set_default_dtype(old)


def small() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.GroupNorm(2, 4), nn.ReLU(), nn.Flatten(), nn.Linear(64, 8),
                         nn.Tanh(), nn.Linear(8, 3))


X, Y = torch.randn(32, 3, 6, 6, dtype=torch.float64), torch.randint(0, 3, (32,))


def loss_of(model, x, y):
    return F.cross_entropy(model(x), y, reduction="none")


@pytest.mark.parametrize("momentum,nesterov", [(0.0, False), (0.9, False), (0.9, True)])
def test_four_micro_batches_of_8_are_one_batch_of_32(momentum, nesterov):
    """beta, .grad and the step itself, on the first step and on one with a momentum buffer."""
    whole = small()
    parts = copy.deepcopy(whole)
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.2, momentum=momentum, nesterov=nesterov, weight_decay=1e-3)
                  for m in (whole, parts)]
    recorders = [ImportanceRecorder(m) for m in (whole, parts)]
    for _ in range(2):
        for opt in optimizers:
            opt.zero_grad()
        expected = recorders[0].backward(loss_of(whole, X, Y), optimizer=optimizers[0])
        got = torch.cat([recorders[1].backward(loss_of(parts, X[k:k + 8], Y[k:k + 8]), optimizer=optimizers[1],
                                               batch_size=32) for k in range(0, 32, 8)])
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=0)
        for p, q in zip(whole.parameters(), parts.parameters()):
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-12, atol=1e-15)
        for opt in optimizers:
            opt.step()
    for p, q in zip(whole.parameters(), parts.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("kind", [torch.optim.Adam, torch.optim.AdamW])
def test_micro_batches_under_adam_are_refused_with_the_reason(kind):
    model = small()
    with ImportanceRecorder(model) as rec, pytest.raises(UserError, match="gradient accumulation with Adam"):
        rec.backward(loss_of(model, X[:8], Y[:8]), optimizer=kind(model.parameters(), lr=1e-3), batch_size=32)
    opt = kind(model.parameters(), lr=1e-3)
    with ImportanceRecorder(model) as rec:
        opt.zero_grad()
        rec.backward(loss_of(model, X[:8], Y[:8]), optimizer=opt)  # one batch per step: recorded
        with pytest.raises(UserError, match="does not record gradient accumulation with Adam"):
            rec.backward(loss_of(model, X[8:16], Y[8:16]), optimizer=opt)  # a second one before the step
        opt.step()
        opt.zero_grad()
        assert rec.backward(loss_of(model, X[:8], Y[:8]), optimizer=opt).shape == (8, 4)


def test_torch_compile_is_refused_with_one_sentence():
    """torch.compile fuses the modules' calls out of the hooks' sight: a compiled model, or the
    recorded model run through a compiled wrapper, is refused (never a silently wrong number)."""
    model = small()
    with pytest.raises(UserError, match="torch.compile"):
        ImportanceRecorder(torch.compile(model))
    compiled = torch.compile(model)
    with ImportanceRecorder(model) as rec, pytest.raises(UserError, match="torch.compile"):
        rec.backward(loss_of(compiled, X[:4], Y[:4]), lr=0.1)
