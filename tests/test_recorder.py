"""ImportanceRecorder against per-sample gradients taken one sample at a time (float64).

The reference backpropagates each sample's loss L_i from the same batch forward pass with plain
autograd and squares (lr / B) g_i per layer; the optimizer factors are checked separately by
finite differences of the actual torch.optim step in the sample weight v_i.
"""
from __future__ import annotations

import contextlib
import copy
import gc
import warnings
import weakref

import pytest
import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from sample_importance import ImportanceRecorder
from sample_importance.errors import UserError
from sample_importance.importance import rules
from sample_importance.importance.rules import RULES

LR = 0.3


@pytest.fixture(autouse=True)
def _float64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def reference_beta(model: nn.Module, loss_fn, recorder: ImportanceRecorder, lr: float = LR) -> torch.Tensor:
    """(B, L): (lr / B)^2 ||dL_i/d theta_d||^2, L_i backpropagated alone from one batch forward."""
    loss_i = loss_fn(model)
    B = loss_i.shape[0]
    layers = []
    for name in recorder.layer_names:  # a layer's own parameters (attention: with its out_proj)
        module = model.get_submodule(name) if name != "_root" else model
        own = module.parameters(recurse=isinstance(module, nn.MultiheadAttention))
        layers.append([p for p in own if p.requires_grad])
    params = [p for ps in layers for p in ps]
    out = torch.zeros(B, len(layers))
    for i in range(B):  # sample i's own loss, backpropagated alone from the batch forward
        gs = torch.autograd.grad(loss_i[i], params, retain_graph=True, allow_unused=True)
        sq = {id(p): torch.zeros(()) if g is None else g.square().sum() for p, g in zip(params, gs)}
        for d, ps in enumerate(layers):
            out[i, d] = sum(sq[id(p)] for p in ps) * (lr / B) ** 2
    return out


@contextlib.contextmanager
def materialised():
    """Every rule without its squared-norm shortcuts: beta from the per-sample gradients `grads`."""
    saved = {t: (r.sq_norms, r.weighted_sq_norms) for t, r in RULES.items()}
    for r in RULES.values():
        r.sq_norms = r.weighted_sq_norms = None
    try:
        yield
    finally:
        for t, (n, w) in saved.items():
            RULES[t].sq_norms, RULES[t].weighted_sq_norms = n, w


def check(model: nn.Module, loss_fn, expect_fallback: bool = False, **kw) -> ImportanceRecorder:
    """Recorder vs reference (rel. error <= 1e-6 per layer, every layer non-zero); .grad as loss.mean().
    Both routes of every rule: the squared-norm shortcut and the materialised per-sample gradients."""
    original = copy.deepcopy(model)
    with materialised():
        _check(copy.deepcopy(original), loss_fn, expect_fallback, **kw)
    return _check(model, loss_fn, expect_fallback, **kw)


def _check(model: nn.Module, loss_fn, expect_fallback: bool = False, **kw) -> ImportanceRecorder:
    twin = copy.deepcopy(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rec = ImportanceRecorder(model, **kw)
    assert any("fallback" in str(w.message) for w in caught) == expect_fallback
    beta = rec.backward(loss_fn(model), lr=LR)
    expected = reference_beta(twin, loss_fn, rec)
    assert beta.shape == expected.shape
    assert (expected.amax(0) > 0).all(), "a layer without importance tests nothing"
    rel = ((beta - expected).abs().amax(0) / expected.abs().amax(0))
    assert rel.max() <= 1e-6, dict(zip(rec.layer_names, rel.tolist()))
    twin.zero_grad()
    loss_fn(twin).mean().backward()
    for (n, p), q in zip(model.named_parameters(), twin.parameters()):
        assert (p.grad is None) == (q.grad is None), n
        if p.grad is not None:
            assert torch.allclose(p.grad, q.grad, rtol=1e-12, atol=1e-14), n
    rec.close()
    return rec


def ce(x, y):
    return lambda m: F.cross_entropy(m(x), y, reduction="none")


B = 5
Y = torch.tensor([0, 2, 1, 2, 0])


class Head(nn.Module):
    """A module under test followed by a flatten and a linear classifier to 3 classes."""

    def __init__(self, body: nn.Module, features: int, pre=None):
        super().__init__()
        self.body, self.out, self.pre = body, nn.Linear(features, 3), pre

    def forward(self, x):
        h = self.body(x)
        if self.pre is not None:
            h = self.pre(h)
        return self.out(torch.tanh(h).flatten(1))


def seeded(seed=0):
    torch.manual_seed(seed)


def test_linear_flat_and_sequence():
    seeded()
    check(Head(nn.Linear(4, 6), 6), ce(torch.randn(B, 4), Y))
    seeded(1)
    check(Head(nn.Linear(4, 6), 7 * 6), ce(torch.randn(B, 7, 4), Y))  # per-token: sum_t d_t a_t^T
    seeded(2)
    check(Head(nn.Linear(40, 30), 2 * 3 * 30), ce(torch.randn(B, 2, 3, 40), Y))  # outer-product route
    seeded(3)
    check(Head(nn.Linear(4, 6, bias=False), 9 * 6), ce(torch.randn(B, 9, 4), Y))


@pytest.mark.parametrize("conv, shape", [
    (lambda: nn.Conv1d(3, 4, 3, stride=2, padding=1, dilation=2), (B, 3, 11)),
    (lambda: nn.Conv2d(3, 4, 3, padding=1), (B, 3, 6, 6)),
    (lambda: nn.Conv2d(4, 6, 3, stride=2, groups=2), (B, 4, 7, 7)),
    (lambda: nn.Conv2d(4, 8, 3, groups=4, padding=2, dilation=2), (B, 4, 6, 6)),  # depthwise (x2)
    (lambda: nn.Conv2d(3, 4, (3, 2), padding="same", padding_mode="reflect"), (B, 3, 5, 6)),
    (lambda: nn.Conv3d(2, 3, 2, stride=(1, 2, 1), padding=(1, 0, 1)), (B, 2, 4, 5, 3)),
    (lambda: nn.Conv3d(3, 3, 3, groups=3, padding="same", bias=False), (B, 3, 4, 4, 4)),
])
def test_convolutions(conv, shape):
    seeded()
    body = conv()
    features = body(torch.randn(*shape)).flatten(1).shape[1]
    check(Head(body, features), ce(torch.randn(*shape), Y))


@pytest.mark.parametrize("conv, shape", [
    (lambda: nn.Conv2d(8, 16, 3), (B, 8, 4, 4)),
    (lambda: nn.Conv2d(8, 16, 3, stride=2, padding=2, dilation=2), (B, 8, 5, 5)),
    (lambda: nn.Conv2d(8, 12, 3, padding=1, padding_mode="reflect", bias=False), (B, 8, 3, 3)),
])
def test_convolutions_on_few_positions_take_the_gram_route(conv, shape, monkeypatch):
    """Wide layers on small maps (P (O + K) < O K): the Gram route of the unfolded patches, without
    per-sample gradients (the fused backward then leaves the weight gradient to autograd)."""
    taken = []
    unfold = F.unfold
    monkeypatch.setattr(F, "unfold", lambda *a, **k: taken.append(1) or unfold(*a, **k))
    seeded()
    body = conv()
    features = body(torch.randn(*shape)).flatten(1).shape[1]
    check(Head(body, features), ce(torch.randn(*shape), Y))
    assert taken


@pytest.mark.parametrize("samples_per_piece", [1, 2])
def test_convolutions_a_few_samples_at_a_time(samples_per_piece, monkeypatch):
    """The norm route takes the batch in pieces (CHUNK_ELEMENTS): one sample a piece, and two (the
    last piece shorter), give the same beta as the reference."""
    conv = nn.Conv2d(2, 4, 3, stride=2, padding=1, groups=2)
    x = torch.randn(B, 2, 7, 7)
    per_sample = x[0].numel() + conv(x)[0].numel() + conv.weight.numel()
    monkeypatch.setattr(rules.conv, "CHUNK_ELEMENTS", samples_per_piece * per_sample)
    pieces = []
    slice_weight = rules.conv._per_sample_conv_weight
    monkeypatch.setattr(rules.conv, "_per_sample_conv_weight",
                        lambda x, *a: pieces.append(len(x)) or slice_weight(x, *a))
    seeded()
    check(Head(conv, conv(x).flatten(1).shape[1]), ce(x, Y))
    n = samples_per_piece  # the norm route's pieces among the calls (the materialised route takes all B)
    expected = [n] * (B // n) + ([B % n] if B % n else [])
    assert any(pieces[i:i + len(expected)] == expected for i in range(len(pieces))), pieces


def test_fused_convolutions_give_the_batch_gradient_from_the_per_sample_ones(monkeypatch):
    """In recorder.backward a convolution's backward sums the per-sample weight gradients it takes
    for beta into the weight's gradient and skips the batch's own (`rules.FusedConv`); elsewhere
    (the user's own backward passes, a gradient penalty's double backward) it is the plain
    convolution backward, and a forward that fails leaves nothing behind."""
    seeded()
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Tanh(), nn.Conv2d(4, 4, 3, stride=2), nn.Flatten(),
                          nn.Linear(16, 3))
    twin = copy.deepcopy(model)
    x = torch.randn(B, 3, 6, 6)
    masks = []
    backward = torch.ops.aten.convolution_backward
    monkeypatch.setattr(torch.ops.aten, "convolution_backward", lambda *a: masks.append(a[-1]) or backward(*a))
    rec = ImportanceRecorder(model)
    beta = rec.backward(ce(x, Y)(model), lr=LR)
    assert torch.allclose(beta, reference_beta(twin, ce(x, Y), rec), rtol=1e-10)
    assert [m for m in masks if m[0] or m[2]] == [[True, False, True], [False, False, True]]  # no weight gradient
    F.cross_entropy(twin(x), Y).backward()
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.allclose(p.grad, q.grad, rtol=1e-12, atol=1e-14)

    for m in (model, twin):  # the user's own passes: a gradient penalty, backpropagated twice
        m.zero_grad()
        loss = F.cross_entropy(m(x), Y)
        grads = torch.autograd.grad(loss, list(m.parameters()), create_graph=True)
        (loss + sum(g.square().sum() for g in grads)).backward()
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.allclose(p.grad, q.grad, rtol=1e-12, atol=1e-14)

    with pytest.raises(RuntimeError):  # the wrong number of channels: the convolution itself fails
        model(torch.randn(B, 2, 6, 6))
    assert torch._C._len_torch_function_stack() == 0
    model.zero_grad()
    beta = rec.backward(ce(x, Y)(model), lr=LR)
    assert torch.allclose(beta, reference_beta(twin, ce(x, Y), rec), rtol=1e-10)
    rec.close()


def test_embedding_with_padding_index():
    seeded()
    idx = torch.tensor([[1, 2, 1, 0], [0, 0, 3, 3], [4, 1, 2, 3], [2, 2, 2, 2], [0, 4, 4, 1]])
    model = Head(nn.Embedding(5, 3, padding_idx=0), 4 * 3)
    check(model, ce(idx, Y))
    seeded(1)
    check(Head(nn.Embedding(5, 3), 4 * 3), ce(idx, Y))


@pytest.mark.parametrize("norm, shape", [
    (lambda: nn.LayerNorm(4), (B, 3, 4)),
    (lambda: nn.LayerNorm((3, 4)), (B, 3, 4)),
    (lambda: nn.GroupNorm(2, 4), (B, 4, 3, 3)),
    (lambda: nn.InstanceNorm2d(3, affine=True), (B, 3, 4, 4)),
    (lambda: nn.InstanceNorm1d(3, affine=True, track_running_stats=True), (B, 3, 6)),
    (lambda: nn.BatchNorm2d(3).eval(), (B, 3, 4, 4)),
    (lambda: nn.BatchNorm1d(3).eval(), (B, 3)),
])
def test_normalisation_layers(norm, shape):
    seeded()
    body = norm()
    with torch.no_grad():  # non-trivial affine parameters and running statistics
        for name, t in list(body.named_parameters()) + list(body.named_buffers()):
            if t.is_floating_point():
                t.copy_(torch.rand_like(t) + 0.5)
    pre = nn.Linear(shape[-1], shape[-1])  # something before it, so its input is not the data
    model = Head(nn.Sequential(pre, body), int(torch.tensor(shape[1:]).prod()))
    check(model, ce(torch.randn(*shape), Y))


@pytest.mark.parametrize("saved", [True, False])
def test_group_norm_channels_last_frozen_bias_with_and_without_its_saved_statistics(saved, monkeypatch):
    """GroupNorm after a convolution, in channels_last memory format, with a frozen bias (the kernel
    asked for the weight's gradients only); its statistics read off its autograd node
    (`group_norm_saved`), and recomputed where that node is not the one the rule knows."""
    seeded()
    read = []
    rule = RULES[nn.GroupNorm]
    original = rule.saved
    monkeypatch.setattr(rule, "saved", lambda m, out: read.append(original(m, out) if saved else None) or read[-1])
    norm = nn.GroupNorm(3, 6)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(6) + 0.5)
        norm.bias.copy_(torch.rand(6))
    norm.bias.requires_grad_(False)
    body = nn.Sequential(nn.Conv2d(2, 6, 3, padding=1), norm).to(memory_format=torch.channels_last)
    x = torch.randn(B, 2, 4, 4).to(memory_format=torch.channels_last)
    rec = check(Head(body, 6 * 4 * 4), ce(x, Y))
    assert rec.layer_names == ["body.0", "body.1", "out"]
    assert read and all((r is not None) == saved for r in read)
    if saved:
        assert read[-1]["mean"].shape == (B, 3)


class Attention(nn.Module):
    def __init__(self, batch_first: bool, kdim=None, use_weights=False, dropout=0.0):
        super().__init__()
        self.attn = nn.MultiheadAttention(6, 2, batch_first=batch_first, kdim=kdim, vdim=kdim, dropout=dropout)
        self.batch_first, self.use_weights = batch_first, use_weights
        self.out = nn.Linear(6, 3)

    def forward(self, x, kv, kpm, mask):
        same = kv is x
        if not self.batch_first:
            x, kv = x.transpose(0, 1), kv.transpose(0, 1)
        if same:  # self-attention: one tensor as query, key and value
            kv = x
        h, w = self.attn(x, kv, kv, key_padding_mask=kpm, attn_mask=mask, need_weights=self.use_weights)
        if not self.batch_first:
            h = h.transpose(0, 1)
        logits = self.out(h.mean(1))
        if self.use_weights:
            logits = logits + w.sum((1, 2)).unsqueeze(1) * torch.arange(3.0) + w[:, 0, :3]
        return logits


@pytest.mark.parametrize("batch_first, kdim, use_weights, float_mask, self_attention, dropout", [
    (True, None, False, False, False, 0.0), (False, None, False, True, False, 0.0), (True, 4, True, False, False, 0.0),
    (True, None, False, True, True, 0.0), (False, None, True, False, True, 0.0), (True, None, False, False, True, 0.3)])
def test_multihead_attention_with_masks(batch_first, kdim, use_weights, float_mask, self_attention, dropout,
                                        monkeypatch):
    """Cross-attention: the rule recomputes the attention from the captured inputs. Self-attention:
    the gradient at the packed projection and the context come from the module's own pass
    (`attention_inner`), which also makes attention dropout exact (the pass's own mask)."""
    seeded()
    model = Attention(batch_first, kdim, use_weights, dropout)
    T = 4 if self_attention else 5
    x, kv = torch.randn(B, 4, 6), torch.randn(B, T, kdim or 6)
    kv = x if self_attention else kv
    kpm = torch.zeros(B, T, dtype=torch.bool)
    kpm[0, 3:] = True
    kpm[2, 1] = True
    mask = torch.triu(torch.ones(4, T, dtype=torch.bool), diagonal=2)
    if float_mask:
        mask = torch.zeros(4, T).masked_fill(mask, float("-inf")) + 0.1 * torch.randn(4, T)
    taken = []
    rule = RULES[nn.MultiheadAttention]
    monkeypatch.setattr(rule, "inner", lambda *a: taken.append(rules.attention_inner(*a)) or taken[-1])

    def loss(m):
        torch.manual_seed(3)  # the same dropout mask in every forward pass
        return F.cross_entropy(m(x, kv, kpm, mask), Y, reduction="none")

    rec = check(model, loss)
    assert rec.layer_names == ["attn", "out"]  # out_proj belongs to the attention layer
    assert taken and all(bool(t) == self_attention for t in taken)


def test_attention_dropout_is_refused_where_the_attention_is_recomputed():
    seeded()
    model = Attention(True, dropout=0.3)
    x, kv = torch.randn(B, 4, 6), torch.randn(B, 5, 6)
    with ImportanceRecorder(model) as rec, pytest.raises(UserError, match="dropout > 0"):
        rec.backward(F.cross_entropy(model(x, kv, None, None), Y, reduction="none"), lr=LR)


class Scaled(nn.Module):
    """No rule: owns parameters it uses itself and a child Linear (its own layer)."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.rand(4) + 0.5)
        self.shift = nn.Parameter(torch.randn(4))
        self.inner = nn.Linear(4, 4)

    def forward(self, x):
        return self.inner(x * self.scale + self.shift.square()) * self.scale.sum()


def test_fallback_exact_and_warned():
    seeded()
    model = Head(Scaled(), 4)
    rec = check(model, ce(torch.randn(B, 4), Y), expect_fallback=True)
    assert rec.layer_names == ["body", "body.inner", "out"]


class Branchy(nn.Module):
    """No rule, and a forward vmap cannot batch (control flow on a tensor's value)."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(4))

    def forward(self, x):
        return x * self.w if float(x.sum()) > -1e9 else x


def test_fallback_one_sample_at_a_time_where_vmap_cannot():
    seeded()
    check(Head(Branchy(), 4), ce(torch.randn(B, 4), Y), expect_fallback=True)


class Affine(nn.Module):
    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.rand(4) + 0.5)

    def forward(self, x):
        return x * self.scale


def test_a_rule_registered_by_the_user():
    from sample_importance.importance import register_rule

    @register_rule(Affine)
    def affine_grads(module, call):  # y = x * s: dL_i/ds = d_i * x_i
        return {"scale": call.g * call.x}

    try:
        seeded()
        check(Head(Affine(), 4), ce(torch.randn(B, 4), Y), expect_fallback=False)
    finally:
        del RULES[Affine]


def test_module_called_twice_and_tied_weights():
    seeded()

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)
            self.out = nn.Linear(4, 3)

        def forward(self, x):
            return self.out(torch.tanh(self.lin(torch.tanh(self.lin(x)))))

    check(Twice(), ce(torch.randn(B, 4), Y))


class TwoBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.bn1 = nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3)
        self.c2, self.bn2 = nn.Conv2d(3, 3, 3), nn.BatchNorm2d(3)
        self.out = nn.Linear(3 * 2 * 2, 3)

    def forward(self, x):
        h = torch.relu(self.bn1(self.c1(x)))
        return self.out(torch.relu(self.bn2(self.c2(h))).flatten(1))


def test_batchnorm_training_refused_by_default():
    seeded()
    model, x = TwoBN(), torch.randn(B, 2, 4, 4)
    rec = ImportanceRecorder(model)
    with pytest.raises(UserError, match="bn1, bn2.*batchnorm='exact'.*GroupNorm.*eval"):
        model(x)
    model.eval()
    rec.backward(F.cross_entropy(model(x), Y, reduction="none"), lr=LR)  # eval mode: a per-sample rule
    rec.close()


def check_coupled(model: nn.Module, x: torch.Tensor) -> tuple[ImportanceRecorder, nn.Module]:
    """batchnorm="exact" on a network whose BatchNorm uses batch statistics, against the reference;
    and not the per-sample rules' answer (the coupling matters). (recorder, the untouched twin)."""
    twin = copy.deepcopy(model)
    rec = ImportanceRecorder(model, batchnorm="exact")
    beta = rec.backward(F.cross_entropy(model(x), Y, reduction="none"), lr=LR)
    expected = reference_beta(twin, ce(x, Y), rec)
    assert ((beta - expected).abs().amax(0) / expected.amax(0)).max() <= 1e-6
    assert not torch.allclose(beta, reference_beta(copy.deepcopy(twin).eval(), ce(x, Y), rec), rtol=1e-3)
    return rec, twin


def test_batchnorm_training_exact():
    seeded()
    model, x = TwoBN(), torch.randn(B, 2, 4, 4)
    rec, twin = check_coupled(model, x)
    twin.zero_grad()
    F.cross_entropy(twin(x), Y, reduction="none").mean().backward()
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.allclose(p.grad, q.grad, rtol=1e-12, atol=1e-14)


class HiddenBN(nn.Module):
    """BatchNorm layers with no parameters to record: one without affine parameters between two
    linear layers, one frozen; and one on the data itself, before any parameter."""

    def __init__(self):
        super().__init__()
        self.inputs = nn.BatchNorm1d(4, affine=False)
        self.lin, self.plain = nn.Linear(4, 6), nn.BatchNorm1d(6, affine=False)
        self.mid, self.frozen = nn.Linear(6, 5), nn.BatchNorm1d(5).requires_grad_(False)
        self.out = nn.Linear(5, 3)

    def forward(self, x):
        h = torch.tanh(self.plain(self.lin(self.inputs(x))))
        return self.out(torch.tanh(self.frozen(self.mid(h))))


@pytest.mark.parametrize("coupling", ["plain", "frozen"])
def test_batchnorm_without_parameters_to_record_still_couples(coupling):
    """A BatchNorm in training mode couples the samples whether or not it has parameters of its own
    to record: refused by default (naming it), exact with batchnorm="exact". On the data, before any
    parameter, it does not couple them (each L_i depends on the parameters through sample i only)."""
    seeded()
    model, x = HiddenBN(), torch.randn(B, 4)
    (model.frozen if coupling == "plain" else model.plain).eval()
    rec = ImportanceRecorder(model)
    assert rec.layer_names == ["lin", "mid", "out"]
    with pytest.raises(UserError, match=f"batch statistics \\({coupling}\\).*batchnorm='exact'"):
        model(x)
    rec.close()
    check_coupled(model, x)[0].close()
    model.zero_grad(set_to_none=True)
    model.eval()
    model.inputs.train()  # only the data's BatchNorm uses batch statistics: the per-sample rules
    check(model, ce(x, Y))


def test_convolutions_fused_beside_batchnorm_in_eval_mode(monkeypatch):
    """With every BatchNorm in eval mode the convolutions take their fused backward (no batch weight
    gradient of their own); a BatchNorm in training mode turns it off for that pass (exact route)."""
    masks = []
    backward = torch.ops.aten.convolution_backward
    monkeypatch.setattr(torch.ops.aten, "convolution_backward", lambda *a: masks.append(a[-1]) or backward(*a))
    seeded()
    model, x = TwoBN().eval(), torch.randn(B, 2, 4, 4)
    with torch.no_grad():  # running statistics and affine parameters away from their defaults
        for bn in (model.bn1, model.bn2):
            bn.running_mean.normal_(0, 0.1), bn.running_var.uniform_(0.5, 1.5)
            bn.weight.uniform_(0.5, 1.5), bn.bias.uniform_(0, 0.5)
    check(model, ce(x, Y))
    assert masks and all(not m[1] for m in masks)  # no batch weight gradient: the fused route
    masks.clear()
    rec, _ = check_coupled(model.train(), x)
    assert masks == []  # autograd's own convolution backward (C++), not the fused one
    rec.close()


# ------------------------------------------------------------ optimizers: finite differences of the real step
class Small(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(2, 3, 3)
        self.norm = nn.LayerNorm(3)
        self.out = nn.Linear(3 * 4, 3)

    def forward(self, x):
        h = self.conv(x).transpose(1, 2)  # (B, 4, 3)
        return self.out(torch.tanh(self.norm(h)).flatten(1))


OPTIMIZERS = {
    "sgd": lambda p: torch.optim.SGD(p, lr=0.2, weight_decay=0.01),
    "momentum": lambda p: torch.optim.SGD(p, lr=0.2, momentum=0.9, dampening=0.3, weight_decay=0.01),
    "nesterov": lambda p: torch.optim.SGD(p, lr=0.2, momentum=0.8, nesterov=True),
    # eps large enough that the first step (nearly lr * sign(g)) has a derivative finite
    # differences can resolve; the formula does not depend on it
    "adam": lambda p: torch.optim.Adam(p, lr=0.01, weight_decay=0.05, eps=1e-3),
    "adamw": lambda p: torch.optim.AdamW(p, lr=0.01, weight_decay=0.05, eps=1e-3),
}


@pytest.mark.parametrize("kind", list(OPTIMIZERS))
@pytest.mark.parametrize("warmup", [0, 2])
def test_optimizer_beta_is_the_derivative_of_the_actual_step(kind, warmup):
    seeded()
    model = Small()
    opt = OPTIMIZERS[kind](model.parameters())
    xs = [torch.randn(B, 2, 6) for _ in range(warmup + 1)]
    for x in xs[:warmup]:  # optimizer state from earlier steps (momentum buffers, Adam moments)
        opt.zero_grad()
        F.cross_entropy(model(x), Y).backward()
        opt.step()
    x = xs[-1]

    def delta(v: torch.Tensor) -> list[torch.Tensor]:
        """delta theta per layer of one real optimizer step on the v-weighted mean loss."""
        m = copy.deepcopy(model)
        o = OPTIMIZERS[kind](m.parameters())
        o.load_state_dict(copy.deepcopy(opt.state_dict()))
        before = [p.detach().clone() for p in m.parameters()]
        o.zero_grad()
        (F.cross_entropy(m(x), Y, reduction="none") * v).mean().backward()
        o.step()
        return [p.detach() - b for p, b in zip(m.parameters(), before)]

    h = 1e-6
    expected = torch.zeros(B, 3)
    owner = [0, 0, 1, 1, 2, 2]  # conv, norm, out: weight and bias each
    for i in range(B):
        e = torch.zeros(B)
        e[i] = h
        plus, minus = delta(1 + e), delta(1 - e)
        for k, (a, b) in enumerate(zip(plus, minus)):
            expected[i, owner[k]] += ((a - b) / (2 * h)).square().sum()
    rec = ImportanceRecorder(model)
    opt.zero_grad()
    beta = rec.backward(F.cross_entropy(model(x), Y, reduction="none"), optimizer=opt)
    rel = (beta - expected).abs().amax(0) / expected.amax(0)
    assert rel.max() <= 1e-6, rel
    rec.close()


def test_bad_input_is_one_clear_sentence():
    seeded()
    model = Small()
    with pytest.raises(UserError, match="batchnorm="):
        ImportanceRecorder(model, batchnorm="approx")
    rec = ImportanceRecorder(model)
    loss_i = F.cross_entropy(model(torch.randn(B, 2, 6)), Y, reduction="none")
    with pytest.raises(UserError, match="exactly one of optimizer= or lr="):
        rec.backward(loss_i)
    with pytest.raises(UserError, match="RMSprop"):
        rec.backward(loss_i, optimizer=torch.optim.RMSprop(model.parameters()))
    with pytest.raises(UserError, match="per-sample losses"):
        rec.backward(loss_i.mean(), lr=0.1)
    with pytest.raises(UserError, match="groups must map exactly"):
        ImportanceRecorder(model, groups={"conv": "a"})
    rec.close()


def test_grouping_and_close():
    seeded()
    model = nn.Sequential(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4)), nn.Linear(4, 3))
    x = torch.randn(B, 4)
    with ImportanceRecorder(model, groups=1) as rec:
        assert rec.layer_names == ["0.0", "0.1", "1"] and rec.group_names == ["0", "1"]
        beta = rec.backward(ce(x, Y)(model), lr=LR)
        grouped = rec.grouped(beta)
        assert torch.allclose(grouped[:, 0], beta[:, 0] + beta[:, 1]) and torch.equal(grouped[:, 1], beta[:, 2])
        assert rec.grouping == {"0.0": "0", "0.1": "0", "1": "1"}
    assert all(not m._forward_hooks for m in model.modules())  # closed: no hooks left


# ------------------------------------------------------------ whole models
def test_torchvision_resnet18_with_group_norm():
    import torchvision

    seeded()
    model = torchvision.models.resnet18(num_classes=3, norm_layer=lambda c: nn.GroupNorm(4, c))
    x = torch.randn(3, 3, 8, 8)  # 20 convolutions, 20 GroupNorms, fc
    rec = check(model, ce(x, Y[:3]))
    assert len(rec.layer_names) == 41 and rec.layer_names[:3] == ["conv1", "bn1", "layer1.0.conv1"]


class TextClassifier(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(11, 8, padding_idx=0)
        layer = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.out = nn.Linear(8, 3)

    def forward(self, tokens):
        pad = tokens == 0
        h = self.encoder(self.embed(tokens), src_key_padding_mask=pad)  # (B, T, 8)
        keep = (~pad).unsqueeze(-1).to(h.dtype)
        return self.out((h * keep).sum(1) / keep.sum(1))


def test_transformer_encoder_classifier():
    seeded()
    tokens = torch.randint(1, 11, (B, 6))
    tokens[1, 4:] = 0
    tokens[3, 2:] = 0
    rec = check(TextClassifier(), ce(tokens, Y))
    assert rec.layer_names[:4] == ["embed", "encoder.layers.0.self_attn", "encoder.layers.0.linear1",
                                   "encoder.layers.0.linear2"]


def test_stacked_mlps_equal_the_recorder_on_each_model():
    """stacked.py keeps its batched kernels: the same beta and step as the recorder alone."""
    from sample_importance.stacked import StackedMLP
    from sample_importance.models import build_model

    models = [build_model(6, 3, 2, 5, seed).double() for seed in range(3)]
    alone = copy.deepcopy(models)
    lrs, wds = [0.3, 0.1, 0.2], [0.0, 0.01, 0.0]
    stack = StackedMLP(models, lrs, wds)
    x, y = torch.randn(3, B, 6), torch.randint(0, 3, (3, B))
    rec = stack.step(x, y)
    stack.write_back()
    for m, model in enumerate(alone):
        opt = torch.optim.SGD(model.parameters(), lr=lrs[m], weight_decay=wds[m])
        with ImportanceRecorder(model) as r:
            beta = r.backward(F.cross_entropy(model(x[m]), y[m], reduction="none"), lr=lrs[m])
        opt.step()
        torch.testing.assert_close(rec.importance[m], beta, rtol=1e-12, atol=0)
        for p, q in zip(models[m].parameters(), model.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-15)


def test_refusals_name_the_module():
    seeded()

    class Borrowed(nn.Module):  # uses another module's weight directly
        def __init__(self):
            super().__init__()
            self.lin, self.out = nn.Linear(4, 4), nn.Linear(4, 3)

        def forward(self, x):
            return self.out(F.linear(x, self.lin.weight))

    model = Borrowed()
    with ImportanceRecorder(model) as rec, pytest.raises(UserError, match="Parameters of lin received gradients"):
        rec.backward(ce(torch.randn(B, 4), Y)(model), lr=LR)

    model = nn.Sequential(nn.Linear(4, 3))
    with ImportanceRecorder(model) as rec, pytest.raises(UserError, match="batch of 5 samples on its first axis"):
        rec.backward(F.cross_entropy(model(torch.randn(3, B, 4)).transpose(0, 1).transpose(1, 2), Y.expand(3, B).T,
                                     reduction="none").sum(1), lr=LR)


def test_a_refusal_during_the_pass_comes_after_it_with_grad_complete():
    """Layers' beta is taken as their output gradients arrive; a rule that refuses its module (here
    an embedding scaling by the batch's token counts) is said once the pass is over, and .grad
    then holds what loss_i.mean().backward() gives."""
    seeded()
    model = nn.Sequential(nn.Embedding(7, 4, scale_grad_by_freq=True), nn.Flatten(), nn.Linear(12, 3))
    tokens = torch.randint(0, 7, (B, 3))
    expected = {n: g for n, g in zip(["0.weight", "2.weight", "2.bias"], torch.autograd.grad(
        F.cross_entropy(model(tokens), Y), list(model.parameters())))}
    for p in model.parameters():
        p.grad = None
    with ImportanceRecorder(model) as rec, pytest.raises(UserError, match="scale_grad_by_freq=False"):
        rec.backward(F.cross_entropy(model(tokens), Y, reduction="none"), lr=LR)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, expected[n], rtol=0, atol=0)


def test_copies_of_a_recorded_model_do_not_record():
    import pickle

    seeded()
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 3))
    with ImportanceRecorder(model) as rec:
        twin = copy.deepcopy(model)
        again = pickle.loads(pickle.dumps(model))
        x = torch.randn(B, 4)
        twin_loss = ce(x, Y)(twin)  # runs the copy's (inert) hooks
        again(x)
        beta = rec.backward(ce(x, Y)(model), lr=LR)
        assert torch.allclose(beta, reference_beta(twin, ce(x, Y), rec), rtol=1e-10)
        twin_loss.mean().backward()  # the copy trains normally
        assert all(p.grad is not None for p in twin.parameters())


@pytest.mark.cuda
def test_on_a_cuda_device():
    """The same checks with model and data on the GPU (float64)."""
    seeded()
    tokens = torch.randint(1, 11, (B, 6), device="cuda")
    tokens[1, 4:] = 0
    check(TextClassifier().cuda(), ce(tokens, Y.cuda()))
    model, x = TwoBN().cuda(), torch.randn(B, 2, 4, 4, device="cuda")
    twin = copy.deepcopy(model)
    with ImportanceRecorder(model, batchnorm="exact", groups=1) as rec:
        beta = rec.backward(F.cross_entropy(model(x), Y.cuda(), reduction="none"), lr=LR)
        assert rec.grouped(beta).shape == (B, 5)
    expected = reference_beta(twin, ce(x, Y.cuda()), rec)
    assert ((beta - expected).abs().amax(0) / expected.amax(0)).max() <= 1e-6


class Checkpointed(nn.Module):
    """A convolution and a GroupNorm under activation checkpointing, then two linear layers."""

    def __init__(self, reentrant: bool):
        super().__init__()
        self.conv, self.norm = nn.Conv2d(2, 3, 3, padding=1), nn.GroupNorm(1, 3)
        self.hidden, self.out = nn.Linear(3 * 16, 8), nn.Linear(8, 3)
        self.reentrant = reentrant

    def block(self, x):
        return torch.tanh(self.norm(self.conv(x)))

    def forward(self, x):
        h = torch.utils.checkpoint.checkpoint(self.block, x, use_reentrant=self.reentrant)
        return self.out(torch.tanh(self.hidden(h.flatten(1))))


@pytest.mark.parametrize("reentrant", [False, True])
def test_activation_checkpointing(reentrant):
    """Layers recomputed in the backward pass (torch.utils.checkpoint, both implementations: the
    reentrant one records its calls during the pass). Reference: each L_i backpropagated alone from
    its own forward (the reentrant checkpoint does not support autograd.grad)."""
    seeded()
    model = Checkpointed(reentrant)
    twin = copy.deepcopy(model)
    x = torch.randn(B, 2, 4, 4, requires_grad=reentrant)  # the reentrant one needs an input with gradients
    rec = ImportanceRecorder(model)
    beta = rec.backward(ce(x, Y)(model), lr=LR)
    expected = torch.zeros(B, len(rec.layer_names))
    for i in range(B):
        twin.zero_grad()
        ce(x, Y)(twin)[i].backward()
        for d, name in enumerate(rec.layer_names):
            expected[i, d] = sum(p.grad.square().sum() for p in twin.get_submodule(name).parameters()) * (LR / B) ** 2
    assert rec.layer_names == ["conv", "norm", "hidden", "out"] and (expected.amax(0) > 0).all()
    assert ((beta - expected).abs().amax(0) / expected.amax(0)).max() <= 1e-6
    rec.close()


def test_passes_outside_recorder_backward_do_not_count():
    """A forward/backward of the user's own between steps (a probe, a gradient penalty) and a
    forward with no backward leave beta of the next recorded step unchanged."""
    seeded()
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 3))
    twin = copy.deepcopy(model)
    x, other = torch.randn(B, 4), torch.randn(B, 4)
    with ImportanceRecorder(model) as rec:
        F.cross_entropy(model(other), Y).backward()
        torch.autograd.grad(model(other).sum(), list(model.parameters()))
        model(other)
        model.zero_grad()
        beta = rec.backward(ce(x, Y)(model), lr=LR)
        expected = reference_beta(twin, ce(x, Y), rec)
    assert ((beta - expected).abs().amax(0) / expected.amax(0)).max() <= 1e-10


def test_forward_passes_without_recorder_backward_hold_nothing_once_dropped():
    """An evaluation with gradients enabled (no torch.no_grad) and no recorder.backward: once its
    graph is dropped, the recorder holds none of its inputs; a graph still alive at
    recorder.backward (its output kept by the user) does not enter beta either."""
    seeded()
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.Tanh(), nn.Flatten(), nn.Linear(12, 3))
    twin = copy.deepcopy(model)
    x = torch.randn(B, 2, 4, 4)
    with ImportanceRecorder(model) as rec:
        held = []
        for _ in range(3):
            inputs = torch.randn(2 * B, 2, 4, 4)
            held.append(weakref.ref(inputs.untyped_storage()))
            F.cross_entropy(model(inputs), torch.zeros(2 * B, dtype=torch.long))  # result dropped
            del inputs
        gc.collect()
        assert sum(r() is not None for r in held) == 0  # nothing of the three passes is left
        kept = model(torch.randn(2 * B, 2, 4, 4))  # alive (and with another batch size) at the step
        beta = rec.backward(ce(x, Y)(model), lr=LR)
        expected = reference_beta(twin, ce(x, Y), rec)
        del kept
    assert ((beta - expected).abs().amax(0) / expected.amax(0)).max() <= 1e-10


def test_a_parameter_used_outside_its_module_is_refused():
    """A layer whose weight another module uses directly (its own forward never runs) has gradients
    the recorder cannot attribute: one clear sentence, also when .grad holds the last step's (the
    pass adds to it in place)."""
    class Misuse(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 3)

        def forward(self, x):
            return F.linear(torch.tanh(self.a(x)), self.b.weight, self.b.bias)  # b's forward never runs

    seeded()
    model = Misuse()
    with ImportanceRecorder(model) as rec:
        for _ in range(2):  # the second time .grad is not None: accumulated in place
            with pytest.raises(UserError, match="Parameters of b received gradients without a recorded call"):
                rec.backward(F.cross_entropy(model(torch.randn(B, 4)), Y, reduction="none"), lr=LR)


def test_misuse_is_named_for_what_it_is():
    """A learning rate that is not finite, a loss of the wrong length, a recorder used after close()."""
    import torch.nn.functional as F

    from sample_importance import ImportanceRecorder
    from sample_importance.errors import UserError

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 2))
    x, y = torch.randn(6, 4), torch.randint(0, 2, (6,))
    rec = ImportanceRecorder(model)
    with pytest.raises(UserError, match="finite learning rate"):
        rec.backward(F.cross_entropy(model(x), y, reduction="none"), lr=float("nan"))
    with pytest.raises(UserError, match="loss_i has 3 values, but the forward pass had 6 samples"):
        rec.backward(F.cross_entropy(model(x), y, reduction="none")[:3], lr=0.1)  # 3: on no axis of an input
    assert rec.backward(F.cross_entropy(model(x), y, reduction="none"), lr=0.1).shape == (6, 2)
    rec.close()
    with pytest.raises(UserError, match="was closed"):
        rec.backward(F.cross_entropy(model(x), y, reduction="none"), lr=0.1)
