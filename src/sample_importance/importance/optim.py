"""The optimizers' steps the recorder knows: d(delta theta)/dg per parameter of the step about to
be taken (the factor phi_i = f * g_i / B is made of), for torch.optim.SGD (momentum, dampening,
Nesterov), Adam and AdamW (see the recorder's module docstring for the formulas).
"""
from __future__ import annotations

import torch

from ..errors import UserError

STEP_KINDS = {torch.optim.SGD: "sgd", torch.optim.Adam: "adam", torch.optim.AdamW: "adamw"}  # the steps phi is known for


def step_kind(optimizer) -> str:
    """The kind of step: "sgd" (plain, momentum, Nesterov), "adam" or "adamw"; any other optimizer is refused."""
    kind = STEP_KINDS.get(type(optimizer))
    if kind in ("adam", "adamw"):
        for group in optimizer.param_groups:
            if group.get("amsgrad") or group.get("maximize"):
                raise UserError("Adam/AdamW with amsgrad or maximize is not supported by the recorder: construct it "
                                "with amsgrad=False, maximize=False.")
    if kind is None:
        raise UserError(f"The recorder knows the step of torch.optim.SGD (momentum, Nesterov), Adam and AdamW, not "
                        f"{type(optimizer).__name__}: use one of those.")
    return kind


def adam_factor(p: torch.Tensor, group: dict, state: dict, adamw: bool, unscale: float = 1.0) -> torch.Tensor:
    """Elementwise d(delta theta)/dg of torch.optim.Adam/AdamW's coming step (see module docstring);
    .grad divided by `unscale` (a GradScaler's scale, which scaler.step removes before the step)."""
    b1, b2 = group["betas"]
    lr, eps, wd = float(group["lr"]), group["eps"], group["weight_decay"]
    g = p.grad.detach() if unscale == 1 else p.grad.detach() / unscale
    decoupled = adamw or group.get("decoupled_weight_decay", False)
    if wd and not decoupled:
        g = g + wd * p.detach()
    t = float(state["step"]) + 1 if "step" in state else 1.0
    m_prev = state.get("exp_avg", torch.zeros_like(g))
    v_prev = state.get("exp_avg_sq", torch.zeros_like(g))
    m = b1 * m_prev + (1 - b1) * g
    v = b2 * v_prev + (1 - b2) * g * g
    bc1, bc2 = 1 - b1 ** t, 1 - b2 ** t
    sv = v.sqrt()
    den = sv / bc2 ** 0.5 + eps
    second = torch.where(sv > 0, m * (1 - b2) * g / (den * den * bc2 ** 0.5 * sv.clamp_min(1e-300)), torch.zeros_like(g))
    return -(lr / bc1) * ((1 - b1) / den - second)


def step_factors(optimizer, lr, kind: str, params: list, unscale: float = 1.0) -> dict[int, float | torch.Tensor]:
    """{id(param): d(delta theta)/dg}: a number (SGD family) or an elementwise tensor (Adam, from .grad
    divided by `unscale`, a GradScaler's scale); `lr` alone: plain SGD over `params`; kind:
    `step_kind(optimizer)`. Parameters the optimizer does not update are absent: phi = 0."""
    if optimizer is None:
        return {id(p): -float(lr) for p in params}
    out: dict[int, float | torch.Tensor] = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            state = optimizer.state.get(p, {})
            if kind != "sgd":
                if p.grad is not None:
                    out[id(p)] = adam_factor(p, group, state, kind == "adamw", unscale)
                continue
            mu, tau = group["momentum"], group["dampening"]
            first = state.get("momentum_buffer") is None
            if mu == 0:
                c = 1.0
            elif group["nesterov"]:
                c = 1.0 + mu * (1.0 if first else 1.0 - tau)
            else:
                c = 1.0 if first else 1.0 - tau
            out[id(p)] = -float(group["lr"]) * c
    return out
