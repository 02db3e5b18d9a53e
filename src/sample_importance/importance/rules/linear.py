"""nn.Linear (any leading shape: tokens) and HuggingFace's Conv1D (a Linear with its weight transposed).
"""
from __future__ import annotations


import torch
from torch import nn

from .base import Call, _present, register_norms, register_rule


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


def linear_dot(module: nn.Linear, call: Call, H: dict) -> dict[str, torch.Tensor]:
    """<H_W, sum_t d_t a_t^T> = sum_t d_t^T H_W a_t: one product (B, T, out) x (out, in), as the
    forward pass costs; bias: <H_b, sum_t d_t>. H stacked over K targets ((K, out, in), (K, out)):
    (B, K) each."""
    a, d = _tokens(call.x, call.g)
    out = {}
    if "weight" in H:
        W = H["weight"].to(d.dtype)
        out["weight"] = torch.linalg.vecdot(d @ W, a).sum(1) if W.dim() == 2 else \
            torch.einsum("bto,koi,bti->bk", d, W, a)
    if "bias" in H and _present(module, "bias"):
        out["bias"] = d.sum(1) @ H["bias"].to(d.dtype).transpose(-1, 0)  # (B,) or (B, K)
    return out


linear_grads.rule.weighted_sq_norms = linear_weighted_sq_norms
linear_grads.rule.sq_norm_column = linear_sq_norm_column
linear_grads.rule.dot = linear_dot


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


def conv1d_dot(module: nn.Module, call: Call, H: dict) -> dict[str, torch.Tensor]:
    """The Linear route, H's weight transposed to (out, in)."""
    return linear_dot(module, call, {**H, "weight": H["weight"].transpose(-1, -2)} if "weight" in H else H)


conv1d_grads.rule.dot = conv1d_dot
conv1d_grads.rule.sq_norms = linear_sq_norms  # a transpose keeps every norm
conv1d_grads.rule.weighted_sq_norms = conv1d_weighted_sq_norms
conv1d_grads.rule.sq_norm_column = linear_sq_norm_column
