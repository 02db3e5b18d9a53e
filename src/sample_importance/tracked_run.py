"""A researcher's own training loop as a tracked MLflow run that writes the `dynamics/` contract.

    with track_run(model, labels=labels, epochs=E, batch_size=B, optimizer=opt) as run:
        for epoch in range(E):
            for x, y, sample_ids in loader:
                opt.zero_grad()
                logits = model(x)
                loss_i = F.cross_entropy(logits, y, reduction="none")
                importance = run.recorder.backward(loss_i, optimizer=opt)
                opt.step()
                run.record(sample_ids, importance, loss_i, logits)
            run.end_epoch()
        run.record_final_loss(sample_ids, final_nll)   # every sample, in batches if you like

Every downstream entry point (stability, decompose, nll, cluster, scores, learnability) reads the
run through the contract (`dynamics.py`) like a `train` run. Arrays are indexed by the position of
a sample in `sample_ids` (the researcher's own ids, stored as sample_id.npy); batch_order.npy holds
those positions in presentation order (equal to the ids when they are 0..n-1).
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import numpy as np
import torch
from torch import nn

from . import dynamics as dyn
from . import mlflow_io, plots
from .errors import UserError
from .importance import ImportanceRecorder
from .models import ParameterProjection
from .step import sample_statistics
from .training import EpochRecord


def phi_convention(optimizer: torch.optim.Optimizer | None) -> str:
    """What beta means for this optimizer (see importance.recorder)."""
    if optimizer is None or (type(optimizer) is torch.optim.SGD and not optimizer.param_groups[0]["momentum"]):
        return "phi_i = -(lr / B) * grad of sample i's own loss; B = samples in the batch; weight decay excluded"
    if type(optimizer) is torch.optim.SGD:
        return ("phi_i = -(lr / B) * c * grad of sample i's own loss, c = 1 (+ momentum if Nesterov) on the first "
                "step, (1 - dampening) (Nesterov: 1 + momentum (1 - dampening)) after; weight decay excluded")
    return (f"phi_i = f * grad of sample i's own loss / B, f the exact elementwise derivative of the "
            f"{type(optimizer).__name__} step in the batch gradient; weight decay excluded")


class TrackedRun:
    """The handle `track_run` yields: `recorder`, `record`, `end_epoch`, `record_final_loss`."""

    def __init__(self, model: nn.Module, recorder: ImportanceRecorder, writer: dyn.DynamicsWriter,
                 labels: np.ndarray, sample_ids: np.ndarray, epochs: int, num_classes: int, run_id: str,
                 contribution: bool = False):
        self.model, self.recorder, self.writer = model, recorder, writer
        self.mlflow_run = mlflow_io.OpenRun(run_id)  # logged to by id: the active-run stack may be another logger's
        self.labels, self.sample_ids, self.epochs = labels, sample_ids, epochs
        self.num_classes, self.run_id, self.attributing = num_classes, run_id, contribution
        self.n, self.L = len(labels), len(recorder.layer_names)
        self._sorter = np.argsort(sample_ids, kind="stable")
        self.projection = ParameterProjection(model)
        self.epoch = 0
        self.history: list[dict[str, float]] = []
        self._final = np.full(self.n, np.nan, dtype=np.float32)
        self._prediction = np.full(self.n, -1, dtype=np.int64)  # -1: not given
        self._new_epoch()

    def _new_epoch(self) -> None:
        self._importance = np.zeros((self.n, self.L), np.float32)
        self._contribution = np.zeros((self.n, self.L), np.float32) if self.attributing else None
        self._loss = np.zeros(self.n, np.float32)
        self._logits = np.zeros((self.n, self.num_classes), np.float32)
        self._seen = np.zeros(self.n, bool)
        self._order: list[np.ndarray] = []

    def positions(self, sample_ids) -> np.ndarray:
        """Row of each of `sample_ids` in the run's arrays; UserError for an unknown id."""
        ids = np.asarray(torch.as_tensor(sample_ids).cpu(), dtype=np.int64).reshape(-1)
        k = np.searchsorted(self.sample_ids, ids, sorter=self._sorter)
        k = np.minimum(k, self.n - 1)
        pos = self._sorter[k]
        bad = self.sample_ids[pos] != ids
        if bad.any():
            raise UserError(f"Sample id {int(ids[bad][0])} is not one of the run's sample_ids: record only the ids "
                            "given to track_run.")
        return pos

    def record(self, sample_ids, importance: torch.Tensor, loss_i: torch.Tensor, logits: torch.Tensor,
               contribution: torch.Tensor | None = None) -> None:
        """One step's per-sample quantities: ids (B,), importance (B, L) from `recorder.backward`,
        per-sample losses (B,) and logits (B, classes) of that step's forward pass; with
        track_run(contribution=True), `recorder.contribution` (B, L) of the step (given a target)."""
        if self.epoch >= self.epochs:
            raise UserError(f"All {self.epochs} epochs have ended: record no more steps (or track more epochs).")
        pos = self.positions(sample_ids)
        B = len(pos)
        importance = torch.as_tensor(importance).detach()
        if tuple(importance.shape) != (B, self.L):
            raise UserError(f"importance must have shape (batch, layers) = ({B}, {self.L}), got "
                            f"{tuple(importance.shape)}: pass what run.recorder.backward returned.")
        if tuple(logits.shape) != (B, self.num_classes):
            raise UserError(f"logits must have shape ({B}, {self.num_classes}), got {tuple(logits.shape)}.")
        if self._seen[pos].any() or len(np.unique(pos)) != B:
            raise UserError(f"A sample was recorded twice in epoch {self.epoch + 1}: present each sample once per "
                            "epoch and call end_epoch() after each.")
        if self.attributing:
            if contribution is None or tuple(contribution.shape) != (B, self.L):
                raise UserError(f"This run records contributions: pass contribution=run.recorder.contribution, of "
                                f"shape ({B}, {self.L}), from recorder.backward(..., target=...).")
            self._contribution[pos] = contribution.detach().float().cpu().numpy()
        self._seen[pos] = True
        self._importance[pos] = importance.float().cpu().numpy()
        self._loss[pos] = loss_i.detach().float().cpu().numpy()
        self._logits[pos] = logits.detach().float().cpu().numpy()
        self._order.append(pos)

    def end_epoch(self, metrics: dict[str, float] | None = None) -> dict[str, float]:
        """Write the finished epoch (every sample must have been recorded once) and log its metrics,
        with `metrics` of your own (e.g. test_error). Returns the metrics."""
        if not self._seen.all():
            raise UserError(f"Epoch {self.epoch + 1} recorded {int(self._seen.sum())} of the {self.n} samples: "
                            "record every sample once per epoch before end_epoch().")
        y = torch.as_tensor(self.labels)
        p_true, correct, error_l2 = sample_statistics(torch.as_tensor(self._logits), torch.as_tensor(self._loss), y)
        record = EpochRecord(self.epoch, np.concatenate(self._order).astype(np.int64), self._importance, self._loss,
                             p_true.numpy().astype(np.float32), correct.numpy(), error_l2.numpy().astype(np.float32),
                             contribution=self._contribution)
        layer_totals = self._importance.sum(0, dtype=np.float64)
        record.metrics = {"train_loss": float(self._loss.mean(dtype=np.float64)),
                          "train_error": float(1.0 - record.correct.mean()),
                          "importance_total": float(layer_totals.sum()),
                          **{f"importance_{n}": float(v) for n, v in zip(self.recorder.layer_names, layer_totals)},
                          **(metrics or {})}
        if self.attributing:  # the epoch's first-order change of the target loss, summed over its steps
            record.metrics["contribution_total"] = float(self._contribution.sum(dtype=np.float64))
        self.writer.write_epoch(record, self.projection(self.model))
        self.mlflow_run.log_metrics(record.metrics, step=self.epoch + 1)
        self.history.append(record.metrics)
        self.epoch += 1
        self._new_epoch()
        return record.metrics

    def record_final_loss(self, sample_ids, loss_i: torch.Tensor, logits: torch.Tensor | None = None) -> None:
        """NLL of samples under the final parameters (final_loss.npy); every sample, in any batches.
        With their logits, also the class each gets (final_prediction.npy, which the explorer shows)."""
        pos = self.positions(sample_ids)
        self._final[pos] = loss_i.detach().float().cpu().numpy()
        if logits is not None:
            self._prediction[pos] = logits.detach().argmax(1).cpu().numpy()

    def _finish(self) -> None:
        if self.epoch != self.epochs:
            raise UserError(f"The run ended after {self.epoch} of {self.epochs} epochs: call end_epoch() once per "
                            "epoch (the finished epochs stay readable with allow_partial=True).")
        if np.isnan(self._final).any():
            raise UserError(f"{int(np.isnan(self._final).sum())} samples have no final loss: call "
                            "run.record_final_loss(sample_ids, loss_i) for every sample after training.")
        predicted = self._prediction if (self._prediction >= 0).all() else None
        self.writer.finish(self._final, self.labels, self.sample_ids, self.model.state_dict(), predicted)
        names = self.recorder.layer_names
        per_layer = np.array([[h[f"importance_{n}"] for n in names] for h in self.history])
        counts = [sum(p.numel() for p in self.recorder.layer_parameters(n)) for n in names]
        self.mlflow_run.log_figure(plots.layer_importance(per_layer, names, counts), "figures/layer_importance.png")


@contextlib.contextmanager
def track_run(model: nn.Module, *, labels: np.ndarray | torch.Tensor, epochs: int, batch_size: int,
              optimizer: torch.optim.Optimizer | None = None, lr: float | None = None,
              sample_ids: np.ndarray | torch.Tensor | None = None, num_classes: int | None = None,
              dataset: str = "custom", run_name: str | None = None, config: dict | None = None,
              batchnorm: str = "refuse", groups: object = None,
              image_shape: tuple[int, ...] | None = None, run_id: str | None = None,
              contribution: str | None = None) -> Iterator[TrackedRun]:
    """An MLflow run (nested if one is active) recording a researcher's loop into `dynamics/`.

    Args:
        model: the model being trained (hooks are added for the run and removed after).
        labels: (n,) training labels, in the order of `sample_ids`.
        epochs: as trained.
        batch_size: the nominal batch size (a last smaller batch is fine).
        optimizer: the optimizer stepped (its learning rate is stored); or
        lr: plain SGD's learning rate, instead of the optimizer.
        sample_ids: (n,) your ids of the training samples (default 0..n-1).
        num_classes: width of the logits (default: labels.max() + 1).
        dataset: stored with the run.
        run_name: stored with the run.
        config: stored with the run, as config.json and parameters.
        batchnorm: passed to ImportanceRecorder.
        groups: passed to ImportanceRecorder.
        image_shape: (C, H, W) of the samples, for analyses that draw them.
        run_id: record into this existing run, which another logger opened and ends (HuggingFace's
            or Lightning's MLflow logger: `mlflow_io.joined_run`), instead of a new one.
        contribution: in-run attribution: a description of the target set V (stored as metadata
            "target"); every `record` then passes `contribution=` (contribution.npy).
    Leaving the block without an exception finishes the dynamics (all epochs ended and every final
    loss recorded, else UserError); an exception ends the run FAILED with its finished epochs kept.
    """
    labels = np.asarray(torch.as_tensor(labels).cpu(), dtype=np.int64).reshape(-1)
    n = len(labels)
    sample_ids = np.arange(n, dtype=np.int64) if sample_ids is None else \
        np.asarray(torch.as_tensor(sample_ids).cpu(), dtype=np.int64).reshape(-1)
    if len(sample_ids) != n or len(np.unique(sample_ids)) != n:
        raise UserError(f"sample_ids must be {n} distinct ids, one per label; got {len(sample_ids)} "
                        f"({len(np.unique(sample_ids))} distinct).")
    if (optimizer is None) == (lr is None):
        raise UserError("track_run needs exactly one of optimizer= or lr= (lr for plain SGD).")
    if epochs < 1 or batch_size < 1:
        raise UserError(f"epochs and batch_size must be positive, got {epochs} and {batch_size}.")
    num_classes = int(labels.max()) + 1 if num_classes is None else int(num_classes)
    step_lr = float(optimizer.param_groups[0]["lr"]) if optimizer is not None else float(lr)
    recorder = ImportanceRecorder(model, batchnorm=batchnorm, groups=groups)
    try:
        names = recorder.layer_names
        counts = {nm: sum(p.numel() for p in recorder.layer_parameters(nm)) for nm in names}
        settings = {"dataset": dataset, "subset": 0, "batch_size": batch_size, "lr": step_lr, "epochs": epochs,
                    "weight_decay": float(optimizer.param_groups[0].get("weight_decay", 0.0)) if optimizer else 0.0,
                    "optimizer": type(optimizer).__name__ if optimizer else "SGD", "model": type(model).__name__,
                    "label_noise": 0.0, **(config or {})}
        description = "A researcher's own training loop with per-sample per-layer importance (sample_importance.track_run)."
        opened = mlflow_io.start_run(run_name or f"track_run {dataset} {type(model).__name__}", "track_run",
                                     description=description, config=settings) if run_id is None else \
            mlflow_io.joined_run(run_id, "track_run", description=description, config=settings)
        with opened as run:
            metadata = {
                "dataset": dataset, "subset": 0, "batch_size": batch_size, "lr": step_lr,
                "weight_decay": settings["weight_decay"], "seed": settings.get("seed"), "model": type(model).__name__,
                "ordering": "custom", "reference_run_id": "", "layer_names": names, "parameter_counts": counts,
                "layer_groups": recorder.grouping, "phi_convention": phi_convention(optimizer),
                "image_shape": list(image_shape) if image_shape else None, "num_classes": num_classes,
                "run_id": run.info.run_id, "config": settings, "source": "track_run",
                **({"contribution": True, "target": str(contribution)} if contribution else {}),
            }
            with mlflow_io.OpenRun(run.info.run_id).artifact_folder(dyn.DIRNAME) as folder:
                projection_dim = 32
                writer = dyn.DynamicsWriter(folder, n, epochs, metadata, projection_dim)
                handle = TrackedRun(model, recorder, writer, labels, sample_ids, epochs, num_classes, run.info.run_id,
                                    contribution=bool(contribution))
                writer.write_initial(handle.projection(model), model.state_dict())
                yield handle
                handle._finish()
    finally:
        recorder.close()
