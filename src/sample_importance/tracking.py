"""Exact per-sample, per-layer sample importance (Gao & Jojic, section 2.2), recorded inside the SGD step.

With the batch loss the mean over its B samples, one SGD step is
    delta_theta = -(eta / B) * sum_i v_i g_i - eta * r,
so the parameter affectibility of sample i is phi_i = d delta_theta / d v_i = -(eta / B) g_i, with g_i
the gradient of sample i's own loss (weight decay is not part of it). Its importance for layer d is
beta_{i,d} = sum_{j in layer d} phi_{i,j}^2.

For a linear layer z = W a + b, the per-sample gradients are outer products,
dL_i/dW = d_i a_i^T and dL_i/db = d_i with d_i = dL_i/dz_i, hence
    ||g_i restricted to the layer||^2 = ||d_i||^2 (||a_i||^2 + 1).
Backpropagating the *mean* loss gives dz_i = d_i / B, so beta_{i,d} = eta^2 ||dz_i||^2 (||a_i||^2 + 1):
two row norms per layer, no per-sample gradient is ever materialised.

For a convolution, dL_i/dW = sum_p d_{i,p} u_{i,p}^T over output positions p, with u_{i,p} the
unfolded input patch (torch unfold) and d_{i,p} the output gradient there; dL_i/db = sum_p d_{i,p}.
Its squared norm is computed from the two factors D_i (O, P) and U_i (CKK, P) either as
||D_i U_i^T||^2 (an O x CKK product per sample) or as <D_i^T D_i, U_i^T U_i> (two P x P Gram
matrices), whichever costs fewer operations, as per-sample-gradient-norm libraries do.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .models import MLP

# The scaling convention recorded in metadata.json, so a reader knows what the numbers mean.
PHI_CONVENTION = "phi_i = -(lr / B) * grad of sample i's own loss; B = samples in the batch; weight decay excluded"


def linear_sq_grad_norms(a: torch.Tensor, dz: torch.Tensor) -> torch.Tensor:
    """||dz_i||^2 (||a_i||^2 + 1) of a linear layer for every sample, features on the last axis
    (any leading shape: (B,) for one model, (M, B) for M models)."""
    return dz.square().sum(-1) * (a.square().sum(-1) + 1.0)


def sample_sq_grad_norms(layer: nn.Module, a: torch.Tensor, dz: torch.Tensor) -> torch.Tensor:
    """||dL_i/d(weight, bias)||^2 of every sample (B,), times B^2 when dz is the gradient of the batch
    mean; from the layer's input a and the gradient dz of its pre-activation output."""
    if isinstance(layer, nn.Linear):
        return linear_sq_grad_norms(a, dz)
    if isinstance(layer, nn.Conv2d) and layer.groups == 1:
        U = F.unfold(a, layer.kernel_size, dilation=layer.dilation, padding=layer.padding, stride=layer.stride)
        D = dz.flatten(2)  # (B, O, P); U: (B, C*k*k, P)
        O, P, K = D.shape[1], D.shape[2], U.shape[1]
        if P * P * (O + K) < P * O * K:
            weight = (torch.bmm(D.transpose(1, 2), D) * torch.bmm(U.transpose(1, 2), U)).sum((1, 2))
        else:
            weight = torch.bmm(D, U.transpose(1, 2)).square().sum((1, 2))
        return weight + D.sum(2).square().sum(1)
    raise TypeError(f"no per-sample gradient norm for {type(layer).__name__}")


@dataclass
class StepRecord:
    """Per-sample quantities of one SGD step, all from the step's own forward pass."""

    loss: torch.Tensor  # (B,) NLL of each sample before the step
    logits: torch.Tensor  # (B, classes), detached: `sample_statistics` turns them into the rest
    importance: torch.Tensor | None  # (B, layers) beta; None when not tracked


@torch.no_grad()
def sample_statistics(logits: torch.Tensor, loss: torch.Tensor, y: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Probability of the true label, correctness and ||softmax - onehot(label)||_2 (EL2N's summand)
    of each sample, from its logits and NLL (classes on the last axis, any leading shape). The
    training loop applies it once per epoch to every step's recorded logits, not at every step."""
    p_true = torch.exp(-loss)  # softmax probability of the true label
    correct = logits.argmax(-1) == y
    # ||p - e_y||^2 = ||p||^2 - 2 p_y + 1
    error_l2 = (torch.softmax(logits, -1).square().sum(-1) - 2 * p_true + 1).clamp_min(0).sqrt()
    return p_true, correct, error_l2


def checkpoint_sq_grad_norms(model, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The recorder without a step: ||dL_i/d theta_d||^2 per sample and layer (B, layers) at the current
    parameters (weight decay excluded), from one forward and one backward pass of the summed loss (so
    dz_i is sample i's own output gradient, no 1/B), and the logits (B, classes). For GraNd at a
    checkpoint (Paul et al. 2021): ||g_i|| = sqrt of the sum over layers. Parameters are not touched."""
    with torch.enable_grad():
        logits, taps = model.forward_tapped(x)  # taps: per layer (a (B, in), z (B, out))
        loss_i = F.cross_entropy(logits, y, reduction="none")  # (B,)
        dzs = torch.autograd.grad(loss_i.sum(), [z for _, z in taps])
    with torch.no_grad():
        norms = torch.stack([sample_sq_grad_norms(layer, a.detach(), dz)
                             for layer, (a, _), dz in zip(model.layers.values(), taps, dzs)], dim=1)  # (B, layers)
    return norms, logits.detach()


def sgd_step(model, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, lr: float,
             track: bool = True, weight: torch.Tensor | None = None) -> StepRecord:
    """One SGD step on the mean cross-entropy of the batch (x, y), recording beta when `track`.

    `weight` (B,) multiplies each sample's loss in that mean (the sample weights v_i of paper
    section 4; None = all 1). The optimizer adds weight decay to the gradients it is given; beta
    excludes it, as defined.
    """
    logits, taps = model.forward_tapped(x)  # logits (B, C); taps: per layer (a (B, in), z (B, out))
    loss_i = F.cross_entropy(logits, y, reduction="none")  # (B,)
    loss = (loss_i if weight is None else loss_i * weight).mean()
    params = [p for p in model.parameters()]
    if track:
        zs = [z for _, z in taps]
        grads = torch.autograd.grad(loss, params + zs)  # one backward pass gives both
        param_grads, dzs = grads[: len(params)], grads[len(params):]
        with torch.no_grad():
            importance = torch.stack(
                [sample_sq_grad_norms(layer, a, dz) for layer, (a, _), dz in zip(model.layers.values(), taps, dzs)],
                dim=1) * (lr * lr)  # (B, layers)
    else:
        param_grads = torch.autograd.grad(loss, params)
        importance = None
    for p, g in zip(params, param_grads):
        p.grad = g
    optimizer.step()
    return StepRecord(loss=loss_i.detach(), logits=logits.detach(), importance=importance)


class StackedMLP:
    """M multilayer perceptrons of one shape, trained at once: each layer's weights stacked to
    (M, out, in), every product a batched one (`baddbmm`). Each model sees its own batch, labels,
    learning rate and weight decay; the models never mix (the loss is a sum over models, so each
    model's gradient is its own)."""

    def __init__(self, models: list, lrs: list[float], weight_decays: list[float]):
        self.models = models
        self.names = models[0].layer_names
        with torch.no_grad():
            self.weights = [torch.stack([m.layers[n].weight for m in models]).requires_grad_() for n in self.names]
            self.biases = [torch.stack([m.layers[n].bias for m in models]).requires_grad_() for n in self.names]
        device, dtype = self.weights[0].device, self.weights[0].dtype
        self.lr = torch.tensor(lrs, device=device, dtype=dtype)
        self.wd = torch.tensor(weight_decays, device=device, dtype=dtype)
        # One lr and weight decay for all: the scalar update of torch.optim.SGD, bit for bit.
        self.shared = (lrs[0], weight_decays[0]) if len(set(zip(lrs, weight_decays))) == 1 else None

    @staticmethod
    def stackable(models: list) -> bool:
        """Whether `models` are MLPs (Linear layers only) of one shape on one device and type."""
        if len(models) < 2 or not all(type(m) is MLP for m in models):
            return False
        shapes = {tuple((p.shape, p.device, p.dtype) for p in m.parameters()) for m in models}
        return len(shapes) == 1

    def write_back(self) -> None:
        """Copy every model's current parameters into its nn.Module."""
        with torch.no_grad():
            for k, n in enumerate(self.names):
                for i, m in enumerate(self.models):
                    m.layers[n].weight.copy_(self.weights[k][i])
                    m.layers[n].bias.copy_(self.biases[k][i])

    def step(self, x: torch.Tensor, y: torch.Tensor, track: bool = True,
             weight: torch.Tensor | None = None) -> StepRecord:
        """One SGD step of every model on its batch: x (M, B, d), y (M, B), weight (M, B) or None.
        Returns a StepRecord of (M, B) losses, (M, B, classes) logits and (M, B, layers) importance."""
        M, B = y.shape
        h, taps = x, []
        last = len(self.weights) - 1
        for k, (W, b) in enumerate(zip(self.weights, self.biases)):
            z = torch.baddbmm(b.unsqueeze(1), h, W.transpose(1, 2))  # (M, B, out)
            taps.append((h, z))
            h = torch.relu(z) if k < last else z
        logits = h
        loss_i = F.cross_entropy(logits.reshape(M * B, -1), y.reshape(-1), reduction="none").view(M, B)
        loss = (loss_i if weight is None else loss_i * weight).mean(1).sum()  # each model's batch mean
        params = self.weights + self.biases
        if track:
            grads = torch.autograd.grad(loss, params + [z for _, z in taps])
            with torch.no_grad():
                importance = torch.stack([linear_sq_grad_norms(a, dz) for (a, _), dz in zip(taps, grads[len(params):])],
                                         dim=2) * self.lr.square().view(M, 1, 1)
        else:
            grads = torch.autograd.grad(loss, params)
            importance = None
        with torch.no_grad():
            for p, g in zip(params, grads[: len(params)]):
                # torch.optim.SGD: g + weight_decay * p, then p - lr * that
                if self.shared is not None:
                    lr, wd = self.shared
                    p.add_(g.add(p, alpha=wd) if wd else g, alpha=-lr)
                else:
                    shape = (M,) + (1,) * (p.dim() - 1)
                    p.sub_((g + self.wd.view(shape) * p) * self.lr.view(shape))
        return StepRecord(loss=loss_i.detach(), logits=logits.detach(), importance=importance)
