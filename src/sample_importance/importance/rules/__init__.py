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

from . import attention, batchnorm, conv, embedding, fallback, linear, norm  # noqa: F401  (each registers its rules)
from .attention import attention_inner
from .base import RULES, Call, Rule, register_norms, register_rule, rule_for
from .batchnorm import batch_norm_couples
from .conv import FusedConv
from .fallback import fallback_grads
from .linear import linear_sq_grad_norms, row_sq_norms

__all__ = ["RULES", "Call", "FusedConv", "Rule", "attention_inner", "batch_norm_couples", "fallback_grads",
           "linear_sq_grad_norms", "register_norms", "register_rule", "row_sq_norms", "rule_for"]
