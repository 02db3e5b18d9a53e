"""What each entry point runs, as plain functions of a config: load, train or analyse, log.

Entry points parse the command line and call one of these; other stages (the study, sweeps,
ordering) call them too, so every run that trains goes through `run_train`.
"""
from __future__ import annotations

import contextlib
from typing import Callable

import numpy as np
import torch

from . import dynamics as dyn
from . import mlflow_io, plots
from .analysis import ordering
from .config import ConfigError, TrainConfig, TrainRunConfig
from .data import Dataset, training_data
from .models import ParameterProjection, check_model_size, importance_columns, model_for
from .tracked_run import phi_convention
from .training import DivergenceError, EpochRecord, FitResult, check_batching, fit, make_optimizer


def train_run_name(cfg: TrainConfig) -> str:
    ordering = getattr(cfg, "ordering", "shuffle")
    if ordering == "shuffle":
        model = "" if cfg.model == "mlp" else f" {cfg.model}" + (f" {cfg.norm}" if cfg.norm != "group" else "")
        return f"train {cfg.dataset}{model} seed={cfg.seed}"
    return f"ordering {ordering} seed={cfg.seed}"  # a variant of the batch-ordering experiment


def check_ordering(cfg: TrainRunConfig, n: int) -> None:
    """A fixed batch construction splits the training set into equal batches."""
    if cfg.ordering != "shuffle" and n % cfg.batch_size:
        raise ConfigError(f"ordering={cfg.ordering} splits the {n} training samples into equal batches: choose a "
                          f"batch_size that divides {n}, or a subset that batch_size={cfg.batch_size} divides.")


def presentation_order(cfg: TrainRunConfig, data: Dataset) -> np.ndarray | None:
    """The fixed order of a batch construction (None for `shuffle`: `fit` reshuffles every epoch).
    Reads the reference run's final NLL and total importance for the sorted constructions."""
    if cfg.ordering == "shuffle":
        return None
    n = data.n_train
    check_ordering(cfg, n)
    nll = tau = None
    if cfg.ordering != "rand":
        ref = mlflow_io.load_dynamics(cfg.reference_run_id)
        dyn.check_matches(cfg.reference_run_id, ref, cfg.dataset, n)
        nll, tau = np.asarray(ref.final_loss), ref.total_importance
    return ordering.presentation_order(cfg.ordering, n, cfg.batch_size, cfg.epochs, nll, tau, seed=cfg.seed)


def run_train(cfg: TrainConfig, log_model: bool = True, quiet: bool = False,
              epoch_callback: Callable[[int, dict[str, float]], None] | None = None,
              run_id: str | None = None, fitter: Callable[..., FitResult] = fit) -> str:
    """Train one model with full tracking inside an MLflow run (nested when a run is active); return
    the run id. Writes `dynamics/` epoch by epoch, per-epoch metrics, the figures and the final model.

    Resumes, in the same run, an interrupted run with the same configuration (or cfg.resume_run_id)
    from its last finished epoch. `epoch_callback(epoch, metrics)` runs after each epoch is logged;
    raising `errors.Stopped` in it ends training and the run as KILLED (how the sweep prunes a trial).
    `run_id` (a run created for it, never resumed) and `fitter` (what trains: `fit`, or the handle
    of a group training many models at once, see `together`) are for `train_many`."""
    if not isinstance(cfg, TrainRunConfig):
        cfg = TrainRunConfig(**cfg.train_config().to_dict())
    cfg.check()
    resume = None if run_id else mlflow_io.resumable_run("train", cfg.fingerprint(), cfg.resume_run_id,
                                                        dyn.DIRNAME, dyn.CHECKPOINT)
    with contextlib.ExitStack() as claimed:
        if resume:
            # Only one process resumes a run: the lock is taken before the run is touched, and the
            # run is looked at again under it (another process may have finished it meanwhile).
            claimed.enter_context(mlflow_io.claim(resume))
            mlflow_io.check_still_resumable(resume, dyn.DIRNAME, dyn.CHECKPOINT)
        return _train_in_run(cfg, resume, run_id, claimed, log_model, quiet, epoch_callback, fitter)


def _train_in_run(cfg: TrainRunConfig, resume: str | None, run_id: str | None, claimed: contextlib.ExitStack,
                  log_model: bool, quiet: bool, epoch_callback, fitter) -> str:
    with mlflow_io.start_run(
        train_run_name(cfg), "train", tags={mlflow_io.TAG_FINGERPRINT: cfg.fingerprint(), "ordering": cfg.ordering},
        description=f"SGD on {cfg.dataset} with per-sample per-layer importance tracking"
                    + ("" if cfg.ordering == "shuffle" else f", batches built by {cfg.ordering}") + ".",
        run_id=resume or run_id, resume=resume is not None, config=cfg.to_dict(),
    ) as run:
        if not resume:
            claimed.enter_context(mlflow_io.claim(run.info.run_id))
        data = training_data(cfg)
        check_batching(cfg, data.n_train)
        check_model_size(cfg, data)
        check_ordering(cfg, data.n_train)
        model = model_for(cfg, data)
        optimizer = make_optimizer(model, cfg)
        names, grouping, counts = importance_columns(model) if cfg.track == "importance" else ([], {}, {})
        project = ParameterProjection(model)
        metadata = {
            "dataset": cfg.dataset, "subset": cfg.subset, "batch_size": cfg.batch_size, "lr": cfg.lr,
            "weight_decay": cfg.weight_decay, "seed": cfg.seed, "model": cfg.model, "depth": cfg.depth, "width": cfg.width,
            "ordering": cfg.ordering, "reference_run_id": cfg.reference_run_id,
            "layer_names": names, "parameter_counts": counts, "layer_groups": grouping,
            "phi_convention": phi_convention(optimizer), "track": cfg.track, "norm": cfg.norm,
            "momentum": cfg.momentum, "nesterov": bool(cfg.nesterov),
            "image_shape": list(data.image_shape), "num_classes": data.num_classes,
            "run_id": run.info.run_id, "config": cfg.train_config().to_dict(),
            # The end-of-epoch evaluation (dynamics eval_*.npy) and the epoch of its GraNd row.
            "eval_train": bool(cfg.eval_train),
            "grand_epoch": cfg.early_epoch if cfg.eval_train and cfg.early_epoch <= cfg.epochs else None,
        }
        with mlflow_io.artifact_folder(dyn.DIRNAME) as folder:
            checkpoint = folder / dyn.CHECKPOINT
            if resume:
                # Tensors and plain values only (weights_only): a checkpoint is data, never code.
                state = dyn.load_checkpoint(folder)
                model.load_state_dict(state["model"])
                optimizer.load_state_dict(state["optimizer"])
                torch.set_rng_state(state["torch_rng"])
                history, start = state["history"], state["epoch"]
                tau = state["tau"].numpy().copy()
                writer = dyn.DynamicsWriter(folder, data.n_train, cfg.epochs, metadata, project.k, resume=True)
                writer.truncate(start)
                for epoch, metrics in enumerate(history, start=1):  # epochs whose metrics died with the process
                    mlflow_io.log_metrics_once(metrics, step=epoch)
                print(f"resuming run {run.info.run_id} after epoch {start} of {cfg.epochs}", flush=True)
            else:
                history, tau, start = [], np.zeros(data.n_train), 0
                writer = dyn.DynamicsWriter(folder, data.n_train, cfg.epochs, metadata, project.k)
                writer.write_initial(project(model), model.state_dict())

            order = presentation_order(cfg, data)  # (epochs, n) for a fixed order: after the size checks

            def on_epoch(rec: EpochRecord) -> None:
                writer.write_epoch(rec, project(model))
                tau[:] += rec.importance.sum(1, dtype=np.float64)
                history.append(rec.metrics)
                # After the arrays, before the metrics: a resumed run re-logs what is missing.
                dyn.save_atomic({"epoch": rec.epoch + 1, "model": model.state_dict(),
                                 "optimizer": optimizer.state_dict(), "torch_rng": torch.get_rng_state(),
                                 "history": history, "tau": torch.from_numpy(tau)}, checkpoint)
                mlflow_io.log_metrics(rec.metrics, step=rec.epoch + 1)  # step = 1-based epoch
                if not quiet:
                    print(_progress_line(rec, cfg.epochs), flush=True)
                if epoch_callback is not None:
                    epoch_callback(rec.epoch + 1, rec.metrics)

            try:
                result = fitter(model, data, cfg, order=order, on_epoch=on_epoch, optimizer=optimizer,
                                start_epoch=start)
            except DivergenceError as exc:
                mlflow_io.set_tags({mlflow_io.TAG_DIVERGED: f"epoch {exc.epoch + 1}, step {exc.step + 1}"})
                raise
            writer.finish(result.final_loss, data.y_train, data.sample_id, model.state_dict())

            per_layer = np.array([[h[f"importance_{name}"] for name in names] for h in history])
            mlflow_io.log_metrics_once({"final_train_loss": float(result.final_loss.mean(dtype=np.float64)),
                                        "final_test_error": history[-1]["test_error"],
                                        "final_test_loss": history[-1]["test_loss"]}, step=cfg.epochs)
            mlflow_io.log_figure(plots.error_curves(history), "figures/error_curves.png")
            if names:
                mlflow_io.log_figure(plots.layer_importance(per_layer, names, list(counts.values())),
                                     "figures/layer_importance.png")
                mlflow_io.log_figure(plots.total_importance_histogram(tau), "figures/total_importance_hist.png")
            if log_model:
                mlflow_io.log_torch_model(model, data.x_train[:5])
            # Last: until here a kill leaves the checkpoint, and a rerun finishes this run without retraining.
            dyn.discard_checkpoint(folder)
        return run.info.run_id


def retrain(cfg: TrainConfig, data: Dataset, init_state: dict, order: np.ndarray,
            sample_weight: np.ndarray | None = None, dtype: torch.dtype = torch.float32,
            track: bool = True) -> FitResult:
    """Train again through the one loop from `init_state`, presenting samples in `order` (epochs, n),
    optionally with sample weights and in another floating-point type (the counterfactual runs of
    `influence` retrain in float64 without tracking)."""
    model = model_for(cfg, data).to(dtype)
    model.load_state_dict(init_state)  # copies, casting to the model's type
    return fit(model, data, cfg, order=np.array(order), sample_weight=sample_weight, track=track)


def replay(d: dyn.Dynamics, data: Dataset | None = None, device: str = "cpu") -> FitResult:
    """Retrain a recorded run from its initial parameters and recorded presentation order.

    On the same device and software this reproduces the recorded run bit for bit."""
    cfg = TrainRunConfig(**{**d.metadata["config"], "device": device})
    if data is None:
        data = training_data(cfg)
    return retrain(cfg, data, d.state(dyn.INIT_STATE), d.batch_order)


def _progress_line(rec: EpochRecord, epochs: int) -> str:
    m = rec.metrics
    return (f"epoch {rec.epoch + 1:3d}/{epochs}  train_loss {m['train_loss']:.4f}  train_error {m['train_error']:.4f}"
            f"  test_error {m['test_error']:.4f}  importance {m['importance_total']:.4g}"
            f"  {m['samples_per_second']:,.0f} samples/s")

