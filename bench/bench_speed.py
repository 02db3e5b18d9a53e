"""Speed of per-sample importance tracking against the alternatives, every row measured in one process.

For the paper's network (784-512-512-512-10) and each batch size, one epoch of SGD on synthetic
784-pixel samples, five ways:
  plain     the usual PyTorch loop (forward, mean loss, backward, optimizer.step): no tracking
  tracked   this project's loop (`training.fit`): beta, loss, p_true, correctness, EL2N per sample
  backpack  BackPACK's BatchL2Grad (per-sample squared gradient norms per parameter), summed per layer
  opacus    Opacus's GradSampleModule: per-sample gradients, reduced to per-layer squared norms
  vmap      torch.func.vmap(grad(...)): per-sample gradients, reduced to per-layer squared norms
each followed by the same SGD step. Then M models at once (`training.fit_many`, batched) against
the same M models one after another (M calls of `fit`), at batch 100. Every row prints its rate of
useful floating-point work (the forward and backward products of plain SGD, per sample, times
samples per second) next to that of a large matrix product (4096^3, float32) timed in the same
process. Rounds are interleaved and medians reported, so a noisy machine affects every row alike.

    python bench/bench_speed.py                       # CPU, batch sizes 32, 100, 512
    python bench/bench_speed.py --device cuda         # GPU, where there is one
"""
from __future__ import annotations

import argparse
import platform
import statistics
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from sample_importance.config import TrainConfig
from sample_importance.data import Dataset
from sample_importance.models import build_model
from sample_importance.training import fit, fit_many, make_optimizer, shuffled_orders

SIZES = [784, 512, 512, 512, 10]


def synthetic(n: int, seed: int = 0) -> Dataset:
    rng = np.random.default_rng(seed)
    x = rng.random((n + 100, 784), dtype=np.float32)
    y = rng.integers(0, 10, n + 100).astype(np.int64)
    return Dataset("synthetic", x[:n], y[:n], x[n:], y[n:], (1, 28, 28))


def flops_per_sample() -> float:
    """Multiply-adds x 2 of one SGD step per sample: forward, weight gradients, and input gradients
    of every layer but the first."""
    mults = [a * b for a, b in zip(SIZES, SIZES[1:])]
    return 2.0 * (2 * sum(mults) + sum(mults[1:]))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def matmul_rate(device: torch.device, size: int = 4096, repeats: int = 3) -> float:
    a = torch.randn(size, size, device=device)
    b = torch.randn(size, size, device=device)
    a @ b  # warm-up
    sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    sync(device)
    return 2.0 * size ** 3 * repeats / (time.perf_counter() - start)


def sequential(seed: int) -> nn.Sequential:
    """The same network as an nn.Sequential (what BackPACK and Opacus expect)."""
    mlp = build_model(784, 10, 3, 512, seed)
    layers: list[nn.Module] = []
    for k, layer in enumerate(mlp.layers.values()):
        layers += [layer] + ([nn.ReLU()] if k < 3 else [])
    return nn.Sequential(*layers)


def _loop(model, data, cfg, device, step, max_steps: int | None = None) -> float:
    """Seconds for one epoch of `step(xb, yb)` (extrapolated from max_steps steps if given)."""
    x = torch.as_tensor(data.x_train, device=device)
    y = torch.as_tensor(data.y_train, device=device)
    order = torch.as_tensor(shuffled_orders(data.n_train, 1, cfg.seed)[0], device=device)
    steps_total = -(-data.n_train // cfg.batch_size)
    steps = 0
    sync(device)
    start = time.perf_counter()
    for s in range(0, data.n_train, cfg.batch_size):
        ids = order[s:s + cfg.batch_size]
        step(x[ids], y[ids])
        steps += 1
        if max_steps and steps >= max_steps:
            break
    sync(device)
    return (time.perf_counter() - start) * steps_total / steps


def plain(data, cfg, device) -> float:
    model = build_model(784, 10, 3, 512, 0).to(device)
    opt = make_optimizer(model, cfg)

    def step(xb, yb):
        loss = F.cross_entropy(model(xb), yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return _loop(model, data, cfg, device, step)


def tracked(data, cfg, device) -> float:
    """The product path: `fit` times its own SGD pass (tracking and the per-epoch host copy included)."""
    return fit(build_model(784, 10, 3, 512, 0), data, cfg).history[0]["epoch_seconds"]


def tracked_eval(data, cfg, device) -> float:
    """`tracked` plus the end-of-epoch evaluation of the training set (`eval_train=1`: one forward
    pass over it after the epoch, timed by `fit` as eval_seconds; no GraNd pass in a 1-epoch run)."""
    cfg = TrainConfig(**{**cfg.to_dict(), "eval_train": 1, "early_epoch": cfg.epochs + 1})
    row = fit(build_model(784, 10, 3, 512, 0), data, cfg).history[0]
    return row["epoch_seconds"] + row["eval_seconds"]


def backpack_route(data, cfg, device) -> float:
    from backpack import backpack, extend
    from backpack.extensions import BatchL2Grad

    model = extend(sequential(0).to(device))
    loss_fn = extend(nn.CrossEntropyLoss())
    opt = make_optimizer(model, cfg)
    linears = [m for m in model if isinstance(m, nn.Linear)]

    def step(xb, yb):
        loss = loss_fn(model(xb), yb)
        opt.zero_grad(set_to_none=True)
        with backpack(BatchL2Grad()):
            loss.backward()
        beta = torch.stack([m.weight.batch_l2 + m.bias.batch_l2 for m in linears], 1) * cfg.lr ** 2  # (B, layers)
        opt.step()
        return beta
    return _loop(model, data, cfg, device, step)


def opacus_route(data, cfg, device) -> float:
    from opacus import GradSampleModule

    model = GradSampleModule(sequential(0).to(device), loss_reduction="mean")
    opt = make_optimizer(model, cfg)
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]

    def step(xb, yb):
        loss = F.cross_entropy(model(xb), yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        beta = torch.stack([m.weight.grad_sample.flatten(1).square().sum(1) + m.bias.grad_sample.square().sum(1)
                            for m in linears], 1) * (cfg.lr / len(yb)) ** 2
        opt.step()
        for p in model.parameters():
            p.grad_sample = None
        return beta
    return _loop(model, data, cfg, device, step)


def vmap_route(data, cfg, device, max_steps: int = 10) -> float:
    model = build_model(784, 10, 3, 512, 0).to(device)
    opt = make_optimizer(model, cfg)

    def sample_loss(p, xi, yi):
        return F.cross_entropy(functional_call(model, p, (xi[None],)), yi[None])

    per_sample_grad = vmap(grad(sample_loss), in_dims=(None, 0, 0))

    def step(xb, yb):
        g = per_sample_grad({k: v.detach() for k, v in model.named_parameters()}, xb, yb)
        beta = torch.stack([sum(g[f"layers.{d}.{w}"].flatten(1).square().sum(1) for w in ("weight", "bias"))
                            for d in model.layer_names], 1) * (cfg.lr / len(yb)) ** 2
        for k, p in model.named_parameters():
            p.grad = g[k].mean(0)
        opt.step()
        return beta
    return _loop(model, data, cfg, device, step, max_steps)


def many_at_once(data, cfg, M: int) -> float:
    cfgs = [TrainConfig(**{**cfg.to_dict(), "seed": s}) for s in range(M)]
    models = [build_model(784, 10, 3, 512, s) for s in range(M)]
    start = time.perf_counter()
    fit_many(models, [data] * M, cfgs, batched=M > 1)
    return time.perf_counter() - start


def one_after_another(data, cfg, M: int) -> float:
    start = time.perf_counter()
    for s in range(M):
        fit(build_model(784, 10, 3, 512, s), data, TrainConfig(**{**cfg.to_dict(), "seed": s}))
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=10_000, help="training samples per epoch (single-model rows)")
    ap.add_argument("--n_many", type=int, default=2_000, help="training samples per epoch (many-model rows)")
    ap.add_argument("--batch_sizes", default="32,100,512")
    ap.add_argument("--models", default="1,8,40", help="M of the many-model rows")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--skip", default="", help="comma-separated routes to leave out (e.g. vmap)")
    args = ap.parse_args()
    device = torch.device(args.device)
    skip = set(filter(None, args.skip.split(",")))
    routes = {"plain": plain, "tracked": tracked, "tracked+eval": tracked_eval, "backpack": backpack_route, "opacus": opacus_route,
              "vmap": vmap_route}
    routes = {k: v for k, v in routes.items() if k not in skip}
    per_sample = flops_per_sample()
    data = synthetic(args.n)
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}, device {device}"
          + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""))
    rate = statistics.median(matmul_rate(device) for _ in range(args.rounds))
    print(f"4096^3 float32 matrix product: {rate / 1e9:,.0f} GFLOP/s")
    print(f"network 784-512-512-512-10, {per_sample / 1e6:.2f} MFLOP per sample per SGD step, {args.n} samples "
          f"per epoch, median of {args.rounds} interleaved rounds")
    for batch in (int(b) for b in args.batch_sizes.split(",")):
        # eval_train=0: `tracked` is the training alone, as in the figures recorded before the
        # end-of-epoch evaluation existed; `tracked+eval` adds it.
        cfg = TrainConfig(batch_size=batch, epochs=1, device=args.device, eval_train=0)
        for fn in routes.values():  # warm-up
            fn(synthetic(2 * batch), cfg, device)
        times = {k: [] for k in routes}
        for _ in range(args.rounds):
            for k, fn in routes.items():
                times[k].append(fn(data, cfg, device))
        med = {k: statistics.median(v) for k, v in times.items()}
        print(f"\nbatch {batch}")
        print(f"{'route':12s} {'s/epoch':>9s} {'samples/s':>11s} {'vs plain':>9s} {'GFLOP/s':>9s} {'of matmul':>10s}")
        for k, t in med.items():
            print(f"{k:12s} {t:9.3f} {args.n / t:11,.0f} {t / med['plain']:8.2f}x {per_sample * args.n / t / 1e9:9.1f}"
                  f" {per_sample * args.n / t / rate:9.0%}")
    cfg = TrainConfig(batch_size=100, epochs=1, device=args.device, eval_train=0)
    many = synthetic(args.n_many)
    print(f"\nM models, batch 100, {args.n_many} samples per epoch each")
    print(f"{'M':>3s} {'at once s':>10s} {'one by one s':>13s} {'speed-up':>9s} {'GFLOP/s at once':>16s}")
    for M in (int(m) for m in args.models.split(",")):
        many_at_once(synthetic(200), cfg, M)  # warm-up
        together, alone = [], []
        for _ in range(args.rounds):
            together.append(many_at_once(many, cfg, M))
            alone.append(one_after_another(many, cfg, M))
        t, a = statistics.median(together), statistics.median(alone)
        print(f"{M:3d} {t:10.3f} {a:13.3f} {a / t:8.2f}x {per_sample * args.n_many * M / t / 1e9:16.1f}")


if __name__ == "__main__":
    main()
