"""ImportanceRecorder: exact per-sample, per-layer sample importance for any nn.Module.

Gao & Jojic (section 2.2): with sample weights v_i in the batch loss (1/B) sum_i v_i L_i, the
affectibility of sample i is phi_i = d(delta theta)/d v_i of the step actually taken, and its
importance for layer d is beta_{i,d} = sum over layer d's parameters of phi_i^2. With g_i the
gradient of sample i's own loss (from the batch's forward pass) and B the batch size:

- plain SGD, learning rate lr:              phi_i = -(lr / B) g_i
- SGD with momentum mu, dampening tau (buf <- mu buf + (1 - tau) g; the first step buf <- g;
  delta theta = -lr buf):                   phi_i = -(lr / B) c g_i, c = 1 on a parameter's first
                                            step, (1 - tau) afterwards
- Nesterov (delta theta = -lr (g + mu buf)): c = 1 + mu on the first step, 1 + mu (1 - tau) after
- Adam / AdamW (torch.optim's step, bias-corrected, no amsgrad): the step is nonlinear in g but
  elementwise, so phi_i = f * g_i / B with f = d(delta theta)/dg the exact elementwise derivative
      f = -(lr / bc1) [ (1 - b1) / den - m (1 - b2) g / (den^2 sqrt(bc2) sqrt(v)) ],
  m, v the moments after this step, den = sqrt(v / bc2) + eps, bc_k = 1 - b_k^t (the second term
  is 0 where v = 0). g is the gradient the optimizer sees (with Adam's L2 weight decay added).
Weight decay never enters phi: it does not depend on v_i.

The per-sample gradients come from the registered rules (`rules/`), from the module's inputs
(forward hooks) and the gradient of the mean loss at its outputs (hooks on the outputs' autograd
nodes), in the same single backward pass that fills `.grad` as `loss_i.mean().backward()` does;
for the SGD family a layer's beta is taken as soon as its gradients arrive, the rest once the pass
is over. A convolution's per-sample weight gradients are taken inside its own backward
(`rules.FusedConv`), whose weight gradient is then their sum (equal to the batch's up to the
order of a float sum). BatchNorm in training
mode couples the samples (L_i depends on every sample through the batch statistics); it is refused
by default, and with batchnorm="exact" the full per-sample gradients g_i = dL_i/d theta are taken
through batched vector-Jacobian products of the B losses (`autograd.grad(is_grads_batched=True)`,
i.e. torch.func.vmap over vjp): exact, at several times the cost of one backward pass.
"""
from __future__ import annotations

import contextlib
import math
import warnings
import weakref
from functools import partial
from typing import Callable, Mapping

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_map

from ..errors import UserError
from .optim import step_factors, step_kind
from .rules import Call, batch_norm_couples, fallback_grads, rule_for
from .rules.broadcast import batch_less, meetings, pulled_back, spread_arguments

BATCHNORM_CHOICES = ("refuse", "exact")
ROOT = "_root"  # the name of parameters the model itself owns (an MLflow-safe name)


class ImportanceRecorder:
    """Hooks on a model that record beta (B, L) per backward pass; the model itself is not changed.

    Args:
        model: any nn.Module. A *layer* is a module that owns parameters directly (named by its
            path in `model.named_modules()`); nn.MultiheadAttention is one layer with its out_proj.
        batchnorm: "refuse" (default) raises when a BatchNorm normalises with batch statistics;
            "exact" computes exact phi_i through batched VJPs (costly).
        groups: None, an int (group layers by the first `groups` components of their names), a
            mapping {layer name: group name} or a callable layer name -> group name; `group_names`
            and `grouped(importance)` then give per-group sums.
    """

    def __init__(self, model: nn.Module, batchnorm: str = "refuse",
                 groups: int | Mapping[str, str] | Callable[[str], str] | None = None):
        if batchnorm not in BATCHNORM_CHOICES:
            raise UserError(f"batchnorm={batchnorm!r} is not one of {', '.join(BATCHNORM_CHOICES)}.")
        if hasattr(model, "_orig_mod") and type(model).__name__ == "OptimizedModule":
            raise UserError(_COMPILED)
        self.model, self.batchnorm = model, batchnorm
        self._layers: list[tuple[str, nn.Module, object, list[str]]] = []  # (name, module, rule, param names)
        claimed: list[str] = []
        for name, module in model.named_modules():
            if any(c == "" or name == c or name.startswith(c + ".") for c in claimed):
                continue
            rule = rule_for(module)
            recurse = rule is not None and rule.recurse
            names = [n for n, p in module.named_parameters(recurse=recurse) if p.requires_grad]
            if recurse:
                claimed.append(name)
            if names:
                self._layers.append((name or ROOT, module, rule, names))
        if not self._layers:
            raise UserError("The model has no parameter that requires a gradient: there is nothing to record.")
        # Which layer owns each parameter (the first that lists it: tied weights belong to one layer).
        self._owner: dict[int, int] = {}
        for d, (_, module, _, names) in enumerate(self._layers):
            for n in names:
                self._owner.setdefault(id(module.get_parameter(n)), d)
        # (name in the module, parameter) of each layer, looked up once
        self._named = [[(n, module.get_parameter(n)) for n in names] for _, module, _, names in self._layers]
        # The layers beta has a column for: those owning a parameter. A layer whose parameters are all
        # tied to an earlier one's (GPT-2's lm_head, BART's embed_tokens) is recorded, as one more use
        # of them, but has no column: each parameter's change is counted once, in its owner's.
        self._shown = [d for d, named in enumerate(self._named) if any(self._owner[id(p)] == d for _, p in named)]
        if len(self._shown) == len(self._layers):
            self._shown = None
        # Layers whose beta can be taken during the backward pass (`_plan_columns`): a norm route,
        # and no parameter that another layer also lists (tied weights add gradients first).
        listed: dict[int, int] = {}
        for named in self._named:
            for _, p in named:
                listed[id(p)] = listed.get(id(p), 0) + 1
        self._normed = [rule is not None and rule.sq_norms is not None and all(listed[id(p)] == 1 for _, p in named)
                        for (_, _, rule, _), named in zip(self._layers, self._named)]
        # Each layer's calls since the last recorder.backward: weak references (the hooks of a call's
        # autograd graph hold it, so a graph dropped without recorder.backward takes its calls along),
        # made strong for recorder.backward (`_hold_calls`; the pass frees its hooks as it goes).
        self._calls: dict[str, list] = {name: [] for name, *_ in self._layers}
        self._batch = 0  # B of the pass under way
        self._plans: dict[int, tuple[int, dict]] = {}  # id(call) -> (layer, f^2 per parameter name)
        self._columns: dict[int, torch.Tensor] = {}  # layer -> its beta column, taken during the pass
        self._dotted: dict[tuple[int, int], dict] = {}  # (layer, id(call)) -> {id(param): its contribution}, in the pass
        self._coupled: set[str] = set()
        self._capturing = True  # forward hooks record calls
        self._in_backward = False  # output gradients are taken only inside recorder.backward
        self._grads_before: list = []  # each parameter's .grad and its version before the backward pass
        # Every BatchNorm of the model, recorded or not (affine=False, frozen parameters): in training mode
        # each couples the samples of a batch wherever its input depends on parameters.
        self._batch_norms = [(name or ROOT, m) for name, m in model.named_modules()
                             if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        self._param_list = list({id(p): p for named in self._named for _, p in named}.values())
        # Layers whose module's own operation can take the per-sample norms in its backward
        # (`Rule.fused`): in passes where no BatchNorm couples the samples (`_on_pre_forward`: the
        # exact route of a coupled pass differentiates it again).
        self._fusable = [rule is not None and rule.fused is not None and self._normed[d]
                         for d, (_, _, rule, _) in enumerate(self._layers)]
        self._fusing: dict[int, object] = {}  # layer -> the fused context of its forward under way
        self._closed = False  # close() removed the hooks: backward refuses
        self.skipped = False  # the last backward's gradients were not finite: its scaler skips the step
        self._pending: dict | None = None  # what `expect` prepared for `collect`
        self.contribution: torch.Tensor | None = None  # (B, L) of the last step given a target; (B, L, K) for K
        self._steps: dict[int, int] = {}  # id(optimizer) -> its steps since the recorder first saw it
        self._last_step: tuple[int, int] | None = None  # (id(optimizer), its steps) at the last backward
        # the axis of a call's output gradient that holds the batch (`_check_call`)
        self._batch_axis = [1 if isinstance(m, nn.MultiheadAttention) and not m.batch_first else 0
                            for _, m, _, _ in self._layers]
        self._handles = [module.register_forward_hook(_Hook(self._on_forward, d), with_kwargs=True,
                                                      always_call=self._fusable[d])
                         for d, (_, module, _, _) in enumerate(self._layers)]
        self._handles += [module.register_forward_pre_hook(_Hook(self._on_pre_forward, d))
                          for d, (_, module, _, _) in enumerate(self._layers)]
        # the autograd sequence number at the start of each layer's forward under way (a stack: a
        # module may call itself): with the one at its end, the span of the nodes its call created
        self._starts: list[list[int]] = [[] for _ in self._layers]
        recorded = {id(m) for _, m, _, _ in self._layers}
        self._bn_recorded = [id(m) in recorded for _, m in self._batch_norms]
        self._handles += [m.register_forward_hook(_Hook(self._on_batch_norm, k)) for k, (_, m) in enumerate(self._batch_norms)]
        fallback = [f"{name} ({type(m).__name__})" for name, m, rule, _ in self._layers if rule is None]
        if fallback:
            warnings.warn("ImportanceRecorder: no exact rule for " + ", ".join(fallback) +
                          "; their per-sample gradients use the exact but slower torch.func fallback.",
                          stacklevel=2)
        self._set_groups(groups)

    # ------------------------------------------------------------ public API
    @property
    def layer_names(self) -> list[str]:
        """The columns of beta: the layers owning parameters, in `model.named_modules()` order."""
        names = [name for name, *_ in self._layers]
        return names if self._shown is None else [names[d] for d in self._shown]

    def layer_parameters(self, name: str) -> list[nn.Parameter]:
        """The parameters whose change is layer `name`'s column of beta (for a parameter count, or a
        reference computation): its own, less any tied to an earlier layer."""
        if name in self.layer_names:
            d = [n for n, *_ in self._layers].index(name)
            return [p for _, p in self._named[d] if self._owner[id(p)] == d]
        raise UserError(f"No layer {name!r}: the layers are {', '.join(self.layer_names)}.")

    @property
    def group_names(self) -> list[str]:
        return list(self._group_names)

    def grouped(self, importance: torch.Tensor) -> torch.Tensor:
        """Sum (B, L) importance over each group's layers: (B, G), in `group_names` order."""
        if self._one_per_group:
            return importance
        out = importance.new_zeros(importance.shape[0], len(self._group_names))
        return out.index_add_(1, self._group_index.to(importance.device), importance)

    @property
    def grouping(self) -> dict[str, str]:
        """{layer name: group name}: what the artifact contract stores."""
        return {n: self._group_names[g] for n, g in zip(self.layer_names, self._group_index.tolist())}

    def close(self) -> None:
        """Remove every hook; the model is as before."""
        for h in self._handles:
            h.remove()
        self._handles = []
        self._closed = True
        self._clear()

    def __enter__(self) -> "ImportanceRecorder":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def backward(self, loss_i: torch.Tensor, optimizer: torch.optim.Optimizer | None = None,
                 lr: float | None = None, batch_size: int | None = None, grad_scale: float = 1.0,
                 scaler: "torch.amp.GradScaler | None" = None, target: Mapping | None = None) -> torch.Tensor:
        """Backpropagate loss_i.mean() (filling .grad exactly as loss_i.mean().backward() does) and
        return beta (B, L) of the step the optimizer is about to take (call before optimizer.step()).

        Args:
            loss_i: (B,) per-sample losses of the batch, from one forward pass of the model.
            optimizer: torch.optim.SGD (momentum, Nesterov), Adam or AdamW; or
            lr: for plain SGD, instead of the optimizer.
            batch_size: when loss_i is a share of a larger batch — this process's (data-parallel
                training) or one micro-batch of several whose gradients accumulate before one
                optimizer.step() (SGD family only) — that batch's size: the loss is then
                loss_i.sum() / batch_size and beta that of phi_i = -(lr / batch_size) g_i (default: B).
            grad_scale: a factor on the backpropagated loss that the gradient the optimizer sees has
                lost again (DDP averages the processes' gradients: grad_scale = the number of
                processes); beta is that of the unscaled step.
            scaler: a torch.amp.GradScaler (float16 mixed precision): the loss is backpropagated
                times its scale, as scaler.scale(loss) does, and beta is that of the unscaled step
                (then call scaler.step(optimizer) and scaler.update()). Where the gradients are not
                finite, the step GradScaler will skip, beta is zeros and `skipped` is True.
            target: {parameter: gradient of a target loss L_V at the parameters before this step}
                (`target_gradient`): then `contribution` holds c (B, L), c_{i,d} = sum over layer
                d's parameters of <target gradient, phi_i>, sample i's first-order part of the
                change of L_V over this step, layer by layer.

        Under torch.autocast (bfloat16 or float16) the rules read the captured inputs and output
        gradients in float32: beta of the step taken, up to the rounding of the half-precision
        forward and backward (tests/test_recorder_training.py states the tolerance).
        """
        loss = self.expect(loss_i, optimizer=optimizer, lr=lr, batch_size=batch_size, grad_scale=grad_scale,
                           target=target)
        try:
            if scaler is not None and scaler.is_enabled():  # as scaler.scale(loss) in a plain loop
                loss = scaler.scale(loss)
                self._pending["loss_scale"] = float(scaler.get_scale())
            self._pending["scaler"] = scaler is not None
            loss.backward()
        except BaseException:
            self._end()
            raise
        return self.collect()

    def expect(self, loss_i: torch.Tensor, *, optimizer: torch.optim.Optimizer | None = None,
               lr: float | None = None, batch_size: int | None = None, grad_scale: float = 1.0,
               loss_scale: float = 1.0, target: Mapping | None = None) -> torch.Tensor:
        """`backward` in two halves, for a framework that runs the backward pass itself (HuggingFace's
        Trainer through accelerate, Lightning): returns the loss to backpropagate — loss_i.mean(),
        or loss_i.sum() / batch_size, times grad_scale — and `collect()` after the pass returns beta.
        The same arguments as `backward`; loss_scale: a factor the framework puts on that loss before
        its backward pass (a GradScaler's scale), divided out of beta and of Adam's gradient; where it
        is not 1 a pass with gradients that are not finite gives zeros and `skipped`."""
        try:
            if self._closed:
                raise UserError("This ImportanceRecorder was closed (close() or the end of its with block) and "
                                "records nothing: create a new ImportanceRecorder(model) for further steps.")
            if not isinstance(loss_i, torch.Tensor) or loss_i.dim() != 1 or not loss_i.requires_grad:
                raise UserError("recorder.backward needs the (B,) per-sample losses with gradients, e.g. "
                                "F.cross_entropy(model(x), y, reduction='none').")
            if (optimizer is None) == (lr is None):
                raise UserError("recorder.backward needs exactly one of optimizer= or lr= (lr only for plain SGD).")
            kind = "sgd" if optimizer is None else step_kind(optimizer)
            rates = [lr] if optimizer is None else [group["lr"] for group in optimizer.param_groups]
            if not all(isinstance(r, (int, float, torch.Tensor)) and math.isfinite(float(r)) and float(r) >= 0
                       for r in rates):
                raise UserError(f"recorder.backward needs a finite learning rate >= 0, got lr={rates[0]!r}"
                                + ("" if optimizer is None else " in the optimizer") + ".")
            B = loss_i.shape[0]
            total = B if batch_size is None else batch_size
            refused = self._accumulation(optimizer, kind, B, batch_size, grad_scale)
            self._grads_before = [(p, p.grad, -1 if p.grad is None else p.grad._version) for p in self._params()]
            full = None
            self._hold_calls()
            self._check_loss_length(B)
            if self._coupled:
                full = self._batched_vjp(loss_i, total)
            factors = self._factors(optimizer, lr, kind) if kind == "sgd" else None  # the SGD family's need no .grad
            target = self._target(target)
            if full is None and kind == "sgd":
                self._plan_columns(B, factors, target)
            self._batch = B
            refused = refused or (self._walk(loss_i, B) if full is None else self._walk(loss_i, B, spread=False))
            self._pending = dict(loss_i=loss_i, optimizer=optimizer, lr=lr, kind=kind, factors=factors, full=full,
                                 refused=refused, grad_scale=grad_scale, loss_scale=float(loss_scale),
                                 scaler=loss_scale != 1, target=target)
            self._in_backward = full is None
            return batch_loss(loss_i, batch_size, grad_scale)
        except BaseException:
            self._end()
            raise

    def collect(self) -> torch.Tensor:
        """beta (B, L) of the step about to be taken, once the pass of the loss `expect` returned has
        run (call before optimizer.step())."""
        try:
            p = self._pending
            if p is None:
                raise UserError("recorder.collect() needs recorder.expect(loss_i, ...) and then the backward pass of "
                                "the loss it returned.")
            self._in_backward = False
            if not self._reached():
                raise UserError("No backward pass reached the recorded parameters between recorder.expect() and "
                                "recorder.collect(): backpropagate the loss expect() returned.")
            if p["refused"]:  # said once the pass is over, .grad complete
                raise UserError(p["refused"])
            loss_i, scale = p["loss_i"], p["loss_scale"]
            B = loss_i.shape[0]
            self.skipped = p["scaler"] and not self._finite(p["optimizer"])
            self.contribution = None
            if self.skipped:  # GradScaler skips this step: nothing moves
                if p["target"] is not None:
                    K = self._stack_size(p["target"])
                    self.contribution = torch.zeros(B, len(self.layer_names), *(() if K is None else (K,)),
                                                    dtype=loss_i.dtype, device=loss_i.device)
                return torch.zeros(B, len(self.layer_names), dtype=loss_i.dtype, device=loss_i.device)
            factors = p["factors"]
            if factors is None:
                factors = self._factors(p["optimizer"], p["lr"], p["kind"], unscale=scale)
            beta = self._importance(B, factors, p["full"], loss_i)
            # The output gradients the rules read carry grad_scale and the loss scale; the batched VJPs do not.
            carried = 1.0 if p["full"] is not None else p["grad_scale"] * scale
            if p["target"] is not None:
                c = self._contribution(B, factors, p["full"], p["target"], loss_i)
                self.contribution = (c if self._shown is None else c[:, self._shown]) / carried
            if self._shown is not None:
                beta = beta[:, self._shown]
            return beta if carried == 1 else beta / carried ** 2
        finally:
            self._end()

    def cancel(self) -> None:
        """Drop what `expect` prepared, for a pass that will not be collected."""
        self._end()

    def _end(self) -> None:
        """After a step, recorded or refused: the hooks record again, nothing is held."""
        self._capturing, self._in_backward, self._pending = True, False, None
        self._clear()

    # ------------------------------------------------------------ hooks
    def _on_pre_forward(self, d: int, module: nn.Module, args: tuple) -> None:
        if not (self._capturing and torch.is_grad_enabled()):
            return
        self._starts[d].append(_sequence_number())
        if self._fusable[d] and len(args) == 1 and isinstance(args[0], torch.Tensor) \
                and not torch._C._are_functorch_transforms_active() and not _autocasting(args[0].device.type) \
                and not any(batch_norm_couples(m) for _, m in self._batch_norms):
            fused = self._layers[d][2].fused(module, Call((args[0].detach(),), {}, [None]), self)
            fused.__enter__()
            self._fusing[d] = fused

    def _on_forward(self, d: int, module: nn.Module, args: tuple, kwargs: dict, output) -> None:
        fused = self._fusing.pop(d, None) if self._fusing else None
        span = (self._starts[d].pop(), _sequence_number()) if self._starts[d] else None
        if fused is not None:  # its context ends with the module's forward, also where that raised
            fused.__exit__(None, None, None)
            if fused.used and output is not None:
                fused.call.pending = 1  # the output gradient comes from its backward (`arrive`)
                fused.call.span = span
                self._keep(self._layers[d][0], fused.call)
                return
        if not self._capturing or output is None or not torch.is_grad_enabled() or span is None:
            return
        name = self._layers[d][0]
        # the common case (Linear, Conv, norms), without pytrees
        if isinstance(output, torch.Tensor) and not kwargs and len(args) == 1 and isinstance(args[0], torch.Tensor):
            call = Call((args[0].detach(),), kwargs, [None], span=span, autocast=_autocasting(output.device.type))
            if output.requires_grad:
                self._watch(output, call, 0)
                call.pending = 1
                rule = self._layers[d][2]
                if rule is not None and rule.saved is not None:
                    call.extra = rule.saved(module, output)
            self._keep(name, call)
            return
        outs = [output] if isinstance(output, torch.Tensor) else \
            [t for t in tree_flatten(output)[0] if isinstance(t, torch.Tensor)]
        args = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)
        if kwargs:
            kwargs = tree_map(lambda t: t.detach() if isinstance(t, torch.Tensor) else t, kwargs)
        call = Call(args, kwargs, [None] * len(outs), span=span,
                    autocast=bool(outs) and _autocasting(outs[0].device.type))
        for k, t in enumerate(outs):
            if t.requires_grad:
                self._watch(t, call, k)
                call.pending += 1
        rule = self._layers[d][2]
        if rule is not None and rule.inner is not None and call.pending and name not in self._coupled:
            for key, node in rule.inner(module, call, output).items():
                node.register_prehook(partial(self._on_inner_grad, call, key))
                call.pending += 1
        self._keep(name, call)

    def _keep(self, name: str, call: Call) -> None:
        """Layer `name`'s new call: held weakly outside recorder.backward (its graph's hooks hold it:
        a call without any never receives a gradient), strongly during it (a forward recomputed in
        the pass, as activation checkpointing does, frees its hooks before the pass ends)."""
        self._calls[name].append(call if self._in_backward else weakref.ref(call))

    def _check_loss_length(self, B: int) -> None:
        """loss_i must hold one loss per sample of the forward pass: where every recorded call saw
        the same batch on its batch axis and no call's input has B on any axis, the loss has the
        wrong length (B elsewhere in an input is a batch on another axis, which `_check_call` names
        after the pass; calls on batch-less inputs, such as position embeddings, leave it open)."""
        index = {name: d for d, (name, *_rest) in enumerate(self._layers)}
        inputs = [(c.args[0], self._batch_axis[index[name]]) for name, calls in self._calls.items() for c in calls
                  if c.args and isinstance(c.args[0], torch.Tensor)]
        sizes = {x.shape[axis] for x, axis in inputs if x.dim() > axis}
        if len(sizes) == 1 and not any(B in x.shape for x, _ in inputs):
            raise UserError(f"loss_i has {B} values, but the forward pass had {sizes.pop()} samples: pass one loss per "
                            "sample of the batch (reduction='none').")

    def _hold_calls(self) -> None:
        """Before the pass: the calls whose graphs are still alive, held strongly until `_clear`."""
        for name, refs in self._calls.items():
            self._calls[name] = [c for c in (r() for r in refs) if c is not None]

    def _on_batch_norm(self, k: int, module: nn.Module, args: tuple, output) -> None:
        """Every BatchNorm of the model, after its forward: with batch statistics it couples the
        samples — a recorded one always (its own rule takes running statistics), one without
        parameters to record wherever its input depends on parameters (not on the data alone)."""
        if self._capturing and torch.is_grad_enabled() and batch_norm_couples(module) and (
                self._bn_recorded[k] or any(isinstance(a, torch.Tensor) and a.requires_grad for a in args)):
            self._couple(self._batch_norms[k][0])

    def _couple(self, name: str) -> None:
        """A BatchNorm normalised with batch statistics in this pass: refused, or the exact route."""
        if self.batchnorm == "refuse":
            # this one, and the recorded ones that use batch statistics too (an unrecorded one
            # couples only where its input depends on parameters)
            bn = [name] + [n for n, m, *_ in self._layers if n != name and batch_norm_couples(m)]
            raise UserError(
                f"BatchNorm normalising with batch statistics ({', '.join(bn)}) couples the samples of a "
                "batch, so per-sample importance has no outer-product rule: pass batchnorm='exact' (exact, "
                "slower), use GroupNorm, or put the BatchNorm layers in eval mode.")
        self._coupled.add(name)

    def _watch(self, t: torch.Tensor, call: Call, k: int) -> None:
        """Have the gradient of output t (leaf k of the call's output) reach `_on_output_grad`: through a
        prehook on t's autograd node (a tensor hook's gradient, at less cost per call), or a tensor
        hook where t has no node."""
        if t.grad_fn is None:
            t.register_hook(partial(self._on_output_grad, call, k))
        else:
            t.grad_fn.register_prehook(partial(self._on_node_grad, call, k, t.output_nr))
            if call.leaves is None:
                call.leaves = {}
            call.leaves[k] = (t.grad_fn._sequence_nr(), t.output_nr, t.shape)

    def _on_node_grad(self, call: Call, k: int, nr: int, grad_outputs: tuple) -> None:
        if grad_outputs[nr] is not None:  # as a tensor hook, which no undefined gradient calls
            self._on_output_grad(call, k, grad_outputs[nr])

    def _on_output_grad(self, call: Call, k: int, grad: torch.Tensor) -> None:
        if not self._in_backward:  # another backward pass of the user's: a stale call stays without grads
            return
        if call.spread is not None and k in call.spread:  # a batch-less output: its per-sample gradients
            shares, shape = call.spread.pop(k), call.leaves[k][2]
            lead = len(shape) > 0 and shape[0] == 1  # the leading axis of 1 stands for the batch
            grad = grad.new_zeros(self._batch, *shape) if shares is None else shares  # (B, *shape)
            if lead:
                grad = grad.squeeze(1)
            if not call.spread:
                call.args, call.kwargs = spread_arguments(call, self._batch, lead)
        call.grads[k] = grad.detach() if call.grads[k] is None else call.grads[k] + grad.detach()
        self._arrived(call)

    def wants(self, call: Call) -> bool:
        """For a fused rule's backward: whether the pass under way takes this call's norms."""
        return self._in_backward and id(call) in self._plans

    def arrive(self, call: Call, grad: torch.Tensor) -> None:
        """For a fused rule's backward: the call's output gradient, as a tensor hook would give it."""
        self._on_output_grad(call, 0, grad)

    def _on_inner_grad(self, call: Call, key: str, grad_outputs) -> None:
        if self._in_backward:
            call.inner_grads = {**(call.inner_grads or {}), key: grad_outputs[0].detach()}
            self._arrived(call)

    def _arrived(self, call: Call) -> None:
        """One more of the call's gradients is in; with the last of them, a planned column is taken
        and the call's tensors let go as the pass goes on."""
        call.pending -= 1
        if call.pending:
            return
        plan = self._plans.pop(id(call), None)
        if plan is not None:
            d, f2, dots, keep = plan
            try:
                self._columns[d] = self._column(d, call, f2)
            except UserError:  # said after the pass by the general path, with .grad complete
                return
            if keep or (dots and not self._dot_parts(d, call, dots)):
                return  # the contribution's general path reads the call after the pass
            call.args, call.kwargs, call.extra, call.inner_grads = (), {}, None, None
            call.grads = [None] * len(call.grads)

    def _plan_columns(self, B: int, factors: dict, target: dict | None = None) -> None:
        """Before an SGD-family backward pass: every layer called once, with a norm route, gets its
        beta column as soon as the last of its gradients arrives (`_arrived`), so the recorder holds
        no layer's input and output gradient until the end of the pass (memory, and the allocator
        reuses what the pass frees as it would without the recorder). With a target (one, not
        stacked), such a layer with a dot route takes its contribution then too."""
        single = target is not None and self._stack_size(target) is None
        for d, (name, _, rule, _) in enumerate(self._layers):
            calls = self._calls[name]
            if self._normed[d] and len(calls) == 1 and calls[0].pending:
                f2 = {n: 0.0 if factors.get(id(p)) is None else factors[id(p)] ** 2 for n, p in self._named[d]}
                dots = {n: (target[id(p)], factors[id(p)]) for n, p in self._named[d]
                        if single and rule.dot is not None and id(p) in target and factors.get(id(p)) is not None}
                keep = target is not None and len(dots) < len(self._named[d])  # the rest read after the pass
                self._plans[id(calls[0])] = (d, f2, dots, keep)
        self._batch = B

    def _dot_parts(self, d: int, call: Call, dots: dict) -> bool:
        """Layer d's contribution from its one call during the pass (`_plan_columns`): per parameter,
        f <G, g_i> by the rule's dot route, kept for `_contribution`; False where the route declines."""
        _, module, rule, _ = self._layers[d]
        got = rule.dot(module, call, {n: G for n, (G, _) in dots.items()})
        if got is None or any(n not in got for n in dots):
            return False
        named = dict(self._named[d])
        self._dotted[(d, id(call))] = {id(named[n]): (got[n] * f).detach() for n, (_, f) in dots.items()}
        return True

    def _column(self, d: int, call: Call, f2: dict) -> torch.Tensor:
        """Layer d's beta column from its one call: sum over its parameters of f^2 ||g_i||^2. A
        UserError where the call cannot be used (its output without the batch on its first axis, a
        module configuration the rule refuses): the general path then says so, after the pass."""
        name, module, rule, _ = self._layers[d]
        self._check_call(d, call, self._batch)
        _full_precision(call)
        if rule.sq_norm_column is not None:
            column = rule.sq_norm_column(module, call, f2)
            if column is not None:
                return column.detach()
        norms = rule.sq_norms(module, call)
        column = None
        for n, f in f2.items():
            if f and n in norms:
                column = norms[n] * f if column is None else column + norms[n] * f
        return torch.zeros(self._batch, dtype=call.grads[0].dtype, device=call.grads[0].device) \
            if column is None else column.detach()

    def _reached(self) -> set[int]:
        """The parameters whose .grad the backward pass changed (a new tensor, or one added to in place)."""
        return {id(p) for p, grad, version in self._grads_before
                if p.grad is not grad or (grad is not None and grad._version != version)}

    def _clear(self) -> None:
        for calls in self._calls.values():
            calls.clear()
        self._coupled = set()
        self._grads_before = []
        self._plans, self._columns, self._dotted = {}, {}, {}

    def _accumulation(self, optimizer, kind: str, B: int, batch_size: int | None, grad_scale: float) -> str | None:
        """Gradient accumulation: several recorder.backward calls (micro-batches, each passing the
        whole step's batch_size) before one optimizer.step(). The SGD family's phi_i needs only the
        step's factor, known before the step, so each micro-batch's beta is exact as it comes. Adam's
        factor depends on the whole step's gradient, known only once the last micro-batch is in:
        refused (with the reason) where the recorder sees a micro-batch — a batch_size above this
        loss's samples without grad_scale (data-parallel training passes grad_scale), or a second
        recorder.backward before the optimizer's step (counted by a step hook)."""
        if optimizer is None:
            return None
        key = id(optimizer)
        if key not in self._steps:
            self._steps[key] = 0

            def stepped(*_args, key=key):
                self._steps[key] += 1
            self._handles.append(optimizer.register_step_post_hook(stepped))
        again = self._last_step == (key, self._steps[key])  # no step since the last recorder.backward
        self._last_step = (key, self._steps[key])
        if kind == "sgd":
            return None
        if again or (batch_size is not None and batch_size != B and grad_scale == 1):
            return ("Adam's step depends on the whole step's gradient, known only once the last micro-batch is "
                    "in, so the recorder does not record gradient accumulation with Adam/AdamW: record one batch "
                    "per optimizer step (SGD, with momentum or Nesterov, records micro-batches exactly); in "
                    "data-parallel training pass grad_scale=the number of processes.")
        return None

    def _walk(self, loss_i: torch.Tensor, B: int, spread: bool = True) -> str | None:
        """One walk of the loss's autograd graph before the pass, for what the calls alone cannot tell.

        - Every use of a recorded parameter: each edge into a parameter's accumulator comes from a
          node whose sequence number says whether a recorded call of a layer listing it made it
          (`Call.span`). A use outside them (`x @ layer.weight.t()` beside `layer(x)`,
          `F.linear(h, emb.weight[:10])`) has no rule: refused. (A parameter of a layer never called
          is left to `_importance`, which names it.)
        - Outputs without the batch (position embeddings on an `arange` index, relative-position
          biases), with spread=True: where they meet the batch, `_spread` wires their per-sample
          gradients.
        Returns the sentence to refuse with after the pass, or None."""
        spans: dict[int, list[tuple[int, int]]] = {}
        wanted: dict[int, list] = {}  # sequence number of a batch-less output's node -> [(call, leaf k, nr, shape)]
        for d, (name, *_rest) in enumerate(self._layers):
            for c in self._calls[name]:
                if c.span is not None:
                    for _, p in self._named[d]:
                        spans.setdefault(id(p), []).append(c.span)
                if spread and c.leaves and self._batch_axis[d] == 0:
                    for k, (seq, nr, shape) in c.leaves.items():
                        if (len(shape) == 0 or shape[0] != B) and batch_less(c, shape, B):
                            wanted.setdefault(seq, []).append((d, c, k, nr, shape))
        root = loss_i.grad_fn
        if root is None:
            return None
        outside: dict[int, object] = {}
        consumers: dict = {} if wanted else None  # node -> [(consumer, input index)]
        found: dict[int, object] = {}  # sequence number -> node, for `wanted`
        seen, todo = {root}, [root]
        compiled = False
        while todo:
            node = todo.pop()
            if wanted and node._sequence_nr() in wanted:
                found[node._sequence_nr()] = node
            compiled = compiled or type(node).__name__ == "CompiledFunctionBackward"
            for j, (child, _) in enumerate(node.next_functions):
                if child is None:
                    continue
                if isinstance(child, _ACCUMULATE):
                    pid = id(child.variable)
                    if pid in spans and pid not in outside:
                        s = node._sequence_nr()
                        if not any(a <= s < b for a, b in spans[pid]):
                            outside[pid] = node
                    continue
                if consumers is not None:
                    consumers.setdefault(child, []).append((node, j))
                if child not in seen:
                    seen.add(child)
                    todo.append(child)
        if compiled:
            return _COMPILED
        refusals = []
        for seq, node in found.items():
            for d, call, k, nr, shape in wanted[seq]:
                problem = self._spread(call, k, node, nr, consumers, B)
                if problem:
                    refusals.append(f"The output of {self._layers[d][0]} has no batch axis and {problem}")
        if outside:
            names = {id(p): (name + "." if name != ROOT else "") + n
                     for (name, *_r), named in zip(self._layers, self._named) for n, p in named}
            used = ", ".join(f"{names[pid]} (by {type(node).__name__})" for pid, node in outside.items())
            refusals.append(f"The loss uses {used} outside the forward of the module that owns it, beside that "
                            "module's own calls, and a gradient taken there has no per-sample rule: use each "
                            "parameter only through its module (tie weights by sharing the Parameter between two "
                            "modules instead).")
        return " ".join(refusals) or None

    def _spread(self, call: Call, k: int, origin, nr: int, consumers: dict, B: int) -> str | None:
        """Wire the per-sample gradients of a batch-less output (leaf k of `call`, output `nr` of
        autograd node `origin`): prehooks where it meets the batch (`broadcast.meetings`) gather each
        sample's share into call.spread[k]. Returns what is refused instead, or None."""
        paths, problem = meetings(origin, nr, consumers, B)
        if problem or not paths:  # no path: no gradient reaches it through the batch, it has none
            return problem
        call.spread = {**(call.spread or {}), k: None}
        for meeting, j, path in paths:
            meeting.register_prehook(partial(self._on_meeting, call, k, meeting, j, path))
        return None

    def _on_meeting(self, call: Call, k: int, meeting, j: int, path: list, grad_outputs: tuple) -> None:
        if not self._in_backward or grad_outputs[0] is None or call.spread is None or k not in call.spread:
            return
        share = pulled_back(meeting, j, path, grad_outputs[0])
        call.spread[k] = share if call.spread[k] is None else call.spread[k] + share

    # ------------------------------------------------------------ the computation
    def _params(self) -> list[nn.Parameter]:
        """Every recorded parameter once (tied ones too), in layer order."""
        return self._param_list

    def _batched_vjp(self, loss_i: torch.Tensor, total: int) -> dict[int, torch.Tensor]:
        """{param id: (B, *shape) g_i / total}: row i of the Jacobian of the losses, exact under any
        coupling of the samples (training-mode BatchNorm)."""
        B = loss_i.shape[0]
        params = self._params()
        self._capturing = False
        eye = torch.eye(B, dtype=loss_i.dtype, device=loss_i.device)
        jac = torch.autograd.grad(loss_i, params, grad_outputs=eye, retain_graph=True, is_grads_batched=True,
                                  allow_unused=True)
        return {id(p): (torch.zeros(B, *p.shape, dtype=p.dtype, device=p.device) if j is None else j / total)
                for p, j in zip(params, jac)}

    def _finite(self, optimizer) -> bool:
        """Whether every gradient the step reads is finite (GradScaler's test for skipping it)."""
        params = self._params() if optimizer is None else [p for g in optimizer.param_groups for p in g["params"]]
        checks = [torch.isfinite(p.grad).all() for p in params if p.grad is not None]
        return not checks or bool(torch.stack(checks).all())

    def _factors(self, optimizer, lr, kind: str, unscale: float = 1.0) -> dict[int, float | torch.Tensor]:
        return step_factors(optimizer, lr, kind, self._params(), unscale)

    def _importance(self, B: int, factors: dict, full: dict | None, loss_i: torch.Tensor) -> torch.Tensor:
        L = len(self._layers)
        if len(self._columns) == L:  # every layer's column was taken during the pass
            return torch.stack([self._columns[d] for d in range(L)], 1).to(loss_i.dtype)
        beta = torch.zeros(B, L, dtype=loss_i.dtype, device=loss_i.device)
        if full is not None:
            for pid, G in full.items():
                f = factors.get(id_ := pid)
                if f is not None and id_ in self._owner:
                    beta[:, self._owner[pid]] += (f * G).flatten(1).square().sum(1).to(beta.dtype)
            return beta.detach()
        for d, column in self._columns.items():
            beta[:, d] = column.to(beta.dtype)
        sources = self._sources(B)
        norms: dict[tuple[int, int], dict] = {}
        grads: dict[tuple[int, int], dict] = {}
        for pid, srcs in sources.items():
            f = factors.get(pid)
            if f is None or not srcs:
                continue
            d = self._owner[pid]
            if isinstance(f, float) and len(srcs) == 1 and self._layers[srcs[0][0]][2] is not None \
                    and self._layers[srcs[0][0]][2].sq_norms is not None:
                sd, c, n = srcs[0]
                key = (sd, id(c))
                if key not in norms:
                    _, module, rule, _ = self._layers[sd]
                    norms[key] = rule.sq_norms(module, c)
                beta[:, d] += (f * f) * norms[key][n].to(beta.dtype)
                continue
            if not isinstance(f, float) and len(srcs) == 1 and self._layers[srcs[0][0]][2] is not None \
                    and self._layers[srcs[0][0]][2].weighted_sq_norms is not None:
                sd, c, n = srcs[0]
                _, module, rule, _ = self._layers[sd]
                got = rule.weighted_sq_norms(module, c, {n: f * f})
                if got is not None and n in got:
                    beta[:, d] += got[n].to(beta.dtype)
                    continue
            G = None
            for sd, c, n in srcs:
                key = (sd, id(c))
                if key not in grads:
                    grads[key] = self._grads(sd, c)
                G = grads[key][n] if G is None else G + grads[key][n]
            beta[:, d] += (f * G).flatten(1).square().sum(1).to(beta.dtype)
        return beta.detach()

    def _sources(self, B: int, taken=None) -> dict[int, list[tuple[int, Call, str]]]:
        """{id(parameter): [(layer, call, name in the layer's module)]}: where each parameter's
        per-sample gradient comes from (every recorded call of every layer holding it); a layer
        in `taken` (default: those whose beta column was taken during the pass) lists its
        parameters with no source."""
        taken = self._columns if taken is None else taken
        sources: dict[int, list[tuple[int, Call, str]]] = {}
        for d, (name, module, rule, names) in enumerate(self._layers):
            if d in taken:
                for _, p in self._named[d]:
                    sources[id(p)] = []  # accounted for
                continue
            calls = [c for c in self._calls[name] if any(g is not None for g in c.grads)]
            for c in calls:
                self._check_call(d, c, B)
                _full_precision(c)
            for n, p in self._named[d]:
                for c in calls:
                    sources.setdefault(id(p), []).append((d, c, n))
        missing = [self._layers[self._owner[pid]][0] for pid in self._reached()
                   if pid in self._owner and pid not in sources]
        if missing:
            raise UserError("Parameters of " + ", ".join(sorted(set(missing))) + " received gradients without a "
                            "recorded call of their module (used directly by another module): ImportanceRecorder "
                            "needs each parameter used only inside its own module's forward.")
        return sources

    @contextlib.contextmanager
    def unrecorded(self):
        """Forward passes inside this block are not recorded: a target or evaluation pass with gradients
        between steps costs what it costs without the recorder (recording stays as it was outside)."""
        before, self._capturing = self._capturing, False
        try:
            yield self
        finally:
            self._capturing = before

    def target_gradient(self, loss_v: torch.Tensor) -> dict[nn.Parameter, torch.Tensor]:
        """{parameter: d loss_v / d parameter} for `target=` of the coming step: the gradient of a
        target loss (e.g. the mean loss of held-out samples, forward pass in evaluation mode) at the
        parameters before the step; .grad is left as it is. `loss_v` of shape (K,), K target losses
        (say, one per test sample): each parameter's K gradients stacked, (K, *shape), by one batched
        backward pass; `contribution` is then (B, L, K)."""
        params = self._params()
        if loss_v.dim() == 0:
            grads = torch.autograd.grad(loss_v, params, allow_unused=True)
            return {p: torch.zeros_like(p) if g is None else g.detach() for p, g in zip(params, grads)}
        K = loss_v.shape[0]
        eye = torch.eye(K, dtype=loss_v.dtype, device=loss_v.device)
        grads = torch.autograd.grad(loss_v, params, grad_outputs=eye, is_grads_batched=True, allow_unused=True)
        return {p: p.new_zeros(K, *p.shape) if g is None else g.detach() for p, g in zip(params, grads)}

    def _target(self, target: Mapping | None) -> dict[int, torch.Tensor] | None:
        if target is None:
            return None
        out = {id(p): g for p, g in target.items()}
        unknown = [p for p in out if p not in self._owner]
        shapes = {tuple(out[id(p)].shape[:out[id(p)].dim() - p.dim()]) for p in self._params() if id(p) in out
                  if tuple(out[id(p)].shape[out[id(p)].dim() - p.dim():]) == tuple(p.shape)}
        if unknown or len(shapes) != 1 or len(next(iter(shapes))) > 1 or \
                any(out[id(p)].dim() - p.dim() not in (0, 1) for p in self._params() if id(p) in out):
            raise UserError("target= maps the recorded parameters to gradients of their shapes (or K of them, "
                            "stacked): pass recorder.target_gradient(loss_v).")
        return out

    def _stack_size(self, target: dict) -> int | None:
        """K where `target` holds K stacked target gradients per parameter, else None."""
        dims = {id(p): p.dim() for p in self._params()}
        return next((g.shape[0] for pid, g in target.items() if g.dim() > dims[pid]), None)

    def _contribution(self, B: int, factors: dict, full: dict | None, target: dict, loss_i: torch.Tensor) -> torch.Tensor:
        """c (B, L): per layer, sum over its parameters of <target gradient, phi_i> = <f * G, g_i / B>,
        by each rule's `dot` route, else from its per-sample gradients."""
        stacked = self._stack_size(target)
        c = torch.zeros(B, len(self._layers), *(() if stacked is None else (stacked,)), dtype=loss_i.dtype,
                        device=loss_i.device)
        # <f * G, g> with f a number (the SGD family) is f <G, g>: the number multiplies the result, not G.
        scaled, after = {}, {}
        for pid, g in target.items():
            f = factors.get(pid)
            if f is not None:
                scaled[pid], after[pid] = (f * g, 1.0) if isinstance(f, torch.Tensor) else (g, float(f))
        flat = (lambda H: H.flatten()) if stacked is None else (lambda H: H.flatten(1).T)  # (P,) or (P, K)
        if full is not None:
            for pid, G in full.items():
                if pid in scaled:
                    c[:, self._owner[pid]] += (G.flatten(1) @ flat(scaled[pid]).to(G.dtype)) * after[pid]
            return c.detach()
        for parts in self._dotted.values():  # taken during the pass (`_dot_parts`)
            for pid, v in parts.items():
                c[:, self._owner[pid]] += v.to(c.dtype)
        grads: dict[tuple[int, int], dict] = {}
        for pid, srcs in self._sources(B, taken={d for d, _ in self._dotted}).items():
            H = scaled.get(pid)
            if H is None:
                continue
            d = self._owner[pid]
            for sd, call, n in srcs:
                if pid in self._dotted.get((sd, id(call)), ()):
                    continue
                _, module, rule, _ = self._layers[sd]
                got = rule.dot(module, call, {n: H}) if rule is not None and rule.dot is not None else None
                if got is not None and n in got:
                    c[:, d] += (got[n] * after[pid]).to(c.dtype)
                    continue
                key = (sd, id(call))
                if key not in grads:
                    grads[key] = self._grads(sd, call)
                G = grads[key][n]
                c[:, d] += ((G.flatten(1) @ flat(H).to(G.dtype)) * after[pid]).to(c.dtype)
        return c.detach()

    def _grads(self, d: int, call: Call) -> dict[str, torch.Tensor]:
        name, module, rule, names = self._layers[d]
        if rule is not None:
            return rule.grads(module, call)
        self._capturing = False  # the re-run must not record itself
        try:
            return fallback_grads(module, call, names)
        finally:
            self._capturing = True

    def _check_call(self, d: int, call: Call, B: int) -> None:
        g = call.grads[0] if call.grads[0] is not None else next(g for g in call.grads if g is not None)
        if g.dim() == 0 or g.shape[self._batch_axis[d]] != B:
            raise UserError(f"The output of {self._layers[d][0]} does not have the batch of {B} samples on its "
                            "first axis: the recorder needs batch-first inputs (e.g. batch_first=True for "
                            "Transformer layers).")

    def _set_groups(self, groups) -> None:
        if groups is None:
            of = lambda n: n  # noqa: E731
        elif isinstance(groups, bool) or (isinstance(groups, int) and groups < 1):
            raise UserError(f"groups={groups!r}: give a prefix depth of at least 1, a mapping or a function.")
        elif isinstance(groups, int):
            of = lambda n: ".".join(n.split(".")[:groups])  # noqa: E731
        elif isinstance(groups, Mapping):
            unknown = sorted(set(groups) - set(self.layer_names))
            missing = [n for n in self.layer_names if n not in groups]
            if unknown or missing:
                raise UserError("groups must map exactly the recorded layers: " +
                                (f"unknown {', '.join(unknown)}; " if unknown else "") +
                                (f"missing {', '.join(missing)}" if missing else "") +
                                f" (the layers are {', '.join(self.layer_names)}).")
            of = groups.__getitem__
        elif callable(groups):
            of = groups
        else:
            raise UserError(f"groups={groups!r}: give a prefix depth, a mapping or a function.")
        names: list[str] = []
        index = []
        for n in self.layer_names:
            g = str(of(n))
            if g not in names:
                names.append(g)
            index.append(names.index(g))
        self._group_names = names
        self._group_index = torch.tensor(index, dtype=torch.long)
        self._one_per_group = index == list(range(len(index)))  # grouped() is then the identity


def batch_loss(loss_i: torch.Tensor, batch_size: int | None = None, grad_scale: float = 1.0) -> torch.Tensor:
    """The loss one step backpropagates: loss_i.mean(), or, for this process's share of a batch of
    `batch_size` samples, loss_i.sum() / batch_size; times `grad_scale` (see `backward`)."""
    loss = loss_i.mean() if batch_size is None or batch_size == len(loss_i) else loss_i.sum() / batch_size
    return loss if grad_scale == 1 else loss * grad_scale


class _Hook:
    """A hook calling the recorder's fn(d, *args) for layer d. A copy of the model (copy.deepcopy,
    pickling) gets a hook that does nothing: the recorder belongs to the original model only."""

    __slots__ = ("fn", "d")

    def __init__(self, fn=None, d: int = 0):
        self.fn, self.d = fn, d

    def __call__(self, *args):
        return None if self.fn is None else self.fn(self.d, *args)

    def __deepcopy__(self, memo) -> "_Hook":
        return _Hook()

    def __reduce__(self):
        return _Hook, ()


_COMPILED = ("ImportanceRecorder records the modules' calls one by one, which torch.compile fuses out of sight: "
             "record the eager model (model._orig_mod of a compiled one) and compile a copy for what you do not record.")
_ACCUMULATE = torch._C._functions.AccumulateGrad  # the autograd node of a leaf's .grad


_HALF = (torch.float16, torch.bfloat16)


def _full_precision(call: Call) -> None:
    """A call from a forward under torch.autocast, its half-precision tensors (inputs, output and
    inner gradients, saved tensors) in float32, for rules that accumulate in float32."""
    def up(t):
        return t.float() if isinstance(t, torch.Tensor) and t.dtype in _HALF else t
    if call.autocast and any(isinstance(t, torch.Tensor) and t.dtype in _HALF
           for t in tree_flatten((call.args, call.kwargs, call.grads, call.extra, call.inner_grads))[0]):
        call.args, call.kwargs = tree_map(up, call.args), tree_map(up, call.kwargs)
        call.grads = [up(g) for g in call.grads]
        call.extra = None if call.extra is None else tree_map(up, call.extra)
        call.inner_grads = None if call.inner_grads is None else tree_map(up, call.inner_grads)


_PROBE = torch.zeros((), requires_grad=True)


def _sequence_number() -> int:
    """The autograd sequence number the next node created in this thread gets (increasing)."""
    return _PROBE.view(()).grad_fn._sequence_nr() + 1  # one node made and dropped


_sequence_number = getattr(torch._C._autograd, "_get_sequence_nr", _sequence_number)  # no node where torch has it


def _autocasting(device_type: str) -> bool:
    """Whether torch.autocast is on for this device type (torch < 2.4: for any device)."""
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:  # torch < 2.4
        return torch.is_autocast_enabled() or torch.is_autocast_cpu_enabled()
