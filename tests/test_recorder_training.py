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


pytestmark = pytest.mark.usefixtures("float64")


def small() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.GroupNorm(2, 4), nn.ReLU(), nn.Flatten(), nn.Linear(64, 8),
                         nn.Tanh(), nn.Linear(8, 3))


_gen = torch.Generator().manual_seed(0)  # seeded: a test draws the same data on every run
X, Y = torch.randn(32, 3, 6, 6, dtype=torch.float64, generator=_gen), torch.randint(0, 3, (32,), generator=_gen)


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


class Encoder(nn.Module):
    """Token embeddings, a Transformer encoder layer, a LayerNorm and a linear head."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(30, 32)
        self.enc = nn.TransformerEncoderLayer(32, 4, 64, dropout=0, batch_first=True)
        self.norm, self.out = nn.LayerNorm(32), nn.Linear(32, 3)

    def forward(self, tokens):
        return self.out(self.norm(self.enc(self.emb(tokens))).mean(1))


def reference(model: nn.Module, loss_i: torch.Tensor, rec: ImportanceRecorder, lr: float) -> torch.Tensor:
    """(lr / B)^2 ||dL_i/dp||^2 per column, each L_i of this forward backpropagated alone, in float32."""
    named = dict(model.named_parameters())
    own = {id(p): n for n, p in rec.model.named_parameters()}
    columns = [[named[own[id(p)]] for p in rec.layer_parameters(n)] for n in rec.layer_names]
    flat = [p for c in columns for p in c]
    out = torch.zeros(len(loss_i), len(columns), dtype=torch.float32)
    for i in range(len(loss_i)):
        grads = dict(zip(map(id, flat), torch.autograd.grad(loss_i[i], flat, retain_graph=True)))
        for d, c in enumerate(columns):
            out[i, d] = sum(grads[id(p)].float().square().sum() for p in c) * (lr / len(loss_i)) ** 2
    return out


@pytest.mark.parametrize("name", ["cnn", "encoder"])
def test_bfloat16_autocast_against_the_same_autocast_forward(name):
    """beta under torch.autocast(bfloat16) on the CPU against per-sample autograd through the same
    autocast forward, in float32: within 1e-2 relative per column (the rules read the bfloat16
    tensors in float32; the reference's per-sample backward runs in bfloat16; measured <= 2e-3)."""
    torch.set_default_dtype(torch.float32)
    torch.manual_seed(0)  # float16's error depends on the draw: the same one every run
    model = small() if name == "cnn" else Encoder()
    x = X.float()[:16] if name == "cnn" else torch.randint(0, 30, (16, 10))
    twin = copy.deepcopy(model)
    with ImportanceRecorder(model) as rec:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss_i = loss_of(model, x, Y[:16])
        beta = rec.backward(loss_i, lr=0.1)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            expected = reference(twin, loss_of(twin, x, Y[:16]), rec, 0.1)
    assert beta.dtype == torch.float32
    assert ((beta - expected).abs().amax(0) / expected.amax(0)).max() <= 1e-2


def test_float16_with_a_grad_scaler_is_the_unscaled_step():
    """torch.amp.GradScaler (float16 autocast, here on the CPU), SGD with momentum: the loss scale is
    divided out of beta; beta against the float32 step within 1e-2, on two steps."""
    torch.set_default_dtype(torch.float32)
    model = small()
    twin = copy.deepcopy(model)
    x, y = X.float()[:16], Y[:16]
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12)
    with ImportanceRecorder(model) as rec, ImportanceRecorder(twin) as full:
        opt, opt_full = (torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) for m in (model, twin))
        for _ in range(2):  # the second step with a momentum buffer
            opt.zero_grad()
            opt_full.zero_grad()
            with torch.autocast("cpu", dtype=torch.float16):
                loss_i = loss_of(model, x, y)
            beta = rec.backward(loss_i, optimizer=opt, scaler=scaler)
            expected = full.backward(loss_of(twin, x, y), optimizer=opt_full)
            assert not rec.skipped
            assert ((beta - expected).abs().amax(0) / expected.amax(0)).max() <= 1e-2
            scaler.step(opt)
            scaler.update()
            opt_full.step()


def test_adam_reads_the_unscaled_gradient_under_a_grad_scaler():
    """Adam's factor is nonlinear in the gradient, so it must read .grad with the scale divided out:
    two scales (powers of two: the float16 pass is the same but for the scale, where nothing
    overflows or underflows) give the same beta, on the second step."""
    torch.set_default_dtype(torch.float32)
    betas = []
    for scale in (2.0 ** 8, 2.0 ** 14):
        torch.manual_seed(1)
        model = small()
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        scaler = torch.amp.GradScaler("cpu", init_scale=scale, growth_interval=1000)
        with ImportanceRecorder(model) as rec:
            for _ in range(2):
                opt.zero_grad()
                with torch.autocast("cpu", dtype=torch.float16):
                    loss_i = loss_of(model, X.float()[:16], Y[:16])
                beta = rec.backward(loss_i, optimizer=opt, scaler=scaler)
                scaler.step(opt)
                scaler.update()
        betas.append(beta)
    assert (betas[0].amax(0) > 0).all()
    torch.testing.assert_close(betas[1], betas[0], rtol=1e-4, atol=0)


def test_a_step_the_grad_scaler_skips_records_zeros_and_is_flagged():
    torch.set_default_dtype(torch.float32)
    model = small()
    before = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 120)  # float16 gradients overflow
    with ImportanceRecorder(model) as rec:
        with torch.autocast("cpu", dtype=torch.float16):
            loss_i = loss_of(model, X.float()[:8], Y[:8])
        beta = rec.backward(loss_i, optimizer=opt, scaler=scaler)
        assert rec.skipped and beta.shape == (8, 4) and not beta.any()
        scaler.step(opt)
        scaler.update()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))  # the scaler did skip it
    assert scaler.get_scale() < 2.0 ** 120


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_mixed_precision_on_a_cuda_device(dtype):
    """On the GPU: float16 with a GradScaler and bfloat16 without, against the float32 step within
    1e-2 (as on the CPU)."""
    torch.set_default_dtype(torch.float32)
    model = small().cuda()
    twin = copy.deepcopy(model)
    x, y = X.float()[:16].cuda(), Y[:16].cuda()
    scaler = torch.amp.GradScaler("cuda") if dtype == "float16" else None
    with ImportanceRecorder(model) as rec, ImportanceRecorder(twin) as full:
        opt, opt_full = (torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) for m in (model, twin))
        with torch.autocast("cuda", dtype=getattr(torch, dtype)):
            loss_i = loss_of(model, x, y)
        beta = rec.backward(loss_i, optimizer=opt, scaler=scaler)
        expected = full.backward(loss_of(twin, x, y), optimizer=opt_full)
    assert not rec.skipped
    assert ((beta - expected).abs().amax(0) / expected.amax(0)).max() <= 1e-2
