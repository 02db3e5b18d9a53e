"""Any other module that owns parameters: exact per-sample gradients by torch.func.
"""
from __future__ import annotations


import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from .base import Call


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
