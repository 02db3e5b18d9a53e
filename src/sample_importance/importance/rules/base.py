"""What a rule is: the call it reads (`Call`), the routes it gives (`Rule`), and the one
registry of rules by module type (`register_rule`, `register_norms`, `rule_for`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn



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
    # <H_p, g_i> per sample for given tensors H_p shaped like the parameters (a target gradient
    # times the step's factor, for the contribution to a target loss): fn(module, call, {name: H})
    # -> {name: (B,)}, without materialising g_i; None where the rule has no such route
    dot: Callable[[nn.Module, Call, dict], dict[str, torch.Tensor] | None] | None = None
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
