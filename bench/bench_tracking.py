"""Cost of exact per-sample, per-layer importance tracking, measured in one process.

Times one epoch of SGD on the paper's network (784-512-512-512-10, batch 100) three ways:
  plain    the usual PyTorch loop (forward, mean loss, backward, optimizer.step), no tracking
  tracked  this project's training loop (`training.fit`), recording beta, loss, p_true, correct
  vmap     per-sample gradients through torch.func.vmap(grad(...)), reduced to per-layer norms,
           then the same SGD step: the textbook way to get per-sample gradient norms
Rounds are interleaved and the median of each is reported, so a noisy machine affects all alike.

    python bench/bench_tracking.py [--n 10000] [--rounds 5] [--device cpu]
"""
from __future__ import annotations

import argparse
import platform
import statistics
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, vmap

from sample_importance.config import TrainConfig
from sample_importance.data import Dataset
from sample_importance.models import build_model
from sample_importance.training import fit, make_optimizer, shuffled_orders


def synthetic(n: int, seed: int = 0) -> Dataset:
    rng = np.random.default_rng(seed)
    x = rng.random((n + 100, 784), dtype=np.float32)
    y = rng.integers(0, 10, n + 100).astype(np.int64)
    return Dataset("synthetic", x[:n], y[:n], x[n:], y[n:], (1, 28, 28))


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def plain_epoch(model, data, cfg, device) -> float:
    opt = make_optimizer(model, cfg)
    x = torch.as_tensor(data.x_train, device=device)
    y = torch.as_tensor(data.y_train, device=device)
    order = torch.as_tensor(shuffled_orders(data.n_train, 1, cfg.seed)[0], device=device)
    sync(device)
    start = time.perf_counter()
    for s in range(0, data.n_train, cfg.batch_size):
        ids = order[s:s + cfg.batch_size]
        loss = F.cross_entropy(model(x[ids]), y[ids])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    sync(device)
    return time.perf_counter() - start


def tracked_epoch(model, data, cfg, device) -> float:
    """The product path: `fit` times its own SGD pass (tracking and the per-epoch host copy included)."""
    return fit(model, data, cfg).history[0]["epoch_seconds"]


def vmap_epoch(model, data, cfg, device, max_steps: int) -> float:
    """Seconds per epoch (extrapolated from `max_steps` steps) of the vmap(grad) route."""
    opt = make_optimizer(model, cfg)
    params = {k: v.detach() for k, v in model.named_parameters()}
    names = model.layer_names

    def sample_loss(p, xi, yi):
        return F.cross_entropy(functional_call(model, p, (xi[None],)), yi[None])

    per_sample_grad = vmap(grad(sample_loss), in_dims=(None, 0, 0))
    x = torch.as_tensor(data.x_train, device=device)
    y = torch.as_tensor(data.y_train, device=device)
    steps = 0
    sync(device)
    start = time.perf_counter()
    for s in range(0, data.n_train, cfg.batch_size):
        xb, yb = x[s:s + cfg.batch_size], y[s:s + cfg.batch_size]
        params = {k: v.detach() for k, v in model.named_parameters()}
        g = per_sample_grad(params, xb, yb)  # each (B, *param.shape)
        B = len(yb)
        beta = torch.stack([sum(g[f"layers.{d}.{w}"].flatten(1).square().sum(1) for w in ("weight", "bias"))
                            for d in names], 1) * (cfg.lr / B) ** 2  # (B, layers)
        for k, p in model.named_parameters():
            p.grad = g[k].mean(0)
        opt.step()
        steps += 1
        if steps >= max_steps:
            break
    sync(device)
    del beta
    return (time.perf_counter() - start) * (-(-data.n_train // cfg.batch_size)) / steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=10_000, help="training samples per epoch")
    ap.add_argument("--batch_size", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--vmap_steps", type=int, default=20, help="steps timed for the (slow) vmap route")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    device = torch.device(args.device)
    data = synthetic(args.n)
    cfg = TrainConfig(batch_size=args.batch_size, epochs=1, device=args.device)
    new = lambda: build_model(784, 10, 3, 512, 0).to(device)  # noqa: E731

    tracked_epoch(new(), data, cfg, device)  # warm-up (allocator, kernels)
    plain_epoch(new(), data, cfg, device)
    times = {"plain": [], "tracked": [], "vmap": []}
    for _ in range(args.rounds):
        times["plain"].append(plain_epoch(new(), data, cfg, device))
        times["tracked"].append(tracked_epoch(new(), data, cfg, device))
        times["vmap"].append(vmap_epoch(new(), data, cfg, device, args.vmap_steps))
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}, device {device}")
    print(f"network 784-512-512-512-10, batch {args.batch_size}, {args.n} samples/epoch, "
          f"median of {args.rounds} interleaved rounds")
    print(f"{'route':10s} {'s/epoch':>9s} {'samples/s':>11s} {'vs plain':>9s}")
    for k in ("plain", "tracked", "vmap"):
        print(f"{k:10s} {med[k]:9.3f} {args.n / med[k]:11,.0f} {med[k] / med['plain']:8.2f}x")
    print(f"tracking overhead: {med['tracked'] / med['plain']:.3f}x plain SGD (target <= 1.15)")
    print(f"vmap(grad) route: {med['vmap'] / med['tracked']:.1f}x slower than tracking (target >= 20)")


if __name__ == "__main__":
    main()
