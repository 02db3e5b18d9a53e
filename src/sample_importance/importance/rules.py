"""Exact per-sample gradient rules, one small function per module type, in a registry.

A rule turns what the recorder captured for one call of a module -- its inputs and the gradient of
the batch loss with respect to its output -- into the per-sample gradients of that module's own
parameters (Gao & Jojic, section 2.2: phi_i is a per-sample gradient scaled by the optimizer).
With the batch loss the mean over B samples, the output gradient of sample i is dL_i/dz_i / B, so
every rule returns g_i / B; the recorder multiplies by the optimizer's step factor.

Each rule gives `grads` (per-sample gradients (B, *param.shape) by parameter name) and, where a
cheaper route exists, `sq_norms` (their squared norms (B,) by parameter name, never materialising
the per-sample gradients: the outer-product / Gram identities used by per-sample-norm libraries).
Rules are registered by decorator for an exact module type (`register_rule(nn.Linear)`), as
Opacus' `register_grad_sampler` and BackPACK's module extensions organise theirs; this code is the
project's own. Modules without a rule get `fallback_grads` (torch.func, exact, slower).

Every rule assumes the batch is the first axis of the module's inputs and outputs (use
`batch_first=True` for Transformer layers); nn.MultiheadAttention honours its own `batch_first`.
"""
from __future__ import annotations

import inspect
import math
import weakref
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_unflatten

from ..errors import UserError


@dataclass
class Call:
    """One call of a recorded module during the forward pass: its arguments (tensors detached: a
    call never keeps a graph alive) and the gradients of the batch loss with respect to the tensor
    leaves of its output (pytree order; None where none flowed). The hooks of its graph hold it
    (the recorder itself only a weak reference until recorder.backward): a forward pass whose
    graph is dropped without a backward pass lets its calls go with it."""

    args: tuple
    kwargs: dict
    grads: list = field(default_factory=list)
    # what a rule's `inner` asked for: tensors it kept at the forward pass, and the gradients
    # arriving at the autograd nodes it named (by key)
    extra: dict | None = None
    inner_grads: dict | None = None
    pending: int = 0  # gradients (outputs' and inner nodes') still to arrive in the pass under way
    # (a, b): the nodes the call created have autograd sequence numbers a <= s < b
    span: tuple[int, int] | None = None
    # leaf k -> (autograd sequence number of its node, output number, shape), for outputs whose
    # batch axis the recorder must find in the graph (`recorder._spread`)
    leaves: dict | None = None
    autocast: bool = False  # made under torch.autocast: the rules read its tensors in float32
    # leaf k -> per-sample gradients (B, *shape) of a batch-less output, gathered where it meets the
    # batch; given as its gradient when its own node's arrives
    spread: dict | None = None

    @property
    def x(self) -> torch.Tensor:
        return self.args[0] if self.args else next(iter(self.kwargs.values()))

    @property
    def g(self) -> torch.Tensor:
        return self.grads[0]


@dataclass
class Rule:
    grads: Callable[[nn.Module, Call], dict[str, torch.Tensor]]
    sq_norms: Callable[[nn.Module, Call], dict[str, torch.Tensor]] | None = None
    # ||f * g_i||^2 for an elementwise factor f (Adam): fn(module, call, {name: f^2}) -> {name: (B,)},
    # or None where the rule has no cheaper route than materialising g_i
    weighted_sq_norms: Callable[[nn.Module, Call, dict], dict[str, torch.Tensor] | None] | None = None
    # sum over the module's parameters of f^2 ||g_i||^2 for a number f per parameter (the SGD family):
    # fn(module, call, {name: f^2}) -> (B,), or None where it has no fused route for this call
    sq_norm_column: Callable[[nn.Module, Call, dict], torch.Tensor | None] | None = None
    # the module's parameters the rule covers: its own (False) or its children's too (True)
    recurse: bool = False
    # fn(module, call, output) -> {key: autograd node} at the forward pass: nodes of the module's own
    # graph whose incoming gradient the recorder keeps in call.inner_grads (what the rule would
    # otherwise recompute); {} where the graph is not the one the rule knows
    inner: Callable[[nn.Module, Call, object], dict] | None = None
    # fn(module, call, owner) -> a context the recorder enters for one forward call of the module,
    # in which the module's own operation also computes the per-sample norms in its backward and
    # hands its output gradient to owner.arrive(call, g) (`FusedConv`); None: no fused route
    fused: Callable[[nn.Module, Call, object], object] | None = None
    # fn(module, output) at the forward pass -> {key: tensor} that the module's own autograd graph
    # saved for its backward and the rule reads (call.extra) instead of recomputing it; None where
    # the output's node is not the one the rule knows
    saved: Callable[[nn.Module, torch.Tensor], dict | None] | None = None


RULES: dict[type, Rule] = {}


def register_rule(*types: type | str, recurse: bool = False):
    """Decorator: register `fn(module, call) -> {param name: (B, *shape)}` as the exact rule for
    modules of exactly these types: classes, or "module.QualName" strings for classes of a library
    this package does not import (HuggingFace's Conv1D). `register_norms` adds the cheap norm route."""
    def wrap(fn):
        rule = Rule(fn, recurse=recurse)
        for t in types:
            RULES[t] = rule
        fn.rule = rule
        return fn
    return wrap


def register_norms(fn_grads):
    """Decorator: attach `fn(module, call) -> {param name: (B,)}` as the squared-norm route of a rule."""
    def wrap(fn):
        fn_grads.rule.sq_norms = fn
        return fn
    return wrap


def rule_for(module: nn.Module) -> Rule | None:
    kind = type(module)
    rule = RULES.get(kind)
    return rule if rule is not None else RULES.get(f"{kind.__module__}.{kind.__qualname__}")


def _present(module: nn.Module, name: str) -> bool:
    p = getattr(module, name, None)
    return isinstance(p, nn.Parameter) and p.requires_grad


# ---------------------------------------------------------------- Linear
def linear_sq_grad_norms(a: torch.Tensor, dz: torch.Tensor) -> torch.Tensor:
    """||dz_i||^2 (||a_i||^2 + 1): weight and bias of a linear layer together, features on the last
    axis, any leading shape ((B,) for one model, (M, B) for M stacked models): the paper's MLP."""
    return dz.square().sum(-1) * (a.square().sum(-1) + 1.0)


def row_sq_norms(t: torch.Tensor) -> torch.Tensor:
    """||t_i||^2 of each row of a (B, ...) tensor, without a temporary of t's size (a per-sample
    gradient can be large; a fresh buffer per layer and step costs page faults)."""
    return torch.linalg.vector_norm(t.reshape(t.shape[0], -1), dim=1).square()


def _tokens(a: torch.Tensor, d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T, in), (B, T, out): every leading axis after the batch is a token axis."""
    B = a.shape[0]
    return a.reshape(B, -1, a.shape[-1]), d.reshape(B, -1, d.shape[-1])


def linear_sq_norms_of(a: torch.Tensor, d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """||sum_t d_t a_t^T||^2 and ||sum_t d_t||^2 per sample from a (B, T, in), d (B, T, out): one
    token by the outer-product identity ||d||^2 ||a||^2, several by whichever of the Gram route
    <D D^T, A A^T> (B T^2 (in + out)) or the materialised gradient (B T in out) costs less."""
    T, n_in, n_out = a.shape[1], a.shape[2], d.shape[2]
    if T == 1:
        a, d = a[:, 0], d[:, 0]
        dn = d.square().sum(-1)
        return dn * a.square().sum(-1), dn
    if T * (n_in + n_out) < n_in * n_out:
        weight = (torch.bmm(d, d.transpose(1, 2)) * torch.bmm(a, a.transpose(1, 2))).sum((1, 2))
    else:
        weight = row_sq_norms(torch.bmm(d.transpose(1, 2), a))
    return weight, d.sum(1).square().sum(-1)


@register_rule(nn.Linear)
def linear_grads(module: nn.Linear, call: Call) -> dict[str, torch.Tensor]:
    """z = a W^T + b on (B, *, in): dL_i/dW = sum_t d_t a_t^T, dL_i/db = sum_t d_t."""
    a, d = _tokens(call.x, call.g)
    out = {"weight": torch.bmm(d.transpose(1, 2), a)}  # (B, out, in)
    if _present(module, "bias"):
        out["bias"] = d.sum(1)  # (B, out)
    return out


@register_norms(linear_grads)
def linear_sq_norms(module: nn.Linear, call: Call) -> dict[str, torch.Tensor]:
    """(B, in) inputs, as in the paper's MLP: ||d_i||^2 ||a_i||^2 and ||d_i||^2 (two row norms);
    sequences: `linear_sq_norms_of`."""
    a, d = call.x, call.g
    if a.dim() == 2:
        dn = d.square().sum(-1)
        out = {"weight": dn * a.square().sum(-1)}
        if _present(module, "bias"):
            out["bias"] = dn
        return out
    w, b = linear_sq_norms_of(*_tokens(a, d))
    out = {"weight": w}
    if _present(module, "bias"):
        out["bias"] = b
    return out


def linear_sq_norm_column(module: nn.Linear, call: Call, f2: dict) -> torch.Tensor | None:
    """(B, in) inputs: f_W^2 ||d_i||^2 ||a_i||^2 + f_b^2 ||d_i||^2 in five small operations (the
    paper's MLP step, where per-operation overhead is what costs). f2 lists the layer's parameters
    that require a gradient, so a bias is there or not."""
    a, d = call.x, call.g
    if a.dim() != 2:
        return None
    inner = torch.linalg.vecdot(a, a).mul_(f2.get("weight", 0.0))
    if "bias" in f2:
        inner.add_(f2["bias"])
    return inner.mul_(torch.linalg.vecdot(d, d))


def linear_weighted_sq_norms(module: nn.Linear, call: Call, f2: dict) -> dict[str, torch.Tensor] | None:
    """Diagonally preconditioned norms on (B, in) inputs: sum_{o,k} F2_ok d_io^2 a_ik^2 is a
    bilinear form in d_i^2 and a_i^2, one matrix product (B, out) x (out, in); bias: d_i^2 . f2_b."""
    a, d = call.x, call.g
    if a.dim() != 2:
        return None
    d2 = d.square()  # (B, out)
    out = {}
    if "weight" in f2:
        out["weight"] = ((d2 @ f2["weight"]) * a.square()).sum(-1)  # (B,)
    if "bias" in f2 and _present(module, "bias"):
        out["bias"] = d2 @ f2["bias"]
    return out


linear_grads.rule.weighted_sq_norms = linear_weighted_sq_norms
linear_grads.rule.sq_norm_column = linear_sq_norm_column


@register_rule("transformers.pytorch_utils.Conv1D")
def conv1d_grads(module: nn.Module, call: Call) -> dict[str, torch.Tensor]:
    """HuggingFace's Conv1D (GPT-2's projections): z = a W + b with W (in, out), a Linear with its
    weight transposed; the Linear rule's gradients, the weight's transposed back."""
    out = linear_grads(module, call)
    out["weight"] = out["weight"].transpose(1, 2)
    return out


def conv1d_weighted_sq_norms(module: nn.Module, call: Call, f2: dict) -> dict[str, torch.Tensor] | None:
    """The Linear route, its factor on the weight transposed to (out, in)."""
    if "weight" in f2:
        f2 = {**f2, "weight": f2["weight"].t()}
    return linear_weighted_sq_norms(module, call, f2)


conv1d_grads.rule.sq_norms = linear_sq_norms  # a transpose keeps every norm
conv1d_grads.rule.weighted_sq_norms = conv1d_weighted_sq_norms
conv1d_grads.rule.sq_norm_column = linear_sq_norm_column


# ---------------------------------------------------------------- Convolutions
def _explicit_padding(module: nn.modules.conv._ConvNd, x: torch.Tensor) -> tuple[torch.Tensor, tuple]:
    """The input as the convolution itself sees it after padding, and the remaining (zero) padding."""
    n = x.dim() - 2
    if module.padding_mode != "zeros":
        return F.pad(x, module._reversed_padding_repeated_twice, mode=module.padding_mode), (0,) * n
    if module.padding == "valid":
        return x, (0,) * n
    if module.padding == "same":
        pads = []
        for k, dil in zip(reversed(module.kernel_size), reversed(module.dilation)):
            total = dil * (k - 1)
            pads += [total // 2, total - total // 2]
        return F.pad(x, pads), (0,) * n
    return x, tuple(module.padding)


_CONV_FUNCTIONS = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


@register_rule(nn.Conv1d, nn.Conv2d, nn.Conv3d)
def conv_grads(module: nn.modules.conv._ConvNd, call: Call) -> dict[str, torch.Tensor]:
    """dL_i/dW = the weight gradient of sample i's own convolution: computed for all samples at once
    as one convolution backward with the batch folded into the channel groups (B * groups groups),
    which covers every stride, padding, dilation and groups (depthwise included), 1-D to 3-D."""
    x, padding = _explicit_padding(module, call.x)
    out = {"weight": _per_sample_conv_weight(x, call.g, module.weight, _geometry(module, padding))}  # (B, O, C/G, *k)
    if _present(module, "bias"):
        out["bias"] = call.g.flatten(2).sum(2)  # (B, O)
    return out


def _geometry(module: nn.modules.conv._ConvNd, padding) -> tuple:
    """(stride, padding, dilation, groups) of the module's convolution, padding explicit."""
    return tuple(module.stride), tuple(padding), tuple(module.dilation), module.groups


def _per_sample_conv_weight(x: torch.Tensor, d: torch.Tensor, w: torch.Tensor, geometry: tuple) -> torch.Tensor:
    """(B, *w.shape): the weight gradients of samples x (B, C, *in) with output gradients d
    (B, O, *out) of a convolution with weight w and geometry (stride, padding, dilation, groups).
    Folded into the groups of one convolution backward (only the weight's shape is read from the
    empty tensor); on the CPU, an ungrouped stride-1 convolution of fewer than 8 input channels (a
    network's first layer, on images) as one forward convolution instead, the inputs' channels as
    its batch and each sample's output gradient as the kernel of its group: the same sums, 2-4x
    faster than the grouped backward there (`bench/README.md`), which is faster everywhere else."""
    stride, padding, dilation, groups = geometry
    B, C, n = x.shape[0], x.shape[1], x.dim() - 2
    if groups == 1 and C < 8 and all(s == 1 for s in stride) and x.device.type == "cpu":
        xp = F.pad(x, [p for p in reversed(padding) for _ in range(2)]).transpose(0, 1)  # (C, B, *in padded)
        g = _CONV_FUNCTIONS[n](xp, d.reshape(B * d.shape[1], 1, *d.shape[2:]), stride=dilation, groups=B)  # (C, B*O, *k)
        return g.reshape(C, B, w.shape[0], *w.shape[2:]).permute(1, 2, 0, *range(3, n + 3))
    xf = x.reshape(1, B * C, *x.shape[2:])  # (1, B*C, *in)
    df = d.reshape(1, B * d.shape[1], *d.shape[2:])  # (1, B*O, *out)
    shape = [B * w.shape[0], *w.shape[1:]]
    _, gw, _ = torch.ops.aten.convolution_backward(
        df, xf, torch.empty(shape, dtype=w.dtype, device=w.device), None, list(stride), list(padding),
        list(dilation), False, [0] * n, B * groups, [False, True, False])
    return gw.view(B, *w.shape)


CHUNK_ELEMENTS = 2 ** 19  # elements of inputs, output gradients and weight gradients per piece of a batch


def _conv_weight_sq_norms(x: torch.Tensor, d: torch.Tensor, w: torch.Tensor, geometry: tuple,
                          total: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(B,) squared norms of the per-sample weight gradients, taken a few samples at a time
    (CHUNK_ELEMENTS: pieces small enough for the allocator to reuse; a whole batch's buffers are
    fresh memory each time, and page faults cost as much as the convolution); with total=True also
    their sum over the batch, the weight gradient of the batch loss."""
    n = max(1, CHUNK_ELEMENTS // (x[0].numel() + d[0].numel() + w.numel()))
    norms, grad = [], None
    for i in range(0, x.shape[0], n):
        g = _per_sample_conv_weight(x[i:i + n], d[i:i + n], w, geometry)
        norms.append(row_sq_norms(g))
        if total:
            grad = g.sum(0) if grad is None else grad.add_(g.sum(0))
    return torch.cat(norms), grad


@register_norms(conv_grads)
def conv_sq_norms(module: nn.modules.conv._ConvNd, call: Call) -> dict[str, torch.Tensor]:
    """Where the call ran as `FusedConv`, its backward has taken the weight's norms already
    (call.extra). Otherwise, where the Gram route costs less (`_gram_cheaper`: few output positions,
    wide layers), from the unfolded patches U_i (CKK, P) and D_i (O, P): ||D_i U_i^T||^2 =
    <D_i^T D_i, U_i^T U_i>, without the per-sample gradients; else the per-sample weight gradients
    of `conv_grads`, a few samples at a time (`_conv_weight_sq_norms`)."""
    weight = (call.extra or {}).get("weight_sq_norms")
    if weight is None:
        x, padding = _explicit_padding(module, call.x)
        geometry = _geometry(module, padding)
        if _gram_cheaper(x, call.g, module.weight, geometry):
            stride, padding, dilation, _ = geometry
            U = F.unfold(x, module.kernel_size, dilation=dilation, padding=padding, stride=stride)  # (B, CKK, P)
            D = call.g.flatten(2)  # (B, O, P)
            weight = (torch.bmm(D.transpose(1, 2), D) * torch.bmm(U.transpose(1, 2), U)).sum((1, 2))
        else:
            weight = _conv_weight_sq_norms(x, call.g, module.weight, geometry)[0]
    out = {"weight": weight}
    if _present(module, "bias"):
        out["bias"] = row_sq_norms(call.g.flatten(2).sum(2))
    return out


def _gram_cheaper(x: torch.Tensor, d: torch.Tensor, w: torch.Tensor, geometry: tuple) -> bool:
    """Whether the Gram route's P^2 (O + K) operations per sample undercut the P O K of a per-sample
    weight gradient (P output positions, O output channels, K = C k^2): a VGG's last stages, not
    a ResNet's. It needs the unfolded patches: ungrouped 2-D convolutions only."""
    if x.dim() != 4 or geometry[3] != 1:
        return False
    P, O, K = d[0, 0].numel(), d.shape[1], w[0].numel()
    return P * (O + K) < O * K


_CONV_ARGUMENTS = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")


class FusedConv(TorchFunctionMode):
    """Entered by the recorder for one forward call of a convolution module: the module's
    convolution (the F.convNd call with its own weight) runs as `_ConvWithPerSample`, whose
    backward, where the recorder wants this call's norms (`owner.wants(call)`), takes the
    per-sample weight gradients a few samples at a time, keeps their squared norms in call.extra
    and returns their sum as the weight's gradient: the batch's weight gradient is not computed a
    second time (`bench/README.md`). Anything else in the forward runs unchanged. The output
    gradient reaches the recorder through `owner.arrive(call, g)`, as a tensor hook's would."""

    def __init__(self, module: nn.modules.conv._ConvNd, call: Call, owner):
        super().__init__()
        self.module, self.call, self.owner, self.used = module, call, owner, False
        self.function = _CONV_FUNCTIONS[module.weight.dim() - 2]

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is self.function and not self.used:
            bound = dict(zip(_CONV_ARGUMENTS, args), **kwargs)
            padding = bound.get("padding", 0)
            if bound.get("weight") is self.module.weight and padding != "same":
                self.used = True
                n = self.module.weight.dim() - 2
                geometry = (_ntuple(bound.get("stride", 1), n), (0,) * n if padding == "valid" else _ntuple(padding, n),
                            _ntuple(bound.get("dilation", 1), n), bound.get("groups", 1))
                return _ConvWithPerSample.apply(bound["input"], bound["weight"], bound.get("bias"), geometry, self)
        return func(*args, **kwargs)


def _ntuple(v, n: int) -> tuple:
    return tuple(v) if isinstance(v, (tuple, list)) else (v,) * n


class _ConvWithPerSample(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, b, geometry, fused: FusedConv):
        stride, padding, dilation, groups = geometry
        ctx.save_for_backward(x, w)
        ctx.geometry, ctx.fused = geometry, fused
        return fused.function(x, w, b, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, g):
        x, w = ctx.saved_tensors
        fused, (stride, padding, dilation, groups) = ctx.fused, ctx.geometry
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        per_sample = need_w and not torch.is_grad_enabled() and fused.owner.wants(fused.call) \
            and not _gram_cheaper(x, g, w, ctx.geometry)
        gx, gw, gb = torch.ops.aten.convolution_backward(
            g, x, w, [w.shape[0]] if need_b else None, list(stride), list(padding), list(dilation), False,
            [0] * (x.dim() - 2), groups, [need_x, need_w and not per_sample, need_b])
        if per_sample:
            norms, gw = _conv_weight_sq_norms(x, g, w, ctx.geometry, total=True)
            fused.call.extra = {"weight_sq_norms": norms}
        fused.owner.arrive(fused.call, g)
        return gx, gw, gb, None, None


conv_grads.rule.fused = FusedConv


# ---------------------------------------------------------------- Embedding
@register_rule(nn.Embedding)
def embedding_grads(module: nn.Embedding, call: Call) -> dict[str, torch.Tensor]:
    """dL_i/dE[v] = sum of d_t over the tokens t of sample i with index v (none for padding_idx)."""
    _check_embedding(module)
    idx, d = _embedding_tokens(module, call)  # (B, T), (B, T, D)
    B, V = idx.shape[0], module.num_embeddings
    out = d.new_zeros(B, V, d.shape[-1])
    out.scatter_add_(1, idx.unsqueeze(-1).expand_as(d), d)
    return {"weight": out}  # (B, V, D)


@register_norms(embedding_grads)
def embedding_sq_norms(module: nn.Embedding, call: Call) -> dict[str, torch.Tensor]:
    """Gram route: ||dL_i/dE||^2 = sum_{t,s: idx_t = idx_s} <d_t, d_s>, no (B, V, D) tensor."""
    _check_embedding(module)
    idx, d = _embedding_tokens(module, call)
    same = (idx.unsqueeze(2) == idx.unsqueeze(1)).to(d.dtype)  # (B, T, T)
    return {"weight": (torch.bmm(d, d.transpose(1, 2)) * same).sum((1, 2))}


def _check_embedding(module: nn.Embedding) -> None:
    if module.scale_grad_by_freq:
        raise UserError("An nn.Embedding with scale_grad_by_freq=True scales gradients by token counts of the "
                        "whole batch, which couples the samples: construct it with scale_grad_by_freq=False.")


def _embedding_tokens(module: nn.Embedding, call: Call) -> tuple[torch.Tensor, torch.Tensor]:
    B = call.x.shape[0]
    idx = call.x.reshape(B, -1)
    d = call.g.reshape(B, idx.shape[1], -1)
    if module.padding_idx is not None:  # the padding row never receives a gradient
        d = d * (idx != module.padding_idx).unsqueeze(-1).to(d.dtype)
    return idx, d


# ---------------------------------------------------------------- Normalisation layers
def _affine(module: nn.Module, d: torch.Tensor, xhat: torch.Tensor, channel_dims: int) -> dict[str, torch.Tensor]:
    """y = xhat * w + b with w, b over the `channel_dims` trailing axes (LayerNorm): dL_i/dw = sum
    over the other axes of d * xhat, dL_i/db = sum of d."""
    out = {}
    B = d.shape[0]
    shape = d.shape[d.dim() - channel_dims:]
    rows = lambda t: t.reshape(B, -1, math.prod(shape))  # noqa: E731  (B, other, channels)
    if _present(module, "weight"):  # sum of d * xhat without a temporary of its size
        out["weight"] = torch.linalg.vecdot(rows(d), rows(xhat), dim=1).reshape(B, *shape)
    if _present(module, "bias"):
        out["bias"] = rows(d).sum(1).reshape(B, *shape)
    return out


def _channel_affine(module: nn.Module, d: torch.Tensor, x: torch.Tensor, mean: torch.Tensor,
                    rstd: torch.Tensor) -> dict[str, torch.Tensor]:
    """y = (x - mean) rstd w + b with w, b per channel (axis 1), and mean, rstd per sample and
    channel group (B, G), G dividing C, or per channel (C,) (running statistics): dL_i/dw_c =
    rstd (sum d x - mean sum d) over the channel's positions, dL_i/db_c = sum d. PyTorch's own
    group normalisation backward kernel forms these sums; with the batch folded into the channels
    (one sample of B*C channels in B*G groups) the weight and bias gradients it returns are the
    per-sample ones, in one pass over d and x and without a temporary of their size."""
    B, C = d.shape[:2]
    if mean.dim() == 1:  # per channel, the same for every sample: each channel its own group
        mean, rstd = mean.expand(B, C), rstd.expand(B, C)
    groups = B * mean.shape[1]
    need = [False, _present(module, "weight"), _present(module, "bias")]
    _, weight, bias = torch.ops.aten.native_group_norm_backward(
        d.reshape(1, B * C, -1), x.reshape(1, B * C, -1), mean.reshape(1, groups).to(x.dtype),
        rstd.reshape(1, groups).to(x.dtype), None, 1, B * C, d[0, 0].numel(), groups, need)
    out = {}
    if need[1]:
        out["weight"] = weight.view(B, C)
    if need[2]:
        out["bias"] = bias.view(B, C)
    return out


def _statistics(x: torch.Tensor, groups: int, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and 1/sqrt(var + eps) of each sample's channel groups (B, groups): those of PyTorch's
    own group normalisation kernel (its output is not kept)."""
    B, C = x.shape[:2]
    _, mean, rstd = torch.native_group_norm(x, None, None, B, C, x[0, 0].numel(), groups, eps)
    return mean, rstd


def _running_statistics(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    return module.running_mean, (module.running_var + module.eps).rsqrt()


@register_rule(nn.LayerNorm)
def layer_norm_grads(module: nn.LayerNorm, call: Call) -> dict[str, torch.Tensor]:
    xhat = F.layer_norm(call.x, module.normalized_shape, eps=module.eps)
    return _affine(module, call.g, xhat, len(module.normalized_shape))


@register_rule(nn.GroupNorm)
def group_norm_grads(module: nn.GroupNorm, call: Call) -> dict[str, torch.Tensor]:
    saved = call.extra or {}
    if saved.get("mean") is not None and saved["mean"].shape == (call.x.shape[0], module.num_groups):
        stats = saved["mean"], saved["rstd"]
    else:
        stats = _statistics(call.x, module.num_groups, module.eps)
    return _channel_affine(module, call.g, call.x, *stats)


def group_norm_saved(module: nn.GroupNorm, output: torch.Tensor) -> dict | None:
    """The mean and rstd (B, G) that PyTorch's group normalisation kept for its backward pass, read
    off the output's autograd node: the values `_statistics` would recompute with a pass over the
    input (the same kernel on the same input), at no cost."""
    node = output.grad_fn
    if type(node).__name__ != "NativeGroupNormBackward0":
        return None
    try:
        return {"mean": node._saved_result1.detach(), "rstd": node._saved_result2.detach()}
    except (AttributeError, RuntimeError):  # another PyTorch's node, or saved tensors already freed
        return None


group_norm_grads.rule.saved = group_norm_saved


@register_rule(nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)
def instance_norm_grads(module: nn.modules.instancenorm._InstanceNorm, call: Call) -> dict[str, torch.Tensor]:
    x = call.x
    if module.training or not module.track_running_stats:  # statistics of each sample's own input
        stats = _statistics(x, x.shape[1], module.eps)
    else:
        stats = _running_statistics(module)
    return _channel_affine(module, call.g, x, *stats)


def batch_norm_couples(module: nn.Module) -> bool:
    """Whether a BatchNorm normalises with the statistics of the batch (training mode, or no
    running statistics): then every sample's loss depends on every other sample."""
    return isinstance(module, nn.modules.batchnorm._BatchNorm) and (
        module.training or not module.track_running_stats or module.running_mean is None)


@register_rule(nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
def batch_norm_grads(module: nn.modules.batchnorm._BatchNorm, call: Call) -> dict[str, torch.Tensor]:
    """Evaluation mode only (running statistics: a per-sample affine map); the recorder routes
    training-mode BatchNorm to its batched-VJP path or refuses it."""
    assert not batch_norm_couples(module)
    return _channel_affine(module, call.g, call.x, *_running_statistics(module))


def _squared(grads):
    """The squared-norm route of a rule whose per-sample gradients are small (the normalisation
    layers': (B, *shape) for a weight of `shape`): their squared norms."""
    return lambda module, call: {n: row_sq_norms(g) for n, g in grads(module, call).items()}


for _grads in (layer_norm_grads, group_norm_grads, instance_norm_grads, batch_norm_grads):
    _grads.rule.sq_norms = _squared(_grads)


# ---------------------------------------------------------------- Multi-head attention
@register_rule(nn.MultiheadAttention, recurse=True)
def attention_grads(module: nn.MultiheadAttention, call: Call) -> dict[str, torch.Tensor]:
    """nn.MultiheadAttention (its in-projection and out_proj): the gradient at the projections'
    outputs and the context before out_proj, from the module's own pass where `attention_inner`
    found them (self-attention), else recomputed from the captured inputs with the projections and
    context exposed and the captured output gradient pulled back to them (one autograd call for the
    whole batch: samples never mix in attention); the Linear rule gives the per-sample gradients."""
    parts = _attention_parts(module, call)
    out = {}
    for name, pieces in parts.items():
        grads = [torch.bmm(d.transpose(1, 2), a) for a, d in pieces]  # (B, out, in) row blocks
        out[name] = torch.cat(grads, 1) if len(grads) > 1 else grads[0]
    for name, pieces in _attention_biases(module, parts).items():
        out[name] = torch.cat([d.sum(1) for _, d in pieces], 1)
    return out


@register_norms(attention_grads)
def attention_sq_norms(module: nn.MultiheadAttention, call: Call) -> dict[str, torch.Tensor]:
    parts = _attention_parts(module, call)
    out = {}
    for name, pieces in parts.items():  # disjoint row blocks: squared norms add
        out[name] = sum(linear_sq_norms_of(a, d)[0] for a, d in pieces)
    for name, pieces in _attention_biases(module, parts).items():
        out[name] = sum(d.sum(1).square().sum(-1) for _, d in pieces)
    return out


def _attention_biases(module, parts) -> dict:
    out = {}
    if _present(module, "in_proj_bias"):
        key = "in_proj_weight" if "in_proj_weight" in parts else None
        pieces = parts[key] if key else parts["q_proj_weight"] + parts["k_proj_weight"] + parts["v_proj_weight"]
        out["in_proj_bias"] = pieces
    if _present(module.out_proj, "bias"):
        out["out_proj.bias"] = parts["out_proj.weight"]
    return out


def attention_inner(module: nn.MultiheadAttention, call: Call, output) -> dict:
    """The module's own backward pass computes the gradient at its packed in-projection's output
    (q, k and v side by side) and keeps the context it feeds to out_proj: found in its autograd graph
    (self-attention, packed weights), they replace the rule's recomputation of the attention. The
    graph is checked to be the one F.multi_head_attention_forward builds (every call: the context
    reaches the output through views only, the products multiply by the module's weights, shapes;
    a module's first call also by value: the projection's input is the query, token-major, and one
    context row through out_proj gives the output's row); anything else: {} and the recomputation."""
    out = output[0] if isinstance(output, (tuple, list)) else output
    if not (module._qkv_same_embed_dim and isinstance(out, torch.Tensor) and out.grad_fn is not None):
        return {}
    a = _attention_arguments(module, call)
    q_in, k_in, v_in = a["query"], a["key"], a["value"]
    if not (_same(q_in, k_in) and _same(k_in, v_in)) or q_in.dim() != 3:
        return {}
    q_seq = q_in.transpose(0, 1) if module.batch_first else q_in  # (L, B, E)
    out_seq = out.transpose(0, 1) if module.batch_first else out
    L, B, E = q_seq.shape
    try:
        # from the output: views (and the batch_first transpose) down to out_proj's product
        node, transposes = out.grad_fn, 0
        while type(node).__name__ in ("TransposeBackward0", "ViewBackward0") and len(node.next_functions) == 1:
            transposes += type(node).__name__ == "TransposeBackward0"
            node = node.next_functions[0][0]
        if transposes != int(module.batch_first) or _weight_of(node) is not module.out_proj.weight:
            return {}
        ctx = _product_input(node)
        # breadth first to the in-projection's product (a few dozen nodes: the attention itself)
        seen, todo, qkv = set(), [node], None
        while todo and qkv is None and len(seen) < 256:
            n = todo.pop(0)
            if n is None or n in seen:
                continue
            seen.add(n)
            if _weight_of(n) is module.in_proj_weight:
                qkv = n
            todo += [c for c, _ in n.next_functions if c is not None and type(c).__name__ != "AccumulateGrad"]
        x = None if qkv is None else _product_input(qkv)
        if ctx is None or x is None or ctx.shape != (L * B, E) or x.shape != (L * B, E):
            return {}
        ctx = ctx.detach().view(L, B, E)
        if module not in _ATTENTION_CHECKED:  # the values once per module: no host syncs on every forward
            l, b = (L - 1, 0) if L > 1 else (0, B - 1)  # the rows are (token, sample): one row through out_proj
            row = F.linear(ctx[l, b], module.out_proj.weight.detach(),
                           None if module.out_proj.bias is None else module.out_proj.bias.detach())
            if not (torch.equal(x.view(L, B, E), q_seq.detach()) and torch.allclose(
                    row, out_seq[l, b].detach(), rtol=1e-4, atol=1e-6 * (1 + float(row.abs().max())))):
                return {}
            _ATTENTION_CHECKED.add(module)
    except (RuntimeError, AttributeError):  # saved tensors freed, or another autograd layout
        return {}
    call.extra = {"ctx": ctx.transpose(0, 1)}  # (B, L, E)
    return {"qkv": qkv}


_ATTENTION_CHECKED: "weakref.WeakSet[nn.MultiheadAttention]" = weakref.WeakSet()


def _weight_of(node) -> torch.Tensor | None:
    """The weight a matrix-product node multiplies by (through its transpose), if it is one."""
    if type(node).__name__ not in ("AddmmBackward0", "MmBackward0"):
        return None
    for child, _ in node.next_functions:
        if type(child).__name__ == "TBackward0" and child.next_functions and \
                type(child.next_functions[0][0]).__name__ == "AccumulateGrad":
            return child.next_functions[0][0].variable
    return None


def _product_input(node) -> torch.Tensor | None:
    """The left operand a matrix-product node saved (the layer's input rows)."""
    name = "_saved_mat1" if type(node).__name__ == "AddmmBackward0" else "_saved_self"
    return getattr(node, name, None)


def _attention_parts(module: nn.MultiheadAttention, call: Call) -> dict[str, list]:
    """{weight name: [(a (B, T, in), d (B, T, out)), ...]} with row blocks in parameter order."""
    if module.bias_k is not None or module.add_zero_attn:
        raise UserError("nn.MultiheadAttention with add_bias_kv or add_zero_attn has no exact rule here: "
                        "construct it without them.")
    a = _attention_arguments(module, call)
    if call.inner_grads and "qkv" in call.inner_grads:  # taken from the module's own pass (`attention_inner`)
        q_in, g_out = a["query"], call.grads[0]
        if not module.batch_first:
            q_in, g_out = q_in.transpose(0, 1), g_out.transpose(0, 1)
        B, L, E = q_in.shape
        d = call.inner_grads["qkv"].view(L, B, 3 * E).transpose(0, 1)  # (B, L, 3E)
        parts = {"in_proj_weight": [(q_in, d)]} if _present(module, "in_proj_weight") else {}
        if _present(module.out_proj, "weight"):
            parts["out_proj.weight"] = [(call.extra["ctx"], g_out)]
        return parts
    if module.training and module.dropout > 0:
        raise UserError("nn.MultiheadAttention with dropout > 0 in training mode draws a random mask that cannot "
                        "be recomputed exactly: set its dropout to 0 (dropout outside attention is fine).")
    q_in, k_in, v_in = a["query"], a["key"], a["value"]
    g_out = call.grads[0]
    g_w = call.grads[1] if len(call.grads) > 1 else None
    if not module.batch_first:  # (L, B, E) -> (B, L, E)
        q_in, k_in, v_in, g_out = (t.transpose(0, 1) for t in (q_in, k_in, v_in, g_out))
    B, L, E = q_in.shape
    S, H = k_in.shape[1], module.num_heads
    hd = E // H
    packed = module._qkv_same_embed_dim
    bias = None if module.in_proj_bias is None else module.in_proj_bias.detach()
    with torch.enable_grad():
        Ws = module.in_proj_weight.chunk(3) if packed else \
            (module.q_proj_weight, module.k_proj_weight, module.v_proj_weight)
        bs = (None,) * 3 if bias is None else bias.chunk(3)
        q, k, v = (F.linear(t.detach(), w.detach(), b).requires_grad_() for t, w, b in zip((q_in, k_in, v_in), Ws, bs))
        qh = q.reshape(B, L, H, hd).transpose(1, 2)  # (B, H, L, hd)
        kh = k.reshape(B, S, H, hd).transpose(1, 2)
        vh = v.reshape(B, S, H, hd).transpose(1, 2)
        mask = _attention_bias(a["attn_mask"], a["key_padding_mask"], B, H, L, S, q.dtype)
        if g_w is None:  # the attention weights were not used: the fused kernel, as the module's own forward
            ctx = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=None if isinstance(mask, float) else mask)
        else:
            attn = torch.softmax(qh @ kh.transpose(-1, -2) / math.sqrt(hd) + mask, -1)  # (B, H, L, S)
            ctx = attn @ vh
        ctx = ctx.transpose(1, 2).reshape(B, L, E)  # (B, L, E), before out_proj
        # out = ctx W_o^T + b_o, so d(ctx) = g_out W_o; the rest by autograd
        d_ctx = g_out @ module.out_proj.weight.detach()  # (B, L, E)
        outputs, grads = [ctx], [d_ctx]
        if g_w is not None:  # the returned attention weights were used too
            outputs.append(attn.mean(1) if a["average_attn_weights"] else attn)
            grads.append(g_w)
        found = torch.autograd.grad(outputs, [q, k, v], grads, allow_unused=True)
    found = [torch.zeros_like(t) if f is None else f for f, t in zip(found, (q, k, v))]
    pieces = list(zip((q_in, k_in, v_in), found))
    parts = ({"in_proj_weight": pieces} if packed else
             {"q_proj_weight": pieces[:1], "k_proj_weight": pieces[1:2], "v_proj_weight": pieces[2:]})
    parts = {n: [(x.detach(), dd.detach()) for x, dd in p] for n, p in parts.items() if _present(module, n)}
    if _present(module.out_proj, "weight"):
        parts["out_proj.weight"] = [(ctx.detach(), g_out)]
    return parts


def _attention_arguments(module: nn.MultiheadAttention, call: Call) -> dict:
    """The call's arguments by name, defaults included (query, key, value, masks, ...)."""
    bound = inspect.signature(module.forward).bind(*call.args, **call.kwargs)
    bound.apply_defaults()
    return bound.arguments


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two (detached) tensors are views of the same elements."""
    return a is b or (a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride()
                      and a.dtype == b.dtype)


def _attention_bias(attn_mask, key_padding_mask, B, H, L, S, dtype) -> torch.Tensor | float:
    """The additive mask F.multi_head_attention_forward builds: bool True = not allowed (-inf)."""
    bias = 0.0
    if attn_mask is not None:
        m = attn_mask
        m = torch.zeros(m.shape, dtype=dtype, device=m.device).masked_fill(m, float("-inf")) if m.dtype == torch.bool \
            else m.to(dtype)
        bias = bias + (m.view(B, H, L, S) if m.dim() == 3 else m.view(1, 1, L, S))
    if key_padding_mask is not None:
        m = key_padding_mask
        m = torch.zeros(m.shape, dtype=dtype, device=m.device).masked_fill(m, float("-inf")) if m.dtype == torch.bool \
            else m.to(dtype)
        bias = bias + m.view(B, 1, 1, S)
    return bias


# ---------------------------------------------------------------- The fallback
def fallback_grads(module: nn.Module, call: Call, names: list[str]) -> dict[str, torch.Tensor]:
    """Exact per-sample gradients of `names` (the module's own parameters) for any module whose
    samples do not interact: the module is re-run one sample at a time under torch.func.vmap with
    its parameters as inputs, and each sample's output is pulled back along its captured output
    gradient (torch.func.grad of <output_i, grad_i>). Tensor arguments whose first axis is the
    batch are split by sample; all else is shared."""
    from torch.func import functional_call, grad, vmap

    B = call.g.shape[0]
    leaves, spec = tree_flatten((call.args, call.kwargs))
    batched = [k for k, t in enumerate(leaves) if isinstance(t, torch.Tensor) and t.dim() > 0 and t.shape[0] == B]
    params = {n: module.get_parameter(n).detach() for n in names}
    grads = [g if g is not None else None for g in call.grads]

    def one(p, xs, gs):
        full = list(leaves)
        for k, t in zip(batched, xs):
            full[k] = t.unsqueeze(0)
        args, kwargs = tree_unflatten(full, spec)
        out = functional_call(module, p, args, kwargs)
        outs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        return sum((o * g.unsqueeze(0)).sum() for o, g in zip(outs, gs) if g is not None)

    xs = [leaves[k].detach() for k in batched]
    try:
        return vmap(grad(one), in_dims=(None, 0, 0))(params, xs, grads)
    except Exception:  # a forward vmap cannot batch (data-dependent control flow, ...): one sample at a time
        per = [grad(one)(params, [x[i] for x in xs], [None if g is None else g[i] for g in grads]) for i in range(B)]
        return {n: torch.stack([p[n] for p in per]) for n in names}


attention_grads.rule.inner = attention_inner
