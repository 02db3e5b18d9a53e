"""Cost of a Hessian-vector product and of the default influence solve (issue 19).

Trains the `influence` default model (the paper's 3x512 network on `subset` digits samples, the
other training parameters at their defaults, untracked) and times, in one process:
  - `Objective.hvp` (forward-over-reverse, recomputed per product) and `Objective.hvp_at` (the
    gradient's linearisation built once and reused), in float64 and float32, with the relative
    difference of the float32 product from the float64 one;
  - the smallest eigenvalue by eigsh (what damping=auto costs) and the damping it gives;
  - the conjugate-gradient solve of the test-loss target at that damping (residual, products, seconds).

    python bench/bench_hvp.py                  # subset=300, as `mlflow run . -e influence -P train=subset=300`
    python bench/bench_hvp.py --subset 60 --width 32 --epochs 3    # a quick check that it runs
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from sample_importance.analysis import influence as inf  # noqa: E402
from sample_importance.config import InfluenceConfig, TrainConfig  # noqa: E402
from sample_importance.data import training_data  # noqa: E402
from sample_importance.models import model_for  # noqa: E402
from sample_importance.training import fit  # noqa: E402


def timed(fn, rounds: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--subset", type=int, default=300)
    parser.add_argument("--depth", type=int, default=3)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--epochs", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--threads", type=int, default=0, help="torch threads; 0 = torch's default")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = TrainConfig(subset=args.subset, depth=args.depth, width=args.width, epochs=args.epochs, device="cpu")
    data = training_data(cfg)
    model = model_for(cfg, data)
    fit(model, data, cfg, track=False)
    model = model.double()
    flat = inf.Flat(model)
    print(f"{flat.size:,} parameters, {data.n_train} samples, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    x64 = torch.as_tensor(data.x_train, dtype=torch.float64)
    y = torch.as_tensor(data.y_train)
    theta64 = flat.of_model()
    v64 = torch.randn(flat.size, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    reference = None
    print(f"{'product':<28}{'s/product':>12}{'rel. diff. from float64':>26}")
    for dtype in (torch.float64, torch.float32):
        obj = inf.Objective(flat, x64.to(dtype), y, cfg.weight_decay)
        theta, v = theta64.to(dtype), v64.to(dtype)
        at = obj.hvp_at(theta)
        for name, fn in (("hvp (jvp of grad)", lambda: obj.hvp(theta, v)), ("hvp_at (reused vjp)", lambda: at(v))):
            seconds = timed(fn, args.rounds)
            out = fn().double()
            reference = out if reference is None else reference
            diff = float((out - reference).norm() / reference.norm())
            print(f"{name + ', ' + str(dtype).split('.')[1]:<28}{seconds:>12.4f}{diff:>26.1e}")
    obj = inf.Objective(flat, x64, y, cfg.weight_decay)
    spec = inf.auto_damping(obj, theta64)
    print(f"smallest eigenvalue {spec.min_eigenvalue:.4e} (+- {spec.residual:.1e}): damping {spec.damping:.4e}, "
          f"{spec.matvecs} products, {spec.seconds:.1f} s")
    icfg = InfluenceConfig()  # the entry point's defaults
    num_test = icfg.target_set.num_test
    test = torch.as_tensor(data.x_test[:num_test], dtype=torch.float64)
    target = inf.make_target("test_loss", flat, test, torch.as_tensor(data.y_test[:num_test]))
    b = torch.func.grad(target.fn)(theta64)
    sol = inf.solve("cg", obj, theta64, b, spec.damping, cg_tol=icfg.hessian.cg_tol,
                    cg_maxiter=icfg.hessian.cg_maxiter)
    print(f"cg solve (test_loss): residual {sol.residual:.2e} (tol {sol.tol:g}, converged {sol.converged}), "
          f"{sol.matvecs} products, {sol.seconds:.1f} s")


if __name__ == "__main__":
    main()
