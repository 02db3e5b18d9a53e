"""Exact per-sample, per-layer sample importance (Gao & Jojic, section 2.2), recorded inside the SGD step.

With the batch loss the mean over its B samples, one SGD step is
    delta_theta = -(eta / B) * sum_i v_i g_i - eta * r,
so the parameter affectibility of sample i is phi_i = d delta_theta / d v_i = -(eta / B) g_i, with g_i
the gradient of sample i's own loss (weight decay is not part of it). Its importance for layer d is
beta_{i,d} = sum_{j in layer d} phi_{i,j}^2.

The step of the project's loop records through `importance.ImportanceRecorder` (hooks and the
per-module-type rules of `importance.rules`); many MLPs at once go through `stacked`.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .importance.recorder import ImportanceRecorder, batch_loss

@dataclass
class StepRecord:
    """Per-sample quantities of one SGD step, all from the step's own forward pass."""

    loss: torch.Tensor  # (B,) NLL of each sample before the step
    logits: torch.Tensor  # (B, classes), detached: `sample_statistics` turns them into the rest
    importance: torch.Tensor | None  # (B, layers) beta; None when not tracked
    contribution: torch.Tensor | None = None  # (B, layers) c, the in-run attribution to a target; None without one


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


def checkpoint_sq_grad_norms(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                             recorder: ImportanceRecorder | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The recorder without a step: ||dL_i/d theta_d||^2 per sample and layer (B, layers) at the current
    parameters (weight decay excluded), and the logits (B, classes). For GraNd at a checkpoint (Paul et
    al. 2021): ||g_i|| = sqrt of the sum over layers. With lr = 1 the recorder returns
    ||(1/B) g_i||^2, hence the factor B^2; the .grad it fills is cleared, the parameters are not touched.
    `recorder`: the model's own (one recorder per model); else a temporary one."""
    B = len(y)
    with contextlib.ExitStack() as stack, torch.enable_grad():
        if recorder is None:
            recorder = stack.enter_context(ImportanceRecorder(model))
        logits = model(x)  # (B, C)
        loss_i = F.cross_entropy(logits, y, reduction="none")  # (B,)
        norms = recorder.backward(loss_i, lr=1.0) * (B * B)  # (B, layers)
    model.zero_grad(set_to_none=True)
    return norms.detach(), logits.detach()


def sgd_step(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
             track: bool = True, weight: torch.Tensor | None = None,
             recorder: ImportanceRecorder | None = None, batch_size: int | None = None,
             grad_scale: float = 1.0, target: dict | None = None) -> StepRecord:
    """One SGD step on the mean cross-entropy of the batch (x, y), recording beta when `track`.

    `weight` (B,) multiplies each sample's loss in that mean (the sample weights v_i of paper
    section 4; None = all 1). The optimizer adds weight decay to the gradients it is given; beta
    excludes it, as defined. `recorder`: the model's ImportanceRecorder (one for the whole run);
    without it a temporary one is made for this step. beta is the recorder's (B, columns) for the
    optimizer's step (plain SGD, momentum or Nesterov). `batch_size`, `grad_scale`: for this
    process's share of a data-parallel batch (`ImportanceRecorder.backward`). `target`: the
    recorder's `target_gradient` of a target loss at the current parameters; the record then holds
    each sample's contribution c (B, columns) to that loss's change over this step.
    """
    own = track and recorder is None
    if own:
        recorder = ImportanceRecorder(model)
    try:
        optimizer.zero_grad(set_to_none=True)
        logits = model(x)  # (B, C)
        loss_i = F.cross_entropy(logits, y, reduction="none")  # (B,)
        weighted = loss_i if weight is None else loss_i * weight
        if track:
            # (B, columns); .grad as weighted.mean().backward(); phi of the optimizer's own step
            importance = recorder.grouped(recorder.backward(weighted, optimizer=optimizer, batch_size=batch_size,
                                                            grad_scale=grad_scale, target=target))
            contribution = None if target is None else recorder.grouped(recorder.contribution)
        else:
            batch_loss(weighted, batch_size, grad_scale).backward()
            importance = contribution = None
    finally:
        if own:
            recorder.close()
    optimizer.step()
    return StepRecord(loss=loss_i.detach(), logits=logits.detach(), importance=importance, contribution=contribution)
