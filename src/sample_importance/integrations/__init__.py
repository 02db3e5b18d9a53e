"""The recorder inside other people's training loops: HuggingFace's Trainer (`integrations.hf`,
`pip install -e ".[hf]"`) and Lightning (`integrations.lightning`, `pip install -e ".[lightning]"`).

Both go through `track_run`, the helper a researcher's own loop uses: the same `dynamics/` contract,
written into the MLflow run that the framework's MLflow logger opened (or a new one), so `decompose`,
`stability`, `scores` and `explore` read these runs like any other. `Recording` is their common
part: a tracked run opened at the start of training, one `step` per optimizer step's forward pass
(expect, the framework's backward, collect, record), `end_epoch`, and `finish` with the final
losses.
"""
from __future__ import annotations

import contextlib
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserError
from ..tracked_run import TrackedRun, track_run


def torch_optimizer(optimizer) -> torch.optim.Optimizer:
    """The torch optimizer inside a framework's wrapper (accelerate's AcceleratedOptimizer,
    Lightning's LightningOptimizer)."""
    while isinstance(getattr(optimizer, "optimizer", None), torch.optim.Optimizer):
        optimizer = optimizer.optimizer
    return optimizer


class Recording:
    """One tracked run across a framework's callbacks (see the module docstring)."""

    def __init__(self, labels, sample_ids=None, dataset: str = "custom", config: dict | None = None,
                 image_shape: tuple[int, ...] | None = None, groups: object = None):
        self.labels = np.asarray(torch.as_tensor(labels).cpu(), dtype=np.int64).reshape(-1)
        self.sample_ids = sample_ids
        self.dataset, self.config, self.image_shape, self.groups = dataset, config, image_shape, groups
        self.run: TrackedRun | None = None
        self._stack: contextlib.ExitStack | None = None

    def begin(self, model: nn.Module, optimizer, epochs: int, batch_size: int, run_id: str | None) -> TrackedRun:
        """Open the tracked run (into run `run_id`, the logger's, where there is one)."""
        stack = contextlib.ExitStack()
        self.run = stack.enter_context(track_run(
            model, labels=self.labels, sample_ids=self.sample_ids, epochs=epochs, batch_size=batch_size,
            optimizer=torch_optimizer(optimizer), dataset=self.dataset, config=self.config,
            image_shape=self.image_shape, groups=self.groups, run_id=run_id))
        self._stack = stack
        return self.run

    def expect(self, loss_i: torch.Tensor, optimizer, batch_size: int | None, loss_scale: float = 1.0) -> torch.Tensor:
        """The loss the framework is to backpropagate for this forward pass (see `ImportanceRecorder.expect`)."""
        return self.run.recorder.expect(loss_i, optimizer=torch_optimizer(optimizer), batch_size=batch_size,
                                        loss_scale=loss_scale)

    def record(self, sample_ids, loss_i: torch.Tensor, logits: torch.Tensor) -> None:
        """After the framework's backward pass: beta of the step, recorded with the step's quantities."""
        self.run.record(sample_ids, self.run.recorder.collect(), loss_i, logits)

    def finish(self, final_losses: Callable[[], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> None:
        """The final loss and prediction of every sample (`final_losses()` -> (sample ids, losses,
        logits) under the final parameters), then the run's dynamics are finished and the tracked run
        closed."""
        try:
            ids, losses, logits = final_losses()
            self.run.record_final_loss(ids, losses, logits)
        except BaseException as exc:
            self.fail(exc)
            raise
        stack, self._stack = self._stack, None
        stack.close()

    def fail(self, exc: BaseException) -> None:
        """The framework's training stopped with `exc`: the run ends FAILED, its finished epochs kept."""
        stack, self._stack = self._stack, None
        if stack is not None:
            stack.__exit__(type(exc), exc, exc.__traceback__)


def per_sample_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(B,) cross-entropy of classification logits (B, classes), in float32."""
    if logits.dim() != 2 or labels.dim() != 1:
        raise UserError(f"The recorder's integrations record classifiers: logits (batch, classes) and labels (batch,), "
                        f"got {tuple(logits.shape)} and {tuple(labels.shape)}.")
    return F.cross_entropy(logits.float(), labels, reduction="none")


@torch.no_grad()
def final_losses(model: nn.Module, batches, forward: Callable) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ids, losses, logits) of every sample under the model's final parameters, in evaluation mode,
    from `batches` through `forward(batch) -> (ids, logits, labels)`."""
    was = model.training
    model.eval()
    ids, losses, outputs = [], [], []
    try:
        for batch in batches:
            i, logits, y = forward(batch)
            ids.append(torch.as_tensor(i).cpu())
            losses.append(per_sample_loss(logits, y).cpu())
            outputs.append(logits.float().cpu())
    finally:
        model.train(was)
    return torch.cat(ids), torch.cat(losses), torch.cat(outputs)
