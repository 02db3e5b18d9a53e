"""What `target_every` > 1 costs in fidelity and saves in time: the project's loop (`training.fit`) on
digits with attribute_to=test, the target gradient taken every step (exact first order) or every k-th
step (the steps between use the last one), from the same initialisation and order.

Reported per k: seconds per epoch; the Spearman and Pearson correlation of each sample's total
contribution with the exact one (k = 1); the relative error of the run's summed contribution; and
the share of the target loss's actual change the first-order prediction explains, in the first
epoch and over the whole run (late epochs change the loss little, so their own ratios say little).

    python bench/bench_target_every.py               # 3x512 MLP, 20 epochs: about 2 minutes on 2 cores
    python bench/bench_target_every.py --lr 0.01     # a smaller step: the first order holds over the run
    python bench/bench_target_every.py --quick
"""
from __future__ import annotations

import argparse
import dataclasses
import platform
import time

import numpy as np
from scipy.stats import pearsonr, spearmanr

from sample_importance.config import TrainConfig
from sample_importance.data import training_data
from sample_importance.models import model_for
from sample_importance.training import fit


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--every", default="1,2,5,20")
    ap.add_argument("--lr", type=float, default=0.1)
    args = ap.parse_args()
    base = TrainConfig(dataset="digits", epochs=3 if args.quick else 20, width=64 if args.quick else 512,
                       lr=args.lr, attribute_to="test", target_size=297, device="cpu").check()
    data = training_data(base)
    print(f"digits, {data.n_train} samples, target: all {len(data.y_target)} test samples, {base.depth}x{base.width} MLP, "
          f"lr {base.lr}, {base.epochs} epochs; {platform.processor() or platform.machine()}", flush=True)
    print("\n| target_every | s/epoch | Spearman vs exact | Pearson vs exact | summed contribution, rel. error "
          "| first order / actual change, epoch 1 | the same, whole run |\n|---|---|---|---|---|---|---|")
    exact = None
    for k in (int(v) for v in args.every.split(",")):
        cfg = dataclasses.replace(base, target_every=k)
        records = []
        t = time.perf_counter()
        fit(model_for(cfg, data), data, cfg, on_epoch=records.append)
        seconds = (time.perf_counter() - t) / cfg.epochs
        total = np.sum([r.contribution.astype(np.float64).sum(1) for r in records], axis=0)  # (n,)
        first = sum(r.metrics["target_first_order"] for r in records)
        change = sum(r.metrics["target_change"] for r in records)
        epoch_one = records[0].metrics["target_explained"]
        if exact is None:
            exact = total
        print(f"| {k} | {seconds:.2f} | {spearmanr(total, exact).statistic:.4f} | {pearsonr(total, exact).statistic:.4f} "
              f"| {abs(total.sum() - exact.sum()) / abs(exact.sum()):.2e} | {epoch_one:.3f} | {first / change:.3f} |",
              flush=True)


if __name__ == "__main__":
    main()
