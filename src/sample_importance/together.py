"""Many `train` runs at once: each model keeps its own MLflow run, written by the same `run_train`
as when it trains alone, while one loop (`training.fit_many`) trains all of them.

Each run's `run_train` goes on in a thread of its own (MLflow's active run is per thread) until it
would call `fit`; there it hands its model, data, order and epoch callback to the group and waits.
The group trains the models together and passes each finished epoch to its run, which writes its
`dynamics/`, checkpoint and metrics exactly as alone. Only one thread runs at a time (a handshake,
not concurrency), so MLflow never sees two writers. A run that fails or is stopped leaves the
group; the others go on.
"""
from __future__ import annotations

import dataclasses
import functools
import queue
import threading
from collections.abc import Callable

import numpy as np

from . import dynamics as dyn
from . import mlflow_io
from .config import TrainConfig, TrainRunConfig
from .data import Dataset
from .errors import Stopped
from .tasks import run_train, train_run_name
from .training import EpochRecord, FitResult, fit_many, resolve_device

_DONE = object()


@dataclasses.dataclass
class _Fit:
    """What `run_train` would have passed to `fit`."""

    model: object
    data: Dataset
    cfg: TrainConfig
    order: np.ndarray | None
    on_epoch: Callable[[EpochRecord], None]
    optimizer: object
    start_epoch: int


class _Member:
    """One run of the group: its thread, and the two queues of the handshake with the group."""

    def __init__(self, cfg: TrainRunConfig, run_id: str):
        self.cfg, self.run_id = cfg, run_id
        self.inbox: queue.Queue = queue.Queue()  # group -> run: EpochRecord, FitResult or an exception
        self.outbox: queue.Queue = queue.Queue()  # run -> group: _Fit, None (epoch done), _DONE or an exception
        self.error: BaseException | None = None
        self.fit: _Fit | None = None
        self.thread = threading.Thread(target=self._main, name=f"train {run_id}", daemon=True)

    def _main(self) -> None:
        try:
            run_train(self.cfg, quiet=True, run_id=self.run_id, fitter=self._fitter)
        except BaseException as exc:  # noqa: BLE001 - handed to the group, which carries on without it
            self.error = exc
            self.outbox.put(exc)
        else:
            self.outbox.put(_DONE)

    def _fitter(self, model, data, cfg, *, order=None, on_epoch=None, optimizer=None, start_epoch=0) -> FitResult:
        """Stands in for `fit` inside run_train: registers, then handles what the group sends."""
        self.outbox.put(_Fit(model, data, cfg, order, on_epoch, optimizer, start_epoch))
        while True:
            item = self.inbox.get()
            if isinstance(item, BaseException):
                raise item
            if isinstance(item, FitResult):
                return item
            on_epoch(item)  # an exception here ends the run (FAILED or KILLED) and reaches the group
            self.outbox.put(None)

    def start(self) -> None:
        """Start the run's thread and wait until it waits for training (or has ended)."""
        self.thread.start()
        first = self.outbox.get()
        if isinstance(first, _Fit):
            self.fit = first

    def send(self, item) -> bool:
        """Hand `item` to the run and wait until it has dealt with it; False if that ended the run."""
        self.inbox.put(item)
        return self.outbox.get() is None

    def finish(self, item) -> None:
        """Hand the run its result (or the exception that ends it) and wait until it has ended."""
        if self.thread.is_alive():
            self.inbox.put(item)
            self.thread.join()


def train_many(cfgs: list[TrainConfig], parallel_models: int = 0, verbose: bool = True,
               epoch_callback: Callable[[int, int, list[dict[str, float]]], None] | None = None) -> list[str]:
    """The id of a finished `train` run for every configuration, nested under the active run: a
    finished run with the same configuration is reused; an interrupted one resumes alone; the rest
    train `parallel_models` at a time (0 = auto) in one loop, one run each. Raises the first
    error of a run that failed once all are done (each failed run is FAILED with its reason).

    `epoch_callback(group, epoch, metrics)` follows every epoch of every group trained together
    (group = 0, 1, ... in training order; metrics of each model that finished the epoch); raising
    `errors.Stopped` in it ends the group's runs as KILLED and propagates (the sweep's pruning)."""
    ids: list[str | None] = [mlflow_io.find_finished_run("train", c.fingerprint()) for c in cfgs]
    fresh = []
    for k, cfg in enumerate(cfgs):
        if ids[k] is not None:
            if verbose:
                print(f"reusing train run {ids[k]} ({train_run_name(cfg)})", flush=True)
        elif mlflow_io.resumable_run("train", cfg.fingerprint(), "", dyn.DIRNAME, dyn.CHECKPOINT):
            ids[k] = run_train(cfg, quiet=not verbose)  # resumes it
        else:
            fresh.append(k)
    groups: dict[tuple, list[int]] = {}
    for k in fresh:  # models trained together share inputs, shape and schedule
        c = cfgs[k]
        groups.setdefault((c.dataset, c.subset, c.model, c.depth, c.width, c.norm, c.channels, c.track, c.batch_size,
                           c.epochs, c.device), []).append(k)
    parent = mlflow_io.active_run_id()
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
    """Train every configuration as a `train` run nested under `parent_run_id`, in one loop.

    The configs must share inputs, epochs, batch size and device. Returns each run's id, or the
    exception that ended it (its run is then FAILED or KILLED with the reason, as alone); an
    exception of `epoch_callback(epoch, metrics)` ends every run of the group and propagates."""
    members: list[_Member] = []
    try:
        for cfg in cfgs:  # one at a time: each creates and sets up its run and data, then waits
            members.append(_Member(cfg, mlflow_io.create_run(parent_run_id, train_run_name(cfg), tags={})))
            members[-1].start()
        live = [m for m in members if m.fit is not None]
        outcome = []
        if live:
            outcome = fit_many([m.fit.model for m in live], [m.fit.data for m in live], [m.fit.cfg for m in live],
                               orders=[m.fit.order for m in live], on_epoch=lambda k, rec: live[k].send(rec),
                               optimizers=[m.fit.optimizer for m in live], start_epoch=live[0].fit.start_epoch,
                               batched=batched, on_epoch_end=_epoch_end(live[0].fit.cfg.epochs, verbose, epoch_callback))
    except BaseException as exc:  # Ctrl-C, a pruned group, a bug: every run still open ends with the reason
        for member in members:
            member.finish(exc)
        raise
    for member, result in zip(live, outcome):  # finish one at a time
        member.finish(result if result is not None else Stopped("stopped by its epoch callback"))
    for member in members:
        member.thread.join()
    return [m.error if m.error is not None else m.run_id for m in members]


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
