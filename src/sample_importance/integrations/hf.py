"""HuggingFace's Trainer recording sample importance (`pip install -e ".[hf]"`).

    from sample_importance.integrations.hf import ImportanceTrainer

    train = train.add_column("sample_id", list(range(len(train))))   # the dataset's own ids
    trainer = ImportanceTrainer(model=model, args=args, train_dataset=train)
    trainer.train()            # beta, loss, p_true, correctness per sample and step -> dynamics/

A TrainerCallback only sees events, not the per-sample losses, and the Trainer runs the backward
pass itself; so the smallest hook that can record is the Trainer's own `training_step`, here with
the loss taken per sample (cross-entropy of the model's logits against the batch's labels) and the
backward pass still the Trainer's (`accelerator.backward`, its GradScaler included) between the
recorder's `expect` and `collect`. A callback, first in the Trainer's list, ends each epoch and, at
the end of training, records every sample's final loss and finishes the run, before HuggingFace's
MLflowCallback ends the MLflow run it opened, which is the run the dynamics are written into (a new
run where no MLflow logger is active). The sample-id column rides through the data collator
(the Trainer keeps it among the model's input columns) and is taken out before the forward pass.
"""
from __future__ import annotations

import math

import mlflow
from transformers import Trainer, TrainerCallback

from ..errors import UserError
from . import Recording, final_losses, per_sample_loss


class ImportanceTrainer(Trainer):
    """A transformers.Trainer that records sample importance into a tracked run.

    Args (besides the Trainer's):
        sample_id_column: the train dataset's column of sample ids (default "sample_id").
        labels, sample_ids: the training labels and ids, in the dataset's order (default: its
            "label"/"labels" column and `sample_id_column`).
        dataset, config, image_shape, groups: stored with the run (see `track_run`).
    """

    def __init__(self, *args, sample_id_column: str = "sample_id", labels=None, sample_ids=None,
                 dataset: str = "custom", config: dict | None = None, image_shape=None, groups=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.sample_id_column = sample_id_column
        train = self.train_dataset
        if labels is None or sample_ids is None:
            columns = getattr(train, "column_names", None)
            if columns is None or sample_id_column not in columns or not ({"label", "labels"} & set(columns)):
                raise UserError(f"ImportanceTrainer needs the training labels and sample ids: give labels= and "
                                f"sample_ids=, or a datasets.Dataset with a label column and a {sample_id_column!r} "
                                "column.")
            labels = train["labels" if "labels" in columns else "label"] if labels is None else labels
            sample_ids = train[sample_id_column] if sample_ids is None else sample_ids
        self.recording = Recording(labels, sample_ids, dataset=dataset, config=config, image_shape=image_shape,
                                   groups=groups)
        self.callback_handler.callbacks.insert(0, _Epochs(self))  # before the MLflowCallback ends its run

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        if self.sample_id_column not in self._signature_columns:
            self._signature_columns = [*self._signature_columns, self.sample_id_column]

    def train(self, *args, **kwargs):
        try:
            result = super().train(*args, **kwargs)
        except BaseException as exc:
            self.recording.fail(exc)
            raise
        # HuggingFace's MLflowCallback ends *the active run* when it is garbage-collected (its
        # __del__), whichever run that is by then: a later run of this process could be ended
        # mid-way. Its own run ended with the training (on_train_end), so it is disarmed.
        for callback in self.callback_handler.callbacks:
            if type(callback).__name__ == "MLflowCallback" and hasattr(callback, "_auto_end_run"):
                callback._auto_end_run = False
        return result

    def training_step(self, model, inputs, num_items_in_batch=None):
        model.train()
        inputs = self._prepare_inputs(inputs)
        ids, labels = inputs.pop(self.sample_id_column), inputs.pop("labels")
        if self.recording.run is None:  # at the first step: HuggingFace's MLflow logger has opened its run
            active = mlflow.active_run()
            k = self.args.gradient_accumulation_steps
            self.recording.begin(self.model, self.optimizer, epochs=math.ceil(self.args.num_train_epochs),
                                 batch_size=self._train_batch_size * k, run_id=active.info.run_id if active else None)
        with self.compute_loss_context_manager():
            logits = model(**inputs).logits
        loss_i = per_sample_loss(logits, labels)
        k = getattr(self, "current_gradient_accumulation_steps", self.args.gradient_accumulation_steps)
        scaler = getattr(self.accelerator, "scaler", None)
        scale = float(scaler.get_scale()) if scaler is not None and scaler.is_enabled() else 1.0
        loss = self.recording.expect(loss_i, self.optimizer, len(loss_i) * k if k > 1 else None, scale)
        self.accelerator.backward(loss)
        self.recording.record(ids, loss_i, logits)
        return loss.detach()

    def final_losses(self):
        """(ids, losses) of every training sample under the final parameters."""
        def forward(batch):
            batch = self._prepare_inputs(batch)
            ids, labels = batch.pop(self.sample_id_column), batch.pop("labels")
            with self.compute_loss_context_manager():
                return ids, self.model(**batch).logits, labels
        return final_losses(self.model, self.get_train_dataloader(), forward)


class _Epochs(TrainerCallback):
    def __init__(self, trainer: ImportanceTrainer):
        self.trainer = trainer

    def on_epoch_end(self, args, state, control, **kwargs):
        if self.trainer.recording.run is not None:
            self.trainer.recording.run.end_epoch()

    def on_train_end(self, args, state, control, **kwargs):
        if self.trainer.recording.run is not None:
            self.trainer.recording.finish(self.trainer.final_losses)
