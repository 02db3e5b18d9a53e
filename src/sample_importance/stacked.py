"""Many multilayer perceptrons of one shape trained at once, recording sample importance.

The importance of each model is the Linear rule of `importance/rules/linear.py` applied to stacked (M, B, .)
activations and output gradients (`linear_sq_grad_norms`): tests/test_recorder.py checks that it
equals ImportanceRecorder on each model alone.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .models import MLP
from .step import StepRecord
from .importance.rules import linear_sq_grad_norms


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
