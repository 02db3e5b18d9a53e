"""LayerNorm, GroupNorm and InstanceNorm: per-sample affine gradients from the normalised input x̂.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .base import Call, _present, register_rule
from .linear import row_sq_norms


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


def _squared(grads):
    """The squared-norm route of a rule whose per-sample gradients are small (the normalisation
    layers': (B, *shape) for a weight of `shape`): their squared norms."""
    return lambda module, call: {n: row_sq_norms(g) for n, g in grads(module, call).items()}


for _grads in (layer_norm_grads, group_norm_grads, instance_norm_grads):
    _grads.rule.sq_norms = _squared(_grads)
