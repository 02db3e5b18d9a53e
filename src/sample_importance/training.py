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

from .config import ConfigError, TrainConfig
from .data import Dataset
from .errors import UserError
from .tracking import sgd_step


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


@torch.no_grad()
def evaluate(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, chunk: int = 8192
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample NLL (m,) and correctness (m,) of `model` on (x, y), on x's device."""
    losses, correct = [], []
    for s in range(0, len(y), chunk):
        logits = model(x[s:s + chunk])
        losses.append(torch.nn.functional.cross_entropy(logits, y[s:s + chunk], reduction="none"))
        correct.append(logits.argmax(1) == y[s:s + chunk])
    return torch.cat(losses), torch.cat(correct)


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """Plain SGD as in the paper: no momentum, no schedule; weight decay on every parameter."""
    return torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=0.0, weight_decay=cfg.weight_decay)


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
    """Train `model` in place with SGD for cfg.epochs epochs.

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

    Raises DivergenceError when a loss is NaN or infinite: on the CPU at that step, on a GPU at the
    end of its epoch (checking every step would stall the GPU with host synchronisations).
    """
    n = data.n_train
    check_batching(cfg, n)
    if order is None:
        order = shuffled_orders(n, cfg.epochs, cfg.seed)
    assert order.shape == (cfg.epochs, n), f"order must be (epochs, n) = {(cfg.epochs, n)}, got {order.shape}"
    device = resolve_device(cfg.device)
    model.to(device)
    if optimizer is None:
        optimizer = make_optimizer(model, cfg)
    layers = len(model.layer_names)

    dtype = next(model.parameters()).dtype
    # The data and the presentation order live on the device; batches are gathered there.
    x_train = torch.as_tensor(data.x_train, device=device, dtype=dtype)  # (n, d)
    y_train = torch.as_tensor(data.y_train, device=device)  # (n,)
    weight = None if sample_weight is None else torch.as_tensor(sample_weight, device=device, dtype=dtype)
    x_test = torch.as_tensor(data.x_test, device=device, dtype=dtype)
    y_test = torch.as_tensor(data.y_test, device=device)
    order_dev = torch.as_tensor(np.array(order), device=device)  # (epochs, n)

    history = []
    check_each_step = device.type == "cpu"  # free on the CPU; a GPU would wait for the host each step
    for epoch in range(start_epoch, cfg.epochs):
        start = time.perf_counter()
        # Per-epoch buffers indexed by sample_id, filled on the device, copied to the host once.
        importance = torch.zeros(n, layers, device=device, dtype=dtype)
        loss = torch.zeros(n, device=device, dtype=dtype)
        p_true = torch.zeros(n, device=device, dtype=dtype)
        correct = torch.zeros(n, dtype=torch.bool, device=device)
        error_l2 = torch.zeros(n, device=device, dtype=dtype)
        model.train()
        for s in range(0, n, cfg.batch_size):
            ids = order_dev[epoch, s:s + cfg.batch_size]  # (B,)
            if on_batch is not None:
                on_batch(model, ids)
            rec = sgd_step(model, optimizer, x_train[ids], y_train[ids], cfg.lr, track=track,
                           weight=None if weight is None else weight[ids])
            if check_each_step and not bool(torch.isfinite(rec.loss).all()):
                _diverged(epoch, s // cfg.batch_size, rec.loss)
            if track:
                importance[ids] = rec.importance
            loss[ids] = rec.loss
            p_true[ids] = rec.p_true
            correct[ids] = rec.correct
            error_l2[ids] = rec.error_l2
        record = EpochRecord(epoch, order[epoch], _host32(importance), _host32(loss), _host32(p_true),
                             correct.cpu().numpy(), _host32(error_l2))
        seconds = time.perf_counter() - start
        _check_finite(record, cfg.batch_size)

        model.eval()
        test_loss, test_correct = evaluate(model, x_test, y_test)
        layer_totals = record.importance.sum(0, dtype=np.float64)  # B_d^t
        record.metrics = {
            "train_loss": float(record.loss.mean(dtype=np.float64)),
            "train_error": float(1.0 - record.correct.mean()),
            "test_loss": float(test_loss.double().mean()),
            "test_error": float(1.0 - test_correct.double().mean()),
            "importance_total": float(layer_totals.sum()),  # A^t
            **{f"importance_{name}": float(v) for name, v in zip(model.layer_names, layer_totals)},
            "epoch_seconds": seconds,
            "samples_per_second": n / seconds,
        }
        history.append(record.metrics)
        if on_epoch is not None:
            on_epoch(record)

    model.eval()
    final_loss, _ = evaluate(model, x_train, y_train)
    return FitResult(model, final_loss.cpu().numpy().astype(np.float32), history)


def _host32(t: torch.Tensor) -> np.ndarray:
    return t.cpu().numpy().astype(np.float32, copy=False)


def _check_finite(record: EpochRecord, batch_size: int) -> None:
    """Raise DivergenceError naming the first step whose loss was NaN or infinite."""
    in_order = record.loss[record.batch_order]  # presentation order
    bad = ~np.isfinite(in_order)
    if bad.any():
        first = int(np.argmax(bad))
        _diverged(record.epoch, first // batch_size, in_order[first:first + 1])


def _diverged(epoch: int, step: int, losses) -> None:
    value = [v for v in np.asarray(losses, dtype=np.float64).ravel().tolist() if not np.isfinite(v)][0]
    raise DivergenceError(epoch, step, f"Training diverged: the loss became {value} at epoch {epoch + 1}, step "
                                       f"{step + 1}; lower lr (it is too large for this model and data).")
