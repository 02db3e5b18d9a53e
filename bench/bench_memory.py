"""Peak host memory of one tracked `train` run against the size of the `dynamics/` it writes.

Runs the `train` entry point's code in this process (a private MLflow store in a temporary folder)
and reads the process's peak resident memory (ru_maxrss). The baseline is this process after its
imports and a one-epoch warm-up run of the same configuration; the training data (the input, read by any training run, tracked or not) is reported
separately. Target (issue #7): peak - baseline - data < 2 x dynamics size (peaks sampled every 20 ms).

    python bench/bench_memory.py                                  # paper size: Fashion-MNIST, 50,000 x 50 epochs
    python bench/bench_memory.py --dataset digits --subset 0      # quick
"""
from __future__ import annotations

import argparse
import os
import tempfile
import threading
import time
from pathlib import Path

import mlflow

from sample_importance.config import TrainRunConfig
from sample_importance.data import training_data
from sample_importance.runs import run_train


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


def anon_mb() -> float:
    """Resident anonymous memory (what the process allocated; file-backed pages excluded: the
    dynamics files are written through memory maps, whose pages the kernel may drop once flushed)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("RssAnon:")) / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default="fashion-mnist")
    ap.add_argument("--subset", type=int, default=50_000)
    ap.add_argument("--epochs", type=int, default=50)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    cfg = TrainRunConfig(dataset=args.dataset, subset=args.subset, epochs=args.epochs, device=args.device)
    with tempfile.TemporaryDirectory() as tmp:
        os.chdir(tmp)
        mlflow.set_tracking_uri(f"sqlite:///{tmp}/mlflow.db")
        # A one-epoch run of the same configuration first, so that lazy imports and one-off
        # allocations (thread pools, allocator caches, MLflow, matplotlib, model export) count in
        # the baseline: what is left is what a run adds to a warm process.
        run_train(TrainRunConfig(**{**cfg.to_dict(), "epochs": 1}), quiet=True)
        baseline, baseline_anon = rss_mb(), anon_mb()
        data = training_data(cfg)
        data_mb = sum(a.nbytes for a in (data.x_train, data.y_train, data.x_test, data.y_test)) / 2 ** 20
        del data
        samples, done = [], threading.Event()

        def sample() -> None:  # resident memory every 20 ms, to split the peak by phase
            while not done.is_set():
                samples.append((rss_mb(), anon_mb()))
                time.sleep(0.02)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        marks = {}
        def mark(epoch: int, metrics: dict) -> None:
            marks.setdefault("first", len(samples))
            marks["trained"] = len(samples)

        run_id = run_train(cfg, quiet=True, epoch_callback=mark)
        done.set()
        sampler.join()
        phases = {"loading and the first epoch": samples[:marks["first"]],
                  "epochs 2 to the last": samples[marks["first"]:marks["trained"]],
                  "whole run (with figures and model export)": samples}
        folder = Path(mlflow.get_run(run_id).info.artifact_uri.removeprefix("file://")) / "dynamics"
        dyn_mb = sum(p.stat().st_size for p in folder.iterdir()) / 2 ** 20
    print(f"{args.dataset}, {cfg.subset or 'all'} samples, {args.epochs} epochs, device {args.device}")
    print(f"process after imports and warm-up {baseline:,.0f} MB; training data {data_mb:,.0f} MB; dynamics/ on disk "
          f"{dyn_mb:,.0f} MB")
    for phase, rows in phases.items():
        top, top_anon = max(r[0] for r in rows), max(r[1] for r in rows)
        extra, extra_anon = top - baseline - data_mb, top_anon - baseline_anon - data_mb
        print(f"peak of {phase}: resident {top:,.0f} MB, {extra:,.0f} MB above baseline and data = "
              f"{extra / dyn_mb:.2f}x the dynamics; anonymous only: {extra_anon:,.0f} MB = "
              f"{extra_anon / dyn_mb:.2f}x (target < 2)")


if __name__ == "__main__":
    main()
