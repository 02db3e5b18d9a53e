"""Samples per second of the registry's convolutional models through the project's loop
(`training.fit`), with track=importance, track=outputs, and untracked (plain SGD), on this machine.

    python bench/bench_models.py                                  # resnet20 (GroupNorm), 28x28, batch 100
    python bench/bench_models.py --models resnet20,mobilenet,vgg16 --n 1000

Each row trains one epoch of `n` synthetic Fashion-MNIST-shaped samples (end-of-epoch evaluation off,
so the rows compare the training steps alone); rounds are interleaved and the median is reported,
with its ratio to untracked training in the same process.
"""
from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))
from sample_importance.config import TrainConfig  # noqa: E402
from sample_importance.data import Dataset  # noqa: E402
from sample_importance.models import model_for  # noqa: E402
from sample_importance.training import fit  # noqa: E402

MODES = ("plain", "outputs", "importance")


def synthetic(n: int, shape: tuple[int, int, int], seed: int = 0) -> Dataset:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, int(np.prod(shape)))).astype(np.float32)
    y = rng.integers(0, 10, n)
    return Dataset("synthetic", x, y, x[:100], y[:100], shape)


def samples_per_second(cfg: TrainConfig, data: Dataset, mode: str) -> float:
    cfg = dataclasses.replace(cfg, track="outputs" if mode == "outputs" else "importance")
    history = fit(model_for(cfg, data), data, cfg, track=mode != "plain").history
    return history[0]["samples_per_second"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="resnet20", help="comma-separated registry names")
    ap.add_argument("--norm", default="group")
    ap.add_argument("--n", type=int, default=2000, help="samples per epoch")
    ap.add_argument("--batch_size", type=int, default=100)
    ap.add_argument("--shape", default="1,28,28")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    shape = tuple(int(v) for v in args.shape.split(","))
    data = synthetic(args.n, shape)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU; {args.n} samples of shape {shape}, "
          f"batch {args.batch_size}, {args.rounds} rounds (median)")
    for name in args.models.split(","):
        cfg = TrainConfig(model=name, norm=args.norm, epochs=1, batch_size=args.batch_size, device="cpu",
                          eval_train=0, momentum=0.9, batchnorm="exact").check()
        times: dict[str, list[float]] = {m: [] for m in MODES}
        samples_per_second(cfg, synthetic(2 * args.batch_size, shape), "importance")  # warm-up
        for _ in range(args.rounds):
            for mode in MODES:
                times[mode].append(samples_per_second(cfg, data, mode))
        plain = statistics.median(times["plain"])
        for mode in MODES:
            rate = statistics.median(times[mode])
            print(f"{name}:{args.norm:<6} {mode:<11} {rate:8.0f} samples/s   {plain / rate:5.2f}x the time of plain")


if __name__ == "__main__":
    main()
