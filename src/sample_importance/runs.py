"""A train run's life: found (a finished run of the same configuration), resumed (an interrupted
one), claimed, trained (alone, several together in one loop, or shared among workers) and written.
`get_or_train` is the one way a stage gets train runs; `TrainRun` is one run (open -> take an epoch
-> close). Every stage that trains goes through them.
"""
from __future__ import annotations

import contextlib
import functools
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from . import distributed
from . import dynamics as dyn
from . import mlflow_io, plots, workers
from .analysis import ordering
from .config import SHARED_IN_LOOP, ConfigError, TrainConfig, TrainRunConfig, fingerprint_of, trained_config
from .data import Dataset, training_data
from .models import ParameterProjection, check_model_size, importance_columns, model_for, check_named
from .tracked_run import phi_convention
from .training import (DivergenceError, EpochRecord, FitResult, check_batching, fit, fit_many, make_optimizer,
                       resolve_device)


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


def target_metadata(cfg: TrainConfig, data: Dataset) -> dict:
    """metadata.json's account of in-run attribution (none without attribute_to): the target set V
    (its split and the indices of its samples there) and how often its gradient was taken."""
    if cfg.attribute_to == "none":
        return {}
    where = "the first" if data.target_split == "test" else "the held-out last"
    return {"contribution": True, "target": f"mean NLL of {where} {len(data.target_ids)} {data.target_split} samples",
            "target_split": data.target_split, "target_ids": data.target_ids.tolist(),
            "target_every": cfg.target_every}


TAG_PROCESSES = "sample_importance.processes"  # a data-parallel run's number of processes


class TrainRun:
    """One `train` run, in three steps: `open` finds, resumes or creates the MLflow run and prepares
    data, model, optimizer, presentation order and the `dynamics/` writer; `take_epoch` writes one
    finished epoch (arrays, checkpoint, metrics); `close` writes the final arrays, figures and model
    and ends the run FINISHED. `fail(exc)` ends it with the reason instead (FAILED; KILLED when
    stopped or interrupted). It logs by run id, so many can be open at once in one loop.

    Resumes, in the same run, an interrupted run with the same configuration (or cfg.resume_run_id)
    from its last finished epoch. `epoch_callback(epoch, metrics)` runs after each epoch is logged;
    raising `errors.Stopped` in it ends the run as KILLED (how the sweep prunes a trial)."""

    def __init__(self, cfg: TrainConfig, *, log_model: bool = True, quiet: bool = False,
                 epoch_callback: Callable[[int, dict[str, float]], None] | None = None):
        if not isinstance(cfg, TrainRunConfig):
            cfg = TrainRunConfig(**cfg.train_config().to_dict())
        cfg.check()
        self.cfg, self.log_model, self.quiet, self.epoch_callback = cfg, log_model, quiet, epoch_callback
        self.run_id: str | None = None
        self.run: mlflow_io.OpenRun | None = None
        self._held = contextlib.ExitStack()  # the run's lock and its dynamics folder, until it ends

    def open(self, run_id: str | None = None) -> TrainRun:
        """`run_id`: a run created for it (nested under a parent), never resumed."""
        cfg = self.cfg
        self.run_id = run_id
        resume = None if run_id else mlflow_io.resumable_run("train", cfg.fingerprint(), cfg.resume_run_id,
                                                                 dyn.DIRNAME, dyn.CHECKPOINT)
        try:
            if resume:
                # Only one process resumes a run: the lock is taken before the run is touched, and the
                # run is looked at again under it (another process may have finished it meanwhile).
                self._held.enter_context(mlflow_io.claim(resume))
                mlflow_io.check_still_resumable(resume, dyn.DIRNAME, dyn.CHECKPOINT)
            world = distributed.rank_and_world()[1]
            self.run = mlflow_io.open_run(
                train_run_name(cfg), "train", tags={mlflow_io.TAG_FINGERPRINT: cfg.fingerprint(), "ordering": cfg.ordering,
                                                    **({TAG_PROCESSES: str(world)} if world > 1 else {})},
                description=f"SGD on {cfg.dataset} with per-sample per-layer importance tracking"
                            + ("" if cfg.ordering == "shuffle" else f", batches built by {cfg.ordering}") + ".",
                run_id=resume or self.run_id, resume=resume is not None, config=cfg.to_dict())
        except BaseException:
            self._held.close()
            raise
        self.run_id = self.run.run_id
        try:
            if not resume:
                self._held.enter_context(mlflow_io.claim(self.run_id))
            self._prepare(resume is not None)
        except BaseException as exc:
            self.fail(exc)
            raise
        return self

    def build(self) -> None:
        """Data, model, optimizer and presentation order (what every process of a data-parallel run
        needs; rank 0 alone has the MLflow run)."""
        cfg = self.cfg
        self.data = data = training_data(cfg)
        check_batching(cfg, data.n_train)
        check_model_size(cfg, data)
        check_ordering(cfg, data.n_train)
        self.model = model_for(cfg, data)
        self.optimizer = make_optimizer(self.model, cfg)
        self.order = presentation_order(cfg, data)  # (epochs, n) for a fixed order: after the size checks

    def _prepare(self, resume: bool) -> None:
        self.build()
        cfg, data, model = self.cfg, self.data, self.model
        self.names, grouping, self.counts = importance_columns(model) if cfg.track == "importance" else ([], {}, {})
        self.project = ParameterProjection(model)
        metadata = {
            "dataset": cfg.dataset, "subset": cfg.subset, "batch_size": cfg.batch_size, "lr": cfg.lr,
            "weight_decay": cfg.weight_decay, "seed": cfg.seed, "model": cfg.model, "depth": cfg.depth, "width": cfg.width,
            "ordering": cfg.ordering, "reference_run_id": cfg.reference_run_id,
            "layer_names": self.names, "parameter_counts": self.counts, "layer_groups": grouping,
            "phi_convention": phi_convention(self.optimizer), "track": cfg.track, "norm": cfg.norm,
            "momentum": cfg.momentum, "nesterov": bool(cfg.nesterov),
            "image_shape": list(data.image_shape), "num_classes": data.num_classes,
            "run_id": self.run_id, "config": cfg.train_config().to_dict(),
            # The end-of-epoch evaluation (dynamics eval_*.npy) and the epoch of its GraNd row.
            "eval_train": bool(cfg.eval_train),
            "grand_epoch": cfg.early_epoch if cfg.eval_train and cfg.early_epoch <= cfg.epochs else None,
            **target_metadata(cfg, data),
        }
        self.folder = self._held.enter_context(self.run.artifact_folder(dyn.DIRNAME))
        if resume:
            # Tensors and plain values only (weights_only): a checkpoint is data, never code.
            state = dyn.load_checkpoint(self.folder)
            model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            torch.set_rng_state(state["torch_rng"])
            self.history, self.start_epoch = state["history"], state["epoch"]
            self.tau = state["tau"].numpy().copy()
            self.writer = dyn.DynamicsWriter(self.folder, data.n_train, cfg.epochs, metadata, self.project.k, resume=True)
            self.writer.truncate(self.start_epoch)
            for epoch, metrics in enumerate(self.history, start=1):  # epochs whose metrics died with the process
                self.run.log_metrics_once(metrics, step=epoch)
            print(f"resuming run {self.run_id} after epoch {self.start_epoch} of {cfg.epochs}", flush=True)
        else:
            self.history, self.tau, self.start_epoch = [], np.zeros(data.n_train), 0
            self.writer = dyn.DynamicsWriter(self.folder, data.n_train, cfg.epochs, metadata, self.project.k)
            self.writer.write_initial(self.project(model), model.state_dict())

    def take_epoch(self, rec: EpochRecord) -> None:
        """Write a finished epoch of this run's model (its parameters are the end-of-epoch ones)."""
        self.writer.write_epoch(rec, self.project(self.model))
        self.tau[:] += rec.importance.sum(1, dtype=np.float64)
        self.history.append(rec.metrics)
        # After the arrays, before the metrics: a resumed run re-logs what is missing.
        dyn.save_checkpoint({"epoch": rec.epoch + 1, "model": self.model.state_dict(),
                             "optimizer": self.optimizer.state_dict(), "torch_rng": torch.get_rng_state(),
                             "history": self.history, "tau": torch.from_numpy(self.tau)}, self.folder)
        self.run.log_metrics(rec.metrics, step=rec.epoch + 1)  # step = 1-based epoch
        if not self.quiet:
            print(_progress_line(rec, self.cfg.epochs), flush=True)
        if self.epoch_callback is not None:
            self.epoch_callback(rec.epoch + 1, rec.metrics)

    def close(self, result: FitResult) -> str:
        """Final arrays, metrics, figures and model; the run ends FINISHED. Returns its id."""
        try:
            cfg, names, history, run = self.cfg, self.names, self.history, self.run
            self.writer.finish(result.final_loss, self.data.y_train, self.data.sample_id, self.model.state_dict())
            per_layer = np.array([[h[f"importance_{name}"] for name in names] for h in history])
            run.log_metrics_once({"final_train_loss": float(result.final_loss.mean(dtype=np.float64)),
                                  "final_test_error": history[-1]["test_error"],
                                  "final_test_loss": history[-1]["test_loss"]}, step=cfg.epochs)
            run.log_figure(plots.error_curves(history), "figures/error_curves.png")
            if names:
                run.log_figure(plots.layer_importance(per_layer, names, list(self.counts.values())),
                               "figures/layer_importance.png")
                run.log_figure(plots.total_importance_histogram(self.tau), "figures/total_importance_hist.png")
            if self.log_model:
                with dyn.disk_errors(self.folder.parent / "model"):
                    run.log_torch_model(self.model, self.data.x_train[:5])
        except BaseException as exc:
            self.fail(exc)
            raise
        if not run.local_artifacts():  # uploaded as the folder is released: without the checkpoint
            dyn.discard_checkpoint(self.folder)
        self._held.close()
        run.end()
        # After FINISHED: until then a kill leaves the checkpoint, and a rerun finishes this run without
        # retraining; a kill from here on leaves a finished run (and a stray checkpoint, never read again).
        dyn.discard_checkpoint(self.folder)
        return self.run_id

    def fail(self, exc: BaseException) -> None:
        """End the run with the reason `exc` (a divergence is tagged: such a run is not resumed)."""
        if isinstance(exc, DivergenceError):
            with contextlib.suppress(Exception):
                self.run.set_tags({mlflow_io.TAG_DIVERGED: f"epoch {exc.epoch + 1}, step {exc.step + 1}"})
        try:
            self._held.close()
        finally:
            self.run.end(exc)


def run_train(cfg: TrainConfig, log_model: bool = True, quiet: bool = False,
              epoch_callback: Callable[[int, dict[str, float]], None] | None = None,
              on_open: Callable[[str], None] | None = None) -> str:
    """Train one model with full tracking in a `TrainRun` (nested when a run is active); return the
    run id. `on_open(run_id)` runs once the run exists."""
    run = TrainRun(cfg, log_model=log_model, quiet=quiet, epoch_callback=epoch_callback).open()
    if on_open is not None:
        on_open(run.run_id)
    try:
        if distributed.active():  # the other processes start where this one resumes (DDP broadcasts the model)
            distributed.from_rank_zero((run.start_epoch, run.optimizer.state_dict() if run.start_epoch else None))
        result = fit(run.model, run.data, run.cfg, order=run.order, on_epoch=run.take_epoch, optimizer=run.optimizer,
                     start_epoch=run.start_epoch)
    except BaseException as exc:
        run.fail(exc)
        raise
    return run.close(result)


def follow_train(cfg: TrainConfig) -> None:
    """A process other than rank 0 of a data-parallel run (torchrun): the same model, order and
    schedule, trained on its share of every batch; rank 0 records and writes the run."""
    run = TrainRun(cfg, quiet=True)
    run.build()
    start, optimizer_state = distributed.from_rank_zero(None)
    if optimizer_state is not None:
        run.optimizer.load_state_dict(optimizer_state)
    fit(run.model, run.data, run.cfg, order=run.order, optimizer=run.optimizer, start_epoch=start)


def get_or_train(cfgs: list[TrainConfig], parallel_models: int = 0, *, storage: str = "", heartbeat: int = 60,
                 launch_from: str | Path | None = None, verbose: bool = True,
                 epoch_callback: Callable[[int, int, list[dict[str, float]]], None] | None = None) -> list[str]:
    """The id of a finished `train` run for every configuration, nested under the active run: a
    finished run with the same configuration is reused; an interrupted one resumes alone; the rest
    train `parallel_models` at a time (0 = auto) in one loop, one run each. Raises the first
    error of a run that failed once all are done (each failed run is FAILED with its reason).
    How the missing runs are trained is an option, the finding and resuming are the same:

    - `storage` (an Optuna storage): shared with every other worker that trains the same list
      against it, one run at a time each (`_train_shared`);
    - `launch_from` (the MLproject folder): each as a child `mlflow run` of the `train` entry point
      (its own process and log, as `main` shows its steps);
    - otherwise here, in one loop (`train_together`).

    `epoch_callback(group, epoch, metrics)` follows every epoch of every group trained together
    (group = 0, 1, ... in training order; metrics of each model that finished the epoch); raising
    `errors.Stopped` in it ends the group's runs as KILLED and propagates (the sweep's pruning)."""
    if storage:
        return _train_shared(cfgs, storage, heartbeat, verbose)
    ids: list[str | None] = [mlflow_io.find_finished_run("train", c.fingerprint()) for c in cfgs]
    fresh = []
    for k, cfg in enumerate(cfgs):
        if ids[k] is not None:
            if verbose:
                print(f"reusing train run {ids[k]} ({train_run_name(cfg)})", flush=True)
        elif launch_from is not None:  # the launched entry point resumes an interrupted run itself
            ids[k] = mlflow_io.launch_child(launch_from, "train", cfg.params(), train_run_name(cfg))
            if verbose:
                print(f"trained train run {ids[k]} ({train_run_name(cfg)})", flush=True)
        elif mlflow_io.resumable_run("train", cfg.fingerprint(), "", dyn.DIRNAME, dyn.CHECKPOINT):
            ids[k] = run_train(cfg, quiet=not verbose)  # resumes it
        else:
            fresh.append(k)
    groups: dict[tuple, list[int]] = {}
    for k in fresh:  # models trained together share inputs, shape and schedule
        c = cfgs[k]
        groups.setdefault(tuple(getattr(c, name) for name in SHARED_IN_LOOP), []).append(k)
    parent = mlflow_io.active_run_id() if groups else ""  # the runs trained here nest under the active run
    errors, group = [], 0
    for members in groups.values():
        size, batched = group_size(cfgs[members[0]], len(members), parallel_models)
        for start in range(0, len(members), size):
            chunk = members[start:start + size]
            hook = None if epoch_callback is None else functools.partial(epoch_callback, group)
            group += 1
            if verbose:
                how = "as one batched computation where they allow it" if batched else "one after another"
                print(f"training {len(chunk)} model(s) in one loop, {how}: "
                      + ", ".join(train_run_name(cfgs[k]) for k in chunk), flush=True)
            for k, outcome in zip(chunk, train_together([cfgs[k] for k in chunk], parent, batched, verbose, hook)):
                if isinstance(outcome, BaseException):
                    errors.append(outcome)
                else:
                    ids[k] = outcome
    if errors:
        raise errors[0]
    return ids


def _train_shared(cfgs: list[TrainConfig], storage: str, heartbeat: int, verbose: bool) -> list[str]:
    """`get_or_train` over workers: each configuration is a job of `workers.share`, trained (or resumed,
    when a dead worker left it) by whichever worker claims it; returns once every run has finished."""
    name = "runs-" + fingerprint_of([c.fingerprint() for c in cfgs])

    def work(k: int, record_run: Callable[[str], None]) -> None:
        done = mlflow_io.find_finished_run("train", cfgs[k].fingerprint())
        if done is None:
            if verbose:
                print(f"training {train_run_name(cfgs[k])} (run {k + 1} of {len(cfgs)} shared in {name})", flush=True)
            run_train(cfgs[k], quiet=not verbose, on_open=record_run)

    workers.share(name, storage, heartbeat, len(cfgs), work)
    ids = [mlflow_io.find_finished_run("train", c.fingerprint()) for c in cfgs]
    missing = [train_run_name(c) for c, i in zip(cfgs, ids) if i is None]
    if missing:  # every job is complete, so its run finished: only a run deleted meanwhile gets here
        raise RuntimeError(f"the runs {', '.join(missing)} are complete in {name} but not finished in MLflow")
    return ids


def group_size(cfg: TrainConfig, count: int, parallel_models: int) -> tuple[int, bool]:
    """How many models train in one loop, and whether to batch them (where they can be:
    `training.fit_many`). 0 (auto): all at once, batched on a GPU (in turn on a CPU, where batching
    gains nothing reliable: bench/README.md); 1: each alone; k: k at a time, batched."""
    if parallel_models == 1:
        return 1, False
    if parallel_models == 0:
        return count, resolve_device(cfg.device).type == "cuda"
    return parallel_models, True


def train_together(cfgs: list[TrainConfig], parent_run_id: str, batched: bool | None = None, verbose: bool = True,
                   epoch_callback: Callable[[int, list[dict[str, float]]], None] | None = None
                   ) -> list[str | BaseException]:
    """Train every configuration as a `train` run nested under `parent_run_id`, in one loop: each
    model's finished epoch goes to its own `TrainRun`, which writes it exactly as alone.

    The configs must share inputs, epochs, batch size and device. Returns each run's id, or the
    exception that ended it (its run is then FAILED or KILLED with the reason, as alone); an
    exception of `epoch_callback(epoch, metrics)` ends every run of the group and propagates."""
    outcome: list[str | BaseException | None] = [None] * len(cfgs)
    opened: list[tuple[int, TrainRun]] = []
    for k, cfg in enumerate(cfgs):  # one at a time: each creates and sets up its run and data
        try:
            run = TrainRun(cfg, quiet=True)  # checks the configuration before a run exists
            opened.append((k, run.open(mlflow_io.create_run(parent_run_id, train_run_name(run.cfg), tags={}))))
        except Exception as exc:  # noqa: BLE001 - its run is FAILED with the reason; the others go on
            outcome[k] = exc
    runs = [run for _, run in opened]

    def take(m: int, rec: EpochRecord) -> bool:
        """Hand model m's finished epoch to its run; an error there ends that run alone."""
        try:
            runs[m].take_epoch(rec)
        except Exception as exc:  # noqa: BLE001
            runs[m].fail(exc)
            outcome[opened[m][0]] = exc
            return False
        return True

    try:
        results = fit_many([r.model for r in runs], [r.data for r in runs], [r.cfg for r in runs],
                           orders=[r.order for r in runs], on_epoch=take, optimizers=[r.optimizer for r in runs],
                           start_epoch=0, batched=batched,
                           on_epoch_end=_epoch_end(cfgs[0].epochs, verbose, epoch_callback)) if runs else []
    except BaseException as exc:  # Ctrl-C, a pruned group, a bug: every run still open ends with the reason
        for k, run in opened:
            if outcome[k] is None:
                run.fail(exc)
        raise
    for (k, run), result in zip(opened, results):  # finish one at a time
        if outcome[k] is not None:  # ended by an error in its epoch
            continue
        if isinstance(result, FitResult):
            try:
                outcome[k] = run.close(result)
            except Exception as exc:  # noqa: BLE001 - close ended its run FAILED; the others go on
                outcome[k] = exc
        else:  # diverged
            run.fail(result)
            outcome[k] = result
    return outcome


def _epoch_end(epochs: int, verbose: bool, callback) -> Callable[[int, list[dict[str, float]]], None]:
    """One console line per epoch for the whole group, then the caller's callback."""
    def end(epoch: int, rows: list[dict[str, float]]) -> None:
        if verbose and rows:
            span = lambda key: f"{min(r[key] for r in rows):.4f}-{max(r[key] for r in rows):.4f}"
            print(f"epoch {epoch + 1:3d}/{epochs}  {len(rows)} model(s)  train_loss {span('train_loss')}  test_error "
                  f"{span('test_error')}  {rows[0]['samples_per_second']:,.0f} samples/s per model", flush=True)
        if callback is not None:
            callback(epoch, rows)
    return end


def retrain(cfg: TrainConfig, data: Dataset, init_state: dict, order: np.ndarray,
            sample_weight: np.ndarray | None = None, dtype: torch.dtype = torch.float32,
            track: bool = True) -> FitResult:
    """Train again through the one loop from `init_state`, presenting samples in `order` (epochs, n),
    optionally with sample weights and in another floating-point type (the counterfactual runs of
    `influence` retrain in float64 without tracking)."""
    model = model_for(cfg, data).to(dtype)
    model.load_state_dict(init_state)  # copies, casting to the model's type
    return fit(model, data, cfg, order=np.array(order), sample_weight=sample_weight, track=track)


def replay(d: dyn.Dynamics, data: Dataset | None = None, device: str = "cpu", model: str = "") -> FitResult:
    """Retrain a recorded run from its initial parameters and recorded presentation order.
    `model`: the factory, when the run's model is a researcher's own (never imported from the run's files).

    On the same device and software this reproduces the recorded run bit for bit."""
    cfg = trained_config(d.metadata, device=device)
    if data is None:
        data = training_data(cfg)
    check_named(cfg, model)  # before retrain builds the model
    return retrain(cfg, data, d.state(dyn.INIT_STATE), d.batch_order)


def _progress_line(rec: EpochRecord, epochs: int) -> str:
    m = rec.metrics
    return (f"epoch {rec.epoch + 1:3d}/{epochs}  train_loss {m['train_loss']:.4f}  train_error {m['train_error']:.4f}"
            f"  test_error {m['test_error']:.4f}  importance {m['importance_total']:.4g}"
            f"  {m['samples_per_second']:,.0f} samples/s")

