"""nn.MultiheadAttention (one layer with its out_proj): from the module's own pass where its graph is
the known one (`attention_inner`), otherwise recomputed from the captured inputs.
"""
from __future__ import annotations

import inspect
import math
import weakref

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import UserError
from .base import Call, _present, register_norms, register_rule
from .linear import linear_sq_norms_of


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


attention_grads.rule.inner = attention_inner
