"""nn.Conv1d/2d/3d: per-sample weight gradients by one convolution backward with the batch folded
into the groups, the Gram route on few positions, and the fused route inside the convolution's own
backward (`FusedConv`).
"""
from __future__ import annotations


import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from .base import Call, _present, register_norms, register_rule
from .linear import row_sq_norms


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


def conv_dot(module: nn.modules.conv._ConvNd, call: Call, H: dict) -> dict[str, torch.Tensor]:
    """<H_W, dL_i/dW> = sum over output positions of d_i . (the convolution of x_i with H_W): one
    forward convolution with the target gradient as its weight, no per-sample weight gradient;
    bias: <H_b, sum over positions of d_i>. H stacked over K targets: per-sample gradients instead
    (None)."""
    if any(t.dim() > getattr(module, n).dim() for n, t in H.items()):
        return None
    out = {}
    d = call.g
    if "weight" in H:
        z = module._conv_forward(call.x, H["weight"].to(call.x.dtype), None)  # (B, O, *out): every padding mode
        out["weight"] = (z.to(d.dtype) * d).flatten(1).sum(1)
    if "bias" in H and _present(module, "bias"):
        out["bias"] = d.flatten(2).sum(2) @ H["bias"].to(d.dtype)
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
conv_grads.rule.dot = conv_dot
