"""Lightning recording sample importance (`pip install -e ".[lightning]"`).

    from sample_importance.integrations.lightning import ImportanceCallback

    class Classifier(lightning.LightningModule):
        def training_step(self, batch, batch_idx):
            x, y, ids = batch                                       # the dataset's own sample ids
            logits = self(x)
            loss_i = F.cross_entropy(logits, y, reduction="none")
            return {"loss": loss_i.mean(), "loss_i": loss_i, "logits": logits, "sample_ids": ids}

    trainer = lightning.Trainer(max_epochs=3, callbacks=[ImportanceCallback(labels=train_labels, sample_ids=ids)],
                                logger=MLFlowLogger(tracking_uri=mlflow.get_tracking_uri()))

Lightning runs the forward pass, the backward pass and the optimizer step itself; the callback
takes each step's per-sample losses from what `training_step` returns, prepares the recorder in
`on_before_backward` (and, on the first step, checks that the loss Lightning backpropagates is the
one the recorder expects: loss_i.mean(), divided by accumulate_grad_batches), collects β in `on_after_backward`, ends
each epoch, and at the end of training records every sample's final loss (batches (x, y, ids) of the
train dataloader, or `final_forward`) and finishes the run. The dynamics go into the run of the
Trainer's MLFlowLogger (on the same tracking store), or into a new run.
"""
from __future__ import annotations

import mlflow
import torch
from lightning.pytorch import Callback
from lightning.pytorch.loggers import MLFlowLogger

from ..errors import UserError
from . import Recording, final_losses


class ImportanceCallback(Callback):
    """Records β, per-sample loss, p_true and correctness of every training step into a tracked run.

    Args:
        labels, sample_ids: the training labels and the ids `training_step` returns, in one order.
        final_forward: fn(module, batch) -> (ids, logits, labels) for the final losses (default:
            batches (x, y, ids) and module(x)).
        dataset, config, image_shape, groups: stored with the run (see `track_run`).
    """

    def __init__(self, labels, sample_ids=None, final_forward=None, dataset: str = "custom",
                 config: dict | None = None, image_shape=None, groups=None):
        self.recording = Recording(labels, sample_ids, dataset=dataset, config=config, image_shape=image_shape,
                                   groups=groups)
        self.final_forward = final_forward or (lambda module, batch: (batch[2], module(batch[0]), batch[1]))
        self._out: dict | None = None
        self._checked = False  # the backpropagated loss was compared with the expected one (first step)

    def on_train_start(self, trainer, pl_module) -> None:
        loggers = [lg for lg in trainer.loggers if isinstance(lg, MLFlowLogger)]
        if loggers and loggers[0]._tracking_uri and loggers[0]._tracking_uri != mlflow.get_tracking_uri():
            raise UserError(f"The MLFlowLogger writes to {loggers[0]._tracking_uri} and the recorder to "
                            f"{mlflow.get_tracking_uri()}: give the logger tracking_uri=mlflow.get_tracking_uri().")
        loader = trainer.train_dataloader
        self.recording.begin(pl_module, trainer.optimizers[0], epochs=trainer.max_epochs,
                             batch_size=loader.batch_size * trainer.accumulate_grad_batches,
                             run_id=loggers[0].run_id if loggers else None)
        step = pl_module.training_step

        def training_step(*args, **kwargs):  # keeps what the step returns for the backward hooks
            out = step(*args, **kwargs)
            if not isinstance(out, dict) or not {"loss", "loss_i", "logits", "sample_ids"} <= set(out):
                raise UserError("With ImportanceCallback, training_step returns {'loss': loss_i.mean(), 'loss_i': "
                                "loss_i, 'logits': logits, 'sample_ids': ids}.")
            self._out = out
            return out
        pl_module.training_step = training_step

    def on_before_backward(self, trainer, pl_module, loss: torch.Tensor) -> None:
        out, k = self._out, trainer.accumulate_grad_batches
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        scale = float(scaler.get_scale()) if scaler is not None and scaler.is_enabled() else 1.0
        loss_i = out["loss_i"]
        expected = self.recording.expect(loss_i, trainer.optimizers[0], len(loss_i) * k if k > 1 else None, scale)
        if self._checked:  # the loss's form does not change between steps: one host sync, on the first step
            return
        self._checked = True
        if not torch.allclose(loss.detach().float(), expected.detach().float(), rtol=1e-5, atol=1e-7, equal_nan=True):
            self.recording.run.recorder.cancel()
            raise UserError(f"The loss Lightning backpropagates ({float(loss.detach()):.6g}) is not loss_i.mean() "
                            f"({float(expected.detach()):.6g}): return {{'loss': loss_i.mean(), ...}} from training_step.")

    def on_after_backward(self, trainer, pl_module) -> None:
        out, self._out = self._out, None
        self.recording.record(out["sample_ids"], out["loss_i"], out["logits"])

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.recording.run.end_epoch()

    def on_train_end(self, trainer, pl_module) -> None:
        loader = trainer.train_dataloader
        device = pl_module.device

        def forward(batch):
            batch = [t.to(device) if isinstance(t, torch.Tensor) else t for t in batch]
            return self.final_forward(pl_module, batch)
        self.recording.finish(lambda: final_losses(pl_module, loader, forward))

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        self.recording.fail(exception)
