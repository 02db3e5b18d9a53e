"""nn.Embedding: per-sample gradients as index additions of the output gradients' rows.
"""
from __future__ import annotations


import torch
from torch import nn

from ...errors import UserError
from .base import Call, register_norms, register_rule


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


def embedding_dot(module: nn.Embedding, call: Call, H: dict) -> dict[str, torch.Tensor]:
    """<H, dL_i/dE> = sum over sample i's tokens t of <H[idx_t], d_t>: a gather, no (B, V, D) tensor;
    H stacked over K targets (K, V, D): (B, K)."""
    _check_embedding(module)
    idx, d = _embedding_tokens(module, call)
    if "weight" not in H:
        return {}
    W = H["weight"].to(d.dtype)
    if W.dim() == 2:
        return {"weight": torch.linalg.vecdot(W[idx], d).sum(1)}
    return {"weight": torch.linalg.vecdot(W[:, idx], d).sum(2).T}  # (K, B, T) -> (B, K)


embedding_grads.rule.dot = embedding_dot


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
