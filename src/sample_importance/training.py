"""The one training loop: plain SGD as in the paper, recording per-sample dynamics every step.

`fit` knows nothing of files or MLflow: it hands each finished epoch to `on_epoch`, and the caller
decides where it goes (the dynamics writer, MLflow metrics, the console). A fixed presentation
order (`order`) replays a recorded run or trains a chosen batch construction through the same code.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from . import distributed
from .config import SHARED_IN_LOOP, ConfigError, TrainConfig
from .data import Dataset
from .errors import UserError
from .importance import ImportanceRecorder
from .stacked import StackedMLP
from .models import importance_columns, importance_groups
from .step import checkpoint_sq_grad_norms, sample_statistics, sgd_step


class DivergenceError(UserError):
    """The training loss became NaN or infinite."""

    def __init__(self, epoch: int, step: int, message: str):
        super().__init__(message)
        self.epoch, self.step = epoch, step


@dataclass
class EpochRecord:
    """Everything recorded in one epoch; per-sample arrays are indexed by sample_id."""

    epoch: int  # 0-based
    batch_order: np.ndarray  # (n,) int64: sample ids in the order presented
    importance: np.ndarray  # (n, layers) float32: beta of each sample at the step it was in the batch
    loss: np.ndarray  # (n,) float32: in-batch NLL (before that step's update)
    p_true: np.ndarray  # (n,) float32: in-batch probability of the true label
    correct: np.ndarray  # (n,) bool: in-batch correctness
    error_l2: np.ndarray  # (n,) float32: in-batch ||softmax - onehot||_2
    metrics: dict[str, float] = field(default_factory=dict)
    # End-of-epoch evaluation of every training sample under the parameters after the epoch
    # (cfg.eval_train; None when off): the same statistics, and ||g_i|| at cfg.early_epoch (NaN otherwise).
    eval_loss: np.ndarray | None = None  # (n,) float32
    eval_p_true: np.ndarray | None = None  # (n,) float32
    eval_correct: np.ndarray | None = None  # (n,) bool
    eval_error_l2: np.ndarray | None = None  # (n,) float32
    eval_grad_norm: np.ndarray | None = None  # (n,) float32: GraNd's ||grad L_i|| at early_epoch, else NaN
    contribution: np.ndarray | None = None  # (n, layers) float32: in-run attribution to a target loss, if on


@dataclass
class FitResult:
    model: torch.nn.Module
    final_loss: np.ndarray  # (n,) float32: NLL of every training sample under the final parameters
    history: list[dict[str, float]]  # metrics per epoch


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device=cuda was requested but no CUDA device is available: use device=auto or cpu.")
    return torch.device(name)


def shuffled_orders(n: int, epochs: int, seed: int) -> np.ndarray:
    """The per-epoch random presentation order (epochs, n) that `seed` fixes (a stream separate
    from the initialisation, so the same seed gives the same init whatever the order)."""
    rng = np.random.default_rng([seed, 1])
    return np.stack([rng.permutation(n) for _ in range(epochs)]).astype(np.int64)


def check_batching(cfg: TrainConfig, n: int) -> None:
    if cfg.batch_size > n:
        raise ConfigError(
            f"batch_size={cfg.batch_size} is larger than the {n} training samples: choose at most {n}."
        )


def check_data_parallel(cfg: TrainConfig, n: int, models: int, world: int) -> None:
    """Data-parallel training splits every batch over the processes: one model, and at least one
    sample of each batch (the last, smaller one too) for every process."""
    if models > 1:
        raise ConfigError(f"Data-parallel training (torchrun, {world} processes) trains one model per run: train the "
                          "stages that train several runs in one process.")
    if cfg.norm == "batch" or cfg.batchnorm == "exact":
        raise ConfigError("BatchNorm normalises with each process's own share of the batch under data-parallel "
                          "training, so the run would differ from one trained in one process: use norm=group (or "
                          "train BatchNorm models in one process).")
    last = n % cfg.batch_size
    if cfg.batch_size < world or 0 < last < world:
        raise ConfigError(f"With {world} processes every batch needs at least {world} samples, but batch_size="
                          f"{cfg.batch_size} over {n} samples leaves a last batch of {last or cfg.batch_size}: choose "
                          "another batch_size or subset, or fewer processes.")


def evaluate_train(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, grad_norm: bool, chunk: int = 1024,
                   recorder: ImportanceRecorder | None = None) -> tuple[torch.Tensor, ...]:
    """Every training sample under the model's current (end-of-epoch) parameters, in chunks on x's
    device: NLL, p(true label), correctness, ||softmax - onehot||_2 (n,) each, and, with `grad_norm`,
    the exact norm of each sample's own loss gradient ||g_i|| (the recorder without a step; else NaN).
    What Lee et al.'s learnability, dataset cartography and data_diet's EL2N/GraNd read. `recorder`:
    the model's own recorder, if it has one."""
    losses, logits, norms = [], [], []
    for s in range(0, len(y), chunk):
        xb, yb = x[s:s + chunk], y[s:s + chunk]
        if grad_norm:
            sq, out = checkpoint_sq_grad_norms(model, xb, yb, recorder)  # (B, layers), (B, classes)
            norms.append(sq.sum(1).sqrt())
        else:
            with torch.no_grad():
                out = model(xb)
            norms.append(torch.full((len(yb),), float("nan"), device=x.device, dtype=out.dtype))
        logits.append(out)
        losses.append(torch.nn.functional.cross_entropy(out, yb, reduction="none"))
    loss, logits = torch.cat(losses), torch.cat(logits)
    p_true, correct, error_l2 = sample_statistics(logits, loss, y)
    return loss, p_true, correct, error_l2, torch.cat(norms)


@torch.no_grad()
def evaluate(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, chunk: int = 1024
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample NLL (m,) and correctness (m,) of `model` on (x, y), on x's device."""
    losses, correct = [], []
    for s in range(0, len(y), chunk):
        logits = model(x[s:s + chunk])
        losses.append(torch.nn.functional.cross_entropy(logits, y[s:s + chunk], reduction="none"))
        correct.append(logits.argmax(1) == y[s:s + chunk])
    return torch.cat(losses), torch.cat(correct)


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """SGD with no schedule and weight decay on every parameter: plain as in the paper (momentum 0),
    or with (Nesterov) momentum as Lee et al.'s models are trained."""
    return torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, nesterov=bool(cfg.nesterov),
                           weight_decay=cfg.weight_decay)


def fit(
    model: torch.nn.Module,
    data: Dataset,
    cfg: TrainConfig,
    *,
    order: np.ndarray | None = None,
    on_epoch: Callable[[EpochRecord], None] | None = None,
    on_batch: Callable[[torch.nn.Module, torch.Tensor], None] | None = None,
    track: bool = True,
    optimizer: torch.optim.Optimizer | None = None,
    start_epoch: int = 0,
    sample_weight: np.ndarray | None = None,
) -> FitResult:
    """Train `model` in place with SGD for cfg.epochs epochs (`fit_many` with one model).

    Args:
        order: (epochs, n) sample ids per epoch to present in this order; default: shuffled by cfg.seed.
        on_epoch: called with each finished epoch's record (host arrays, metrics).
        on_batch: called with (model, sample ids of the batch) before each step; for tests and probes.
        track: record per-sample importance (False only for benchmarking the untracked baseline).
        optimizer: the optimizer to step (default: a fresh `make_optimizer`); pass one to resume.
        start_epoch: epochs already done (resuming): training continues with epoch `start_epoch`.
        sample_weight: (n,) weight v_i of each sample's loss in its batch mean (default all 1); the
            counterfactual retraining of the influence validation changes one of them.

    Computes in the model's floating-point type (a float64 model trains in float64).

    Raises DivergenceError, naming the first step whose loss was NaN or infinite, at the end of
    that epoch (a check at every step would cost a host synchronisation per step).
    """
    (result,) = fit_many([model], [data], [cfg], orders=[order],
                         on_epoch=None if on_epoch is None else (lambda _, record: on_epoch(record)),
                         on_batch=on_batch, track=track, optimizers=[optimizer], start_epoch=start_epoch,
                         sample_weights=[sample_weight])
    if isinstance(result, DivergenceError):
        raise result
    return result


def fit_many(
    models: list[torch.nn.Module],
    datas: list[Dataset],
    cfgs: list[TrainConfig],
    *,
    orders: list[np.ndarray | None] | None = None,
    on_epoch: Callable[[int, EpochRecord], bool | None] | None = None,
    on_batch: Callable[[torch.nn.Module, torch.Tensor], None] | None = None,
    track: bool = True,
    optimizers: list[torch.optim.Optimizer | None] | None = None,
    start_epoch: int = 0,
    sample_weights: list[np.ndarray | None] | None = None,
    batched: bool | None = None,
    on_epoch_end: Callable[[int, list[dict[str, float]]], None] | None = None,
) -> list[FitResult | DivergenceError | None]:
    """Train M models in place, each as `fit` would alone, in one loop over epochs and steps.

    The models share the training inputs, epochs, batch size and device; each has its own labels
    (datas[m].y_train: label noise), presentation order, learning rate, weight decay and sample
    weights. How a step is taken is a strategy: `StackedSteps` (one stacked computation, when
    `batched` is True or None and the models are MLPs of one shape under plain SGD, no on_batch
    probe, one process, no attribution) or `PerModelSteps` (each model in turn).
    `on_epoch(m, record)` gets model m's finished epoch (its parameters are current in models[m]);
    returning False stops training model m. `on_epoch_end(epoch, metrics)` follows with the metrics
    of every model that finished the epoch.

    Returns, per model, its FitResult, the DivergenceError that stopped it, or None if on_epoch
    stopped it. A diverging model stops alone; the others go on.
    """
    M, cfg, n = len(models), cfgs[0], datas[0].n_train
    for c, d in zip(cfgs, datas):
        if _shared(c) != _shared(cfg) or d.x_train.shape != datas[0].x_train.shape:
            raise ValueError(f"fit_many trains models that share {', '.join(SHARED_IN_LOOP)} and their inputs")
    check_batching(cfg, n)
    orders = [shuffled_orders(n, c.epochs, c.seed) if o is None else np.asarray(o)
              for o, c in zip(orders or [None] * M, cfgs)]
    for o in orders:
        assert o.shape == (cfg.epochs, n), f"order must be (epochs, n) = {(cfg.epochs, n)}, got {o.shape}"
    device = resolve_device(cfg.device)
    for model in models:
        model.to(device)
    optimizers = [make_optimizer(m, c) if o is None else o for m, c, o in zip(models, cfgs, optimizers or [None] * M)]
    dtype = next(models[0].parameters()).dtype
    rank, world = distributed.rank_and_world()
    if world > 1:
        check_data_parallel(cfg, n, M, world)
    importance_on = track and cfg.track == "importance"  # track=outputs: the per-sample statistics alone
    attributing = importance_on and cfg.attribute_to != "none"  # in-run attribution to datas[m]'s target set
    columns = importance_columns(models[0])[0] if importance_on else []

    # The data and each epoch's presentation orders live on the device; batches are gathered there.
    x_train = torch.as_tensor(datas[0].x_train, device=device, dtype=dtype)  # (n, d)
    y_train = torch.stack([torch.as_tensor(d.y_train, device=device) for d in datas])  # (M, n)
    weights = None
    if sample_weights is not None and any(w is not None for w in sample_weights):
        weights = torch.stack([torch.ones(n, device=device, dtype=dtype) if w is None else
                               torch.as_tensor(w, device=device, dtype=dtype) for w in sample_weights])  # (M, n)
    x_test = torch.as_tensor(datas[0].x_test, device=device, dtype=dtype)
    y_test = torch.as_tensor(datas[0].y_test, device=device)
    stackable = batched is not False and on_batch is None and StackedMLP.stackable(models) and \
        not any(c.momentum for c in cfgs) and world == 1 and not attributing
    steps = StackedSteps(models, cfgs, importance_on) if stackable else \
        PerModelSteps(models, datas, cfgs, optimizers, importance_on, attributing, columns, world, on_batch)
    try:
        results: list[FitResult | DivergenceError | None] = [None] * M
        live = [True] * M
        histories: list[list[dict[str, float]]] = [[] for _ in range(M)]
        for epoch in range(start_epoch, cfg.epochs):
            start = time.perf_counter()
            # Per-epoch buffers indexed by (model, sample_id), filled on the device, copied to the host once.
            buffers = EpochBuffers.zeros(M, n, len(columns), datas[0].num_classes, attributing, device, dtype)
            order_dev = torch.as_tensor(np.stack([o[epoch] for o in orders]), device=device)  # (M, n): one copy an epoch
            for model in models:
                model.train()
            for j, s in enumerate(range(0, n, cfg.batch_size)):
                ids = order_dev[:, s:s + cfg.batch_size]  # (M, B)
                size = ids.shape[1]
                if world > 1:
                    ids = ids.tensor_split(world, dim=1)[rank]  # (M, B / world): this process's share
                w = None if weights is None else weights.gather(1, ids)
                steps.step(epoch * -(-n // cfg.batch_size) + j, x_train, y_train, ids, w, size, buffers, live)
            steps.end_epoch()
            if world > 1:  # every process gets every sample's entries (zeros where another trained it)
                distributed.sum_over_processes(buffers.tensors())
            seconds = time.perf_counter() - start
            p_true, correct, error_l2 = sample_statistics(buffers.logits, buffers.loss, y_train)
            host = [_host32(t) for t in (buffers.importance, buffers.loss, p_true, error_l2)] + [correct.cpu().numpy()]
            contribution = None if buffers.contribution is None else _host32(buffers.contribution)
            # End-of-epoch evaluation of the training set (one extra forward pass; a backward pass too at
            # early_epoch), each array stacked over models and copied to the host once.
            start = time.perf_counter()
            evaluated = [m for m in range(M) if track and live[m] and cfgs[m].eval_train]
            for m in evaluated:
                models[m].eval()
            evals = _to_host(evaluated, [evaluate_train(models[m], x_train, y_train[m], importance_on and
                                                        epoch + 1 == cfgs[m].early_epoch, recorder=steps.recorders[m])
                                         for m in evaluated])
            eval_seconds = time.perf_counter() - start
            finished = []
            for m in (m for m in range(M) if live[m]):
                record = EpochRecord(epoch, orders[m][epoch], host[0][m], host[1][m], host[2][m], host[4][m], host[3][m])
                if m in evals:
                    record.eval_loss, record.eval_p_true, record.eval_correct, record.eval_error_l2, \
                        record.eval_grad_norm = evals[m]
                try:
                    _check_finite(record, cfg.batch_size)
                except DivergenceError as exc:
                    results[m], live[m] = exc, False
                    continue
                models[m].eval()
                record.metrics = epoch_metrics(record, models[m], x_test, y_test, columns, seconds, eval_seconds)
                if attributing:
                    record.contribution = contribution[m]
                    record.metrics |= steps.targets[m].epoch_metrics(models[m], record.contribution, columns)
                histories[m].append(record.metrics)
                finished.append(record.metrics)
                if on_epoch is not None and on_epoch(m, record) is False:
                    live[m] = False
            if on_epoch_end is not None:
                on_epoch_end(epoch, finished)
            if not any(live):
                break

        for m in (m for m in range(M) if live[m]):
            models[m].eval()
            final_loss, _ = evaluate(models[m], x_train, y_train[m])
            results[m] = FitResult(models[m], final_loss.cpu().numpy().astype(np.float32), histories[m])
        return results
    finally:
        steps.close()


def epoch_metrics(record: EpochRecord, model: torch.nn.Module, x_test: torch.Tensor, y_test: torch.Tensor,
                  columns: list[str], seconds: float, eval_seconds: float) -> dict[str, float]:
    """One model's figures of a finished epoch: in-batch training loss and error, test loss and
    error under the end-of-epoch parameters (model in eval mode), the importance totals A^t and
    B_d^t, the time of the loop (all models together), and the end-of-epoch evaluation's."""
    n = len(record.loss)
    test_loss, test_correct = evaluate(model, x_test, y_test)
    layer_totals = record.importance.sum(0, dtype=np.float64)  # B_d^t
    metrics = {
        "train_loss": float(record.loss.mean(dtype=np.float64)),
        "train_error": float(1.0 - record.correct.mean()),
        "test_loss": float(test_loss.double().mean()),
        "test_error": float(1.0 - test_correct.double().mean()),
        "importance_total": float(layer_totals.sum()),  # A^t
        **{f"importance_{name}": float(v) for name, v in zip(columns, layer_totals)},
        "epoch_seconds": seconds,  # of the whole loop: all models
        "samples_per_second": n / seconds,  # per model
    }
    if record.eval_loss is not None:
        metrics |= {
            "eval_train_loss": float(record.eval_loss.mean(dtype=np.float64)),  # end-of-epoch parameters
            "eval_train_error": float(1.0 - record.eval_correct.mean()),
            "eval_seconds": eval_seconds,  # the end-of-epoch evaluation of all models
        }
    return metrics


@dataclass
class EpochBuffers:
    """One epoch's per-sample quantities of M models on the device, indexed by (model, sample_id)."""

    importance: torch.Tensor  # (M, n, layers)
    loss: torch.Tensor  # (M, n)
    logits: torch.Tensor  # (M, n, classes)
    contribution: torch.Tensor | None  # (M, n, layers) with in-run attribution, else None

    @classmethod
    def zeros(cls, M: int, n: int, layers: int, classes: int, attributing: bool, device, dtype) -> "EpochBuffers":
        z = lambda *shape: torch.zeros(*shape, device=device, dtype=dtype)  # noqa: E731
        return cls(z(M, n, layers), z(M, n), z(M, n, classes), z(M, n, layers) if attributing else None)

    def store(self, where, rec, track: bool) -> None:
        """Scatter a step's per-sample quantities at `where` (an index)."""
        if track:
            self.importance[where] = rec.importance
        self.loss[where] = rec.loss
        self.logits[where] = rec.logits

    def tensors(self) -> list[torch.Tensor]:
        return [self.importance, self.loss, self.logits] + ([] if self.contribution is None else [self.contribution])


class StackedSteps:
    """The step strategy for MLPs of one shape under plain SGD: all M models as one stacked
    computation (`stacked.StackedMLP`), importance through the Linear rule."""

    def __init__(self, models: list[torch.nn.Module], cfgs: list[TrainConfig], importance_on: bool):
        self.stack = StackedMLP(models, [c.lr for c in cfgs], [c.weight_decay for c in cfgs])
        self.importance_on = importance_on
        self.recorders = [None] * len(models)  # the end-of-epoch evaluation records through none
        self.targets = None
        self.rows = None

    def step(self, step: int, x_train, y_train, ids, w, size: int, buffers: EpochBuffers, live: list[bool]) -> None:
        if self.rows is None:
            self.rows = torch.arange(len(ids), device=ids.device).unsqueeze(1)  # (M, 1): each model's row
        rec = self.stack.step(x_train[ids], y_train.gather(1, ids), track=self.importance_on, weight=w)
        buffers.store((self.rows, ids), rec, self.importance_on)

    def end_epoch(self) -> None:
        self.stack.write_back()

    def close(self) -> None:
        pass


class PerModelSteps:
    """The step strategy for any models: each in turn through `step.sgd_step`, with its own
    recorder for the whole run (hooks on its layers, summed into its importance columns), its
    optimizer (momentum, Nesterov), its share of a data-parallel batch (DDP) and its in-run
    attribution target."""

    def __init__(self, models, datas, cfgs, optimizers, importance_on: bool, attributing: bool, columns: list[str],
                 world: int, on_batch):
        self.models, self.cfgs, self.optimizers = models, cfgs, optimizers
        self.importance_on, self.world, self.on_batch = importance_on, world, on_batch
        # Data-parallel (torchrun): each process steps its share of every batch through DDP, which
        # averages the processes' gradients (grad_scale = world undoes the average's 1/world).
        self.steppers = [torch.nn.parallel.DistributedDataParallel(m) if world > 1 else m for m in models]
        self.recorders = [ImportanceRecorder(m, batchnorm=c.batchnorm, groups=importance_groups(m))
                          if importance_on else None for m, c in zip(models, cfgs)]
        for rec in self.recorders:
            assert rec is None or rec.group_names == columns, (rec.group_names, columns)
        self.targets = None
        if attributing:
            dtype = next(models[0].parameters()).dtype
            device = next(models[0].parameters()).device
            self.targets = [Target(d, device, dtype) for d in datas]
            for target, model in zip(self.targets, models):
                target.start(model)

    def step(self, step: int, x_train, y_train, ids, w, size: int, buffers: EpochBuffers, live: list[bool]) -> None:
        for m in (m for m in range(len(self.models)) if live[m]):
            model = self.models[m]
            if self.on_batch is not None:
                self.on_batch(model, ids[m])
            target = None
            if self.targets is not None:
                target = self.targets[m].gradient(model, self.recorders[m], step % self.cfgs[m].target_every == 0)
            rec = sgd_step(self.steppers[m], self.optimizers[m], x_train[ids[m]], y_train[m, ids[m]],
                           track=self.importance_on, weight=None if w is None else w[m], recorder=self.recorders[m],
                           batch_size=size, grad_scale=self.world, target=target)
            buffers.store((m, ids[m]), rec, self.importance_on)
            if target is not None:
                buffers.contribution[m, ids[m]] = rec.contribution
                self.targets[m].stepped(model)

    def end_epoch(self) -> None:
        pass

    def close(self) -> None:
        for rec in self.recorders:
            if rec is not None:
                rec.close()


def _shared(cfg: TrainConfig) -> tuple:
    """What the models of one `fit_many` loop share (all but the per-model options)."""
    return tuple(getattr(cfg, name) for name in SHARED_IN_LOOP)


class Target:
    """In-run attribution's target set V of one model: the gradient of its mean loss L_V (evaluation
    mode) at the parameters before a step — every `target_every`-th step, the steps between reusing
    the last — and the epoch's fidelity figures: the actual change of L_V, and its first-order
    prediction sum_t grad L_V(theta_t) . delta theta_t (the samples' contributions, weight decay and
    momentum's carry-over together)."""

    def __init__(self, data: Dataset, device: torch.device, dtype: torch.dtype, chunk: int = 1024):
        self.x = torch.as_tensor(data.x_target, device=device, dtype=dtype)
        self.y = torch.as_tensor(data.y_target, device=device)
        self.chunk = chunk
        self.grad: dict | None = None
        self.before: list[torch.Tensor] | None = None
        self.loss = self.first_order = None

    def value(self, model: torch.nn.Module) -> float:
        """L_V at the current parameters, in evaluation mode."""
        was = model.training
        model.eval()
        try:
            total, _ = evaluate(model, self.x, self.y, self.chunk)
        finally:
            model.train(was)
        return float(total.double().mean())

    def start(self, model: torch.nn.Module) -> None:
        """Before the first step (of this process's training: a resumed run starts at its checkpoint)."""
        self.loss = self.value(model)

    def gradient(self, model: torch.nn.Module, recorder: ImportanceRecorder, fresh: bool) -> dict:
        """{parameter: d L_V / d parameter} for the coming step (`fresh`: at the current parameters;
        else the last one); the parameters are remembered for the step's first-order term."""
        if fresh or self.grad is None:
            was = model.training
            model.eval()
            try:
                with recorder.unrecorded(), torch.enable_grad():
                    grad = None
                    for k in range(0, len(self.y), self.chunk):
                        logits = model(self.x[k:k + self.chunk])
                        part = torch.nn.functional.cross_entropy(logits, self.y[k:k + self.chunk], reduction="sum")
                        g = recorder.target_gradient(part / len(self.y))
                        grad = g if grad is None else {p: grad[p] + g[p] for p in g}
            finally:
                model.train(was)
            self.grad = grad
        self.before = [p.detach().clone() for p in self.grad]
        return self.grad

    def stepped(self, model: torch.nn.Module) -> None:
        """After the step: add grad L_V . delta theta to the epoch's first-order prediction."""
        with torch.no_grad():
            term = sum((g * (p.detach() - b)).sum(dtype=torch.float64) for (p, g), b in zip(self.grad.items(), self.before))
        self.first_order = term if self.first_order is None else self.first_order + term
        self.before = None

    def epoch_metrics(self, model: torch.nn.Module, contribution: np.ndarray, columns: list[str]) -> dict[str, float]:
        """The epoch's figures: the summed contributions (total and per layer), L_V after the epoch,
        its actual change, the first-order prediction and the share of the change it explains."""
        totals = contribution.sum(0, dtype=np.float64)
        after = self.value(model)
        change = after - self.loss
        first = 0.0 if self.first_order is None else float(self.first_order)
        self.loss, self.first_order = after, None
        out = {"contribution_total": float(totals.sum()),
               **{f"contribution_{name}": float(v) for name, v in zip(columns, totals)},
               "target_loss": after, "target_change": change, "target_first_order": first}
        if change != 0:
            out["target_explained"] = first / change
        return out


def _to_host(models: list[int], evals: list[tuple[torch.Tensor, ...]]) -> dict[int, list[np.ndarray]]:
    """Per evaluated model, its end-of-epoch arrays on the host: each quantity stacked over the
    models and copied once."""
    if not models:
        return {}
    columns = [torch.stack(col) for col in zip(*evals)]  # each (M', n)
    host = [c.cpu().numpy() if c.dtype == torch.bool else _host32(c) for c in columns]
    return {m: [h[k] for h in host] for k, m in enumerate(models)}


def _host32(t: torch.Tensor) -> np.ndarray:
    return t.cpu().numpy().astype(np.float32, copy=False)


def _check_finite(record: EpochRecord, batch_size: int) -> None:
    """Raise DivergenceError naming the first step whose loss was NaN or infinite."""
    in_order = record.loss[record.batch_order]  # presentation order
    bad = ~np.isfinite(in_order)
    if bad.any():
        first = int(np.argmax(bad))
        raise _divergence(record.epoch, first // batch_size, in_order[first:first + 1])


def _divergence(epoch: int, step: int, losses) -> DivergenceError:
    value = [v for v in np.asarray(losses, dtype=np.float64).ravel().tolist() if not np.isfinite(v)][0]
    return DivergenceError(epoch, step, f"Training diverged: the loss became {value} at epoch {epoch + 1}, step "
                                        f"{step + 1}; lower lr (it is too large for this model and data).")
