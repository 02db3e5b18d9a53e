"""Mislabel detection on Fashion-MNIST with 10% of the training labels flipped: the share of the flipped
samples found after inspecting the 5, 10 and 20% most suspicious samples, by every score this project
computes, through its own entry points (`train` with label_noise and attribute_to, `scores`, and
`influence` with the self target), in a private tracking store.

Settings: the first 10,000 Fashion-MNIST training images (Debian's dataset-fashion-mnist, or a
torchvision download to --data_dir), labels flipped with seed 0 (`data.with_label_noise`), plain SGD
(lr 0.1, batch 100, weight decay 1e-5) for 20 epochs; logistic regression (depth 0) and a
784-256-256-10 MLP; in-run attribution to the first 1,000 test images. Self-influence needs the
explicit Hessian (7,850 parameters for logistic regression; the MLP's 270,000 are out of reach).
kronfluence's reference point (CIFAR-10, ResNet-9, 10% flipped, EK-FAC self-influence): about 80%
found after inspecting 10%, 97% after 20% (its examples/cifar README).

    python bench/bench_mislabel.py               # about 10 minutes on 2 cores
    python bench/bench_mislabel.py --quick       # 2,000 samples, 3 epochs: checks every route
"""
from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time

import mlflow
import pandas as pd

from sample_importance import config as C
from sample_importance.analysis import scores as S
from sample_importance.stages import STAGES

MODELS = {"logistic regression": dict(depth=0, width=1), "MLP 784-256-256-10": dict(depth=2, width=256)}


def artifact(run_id: str, name: str) -> pd.DataFrame:
    return pd.read_csv(mlflow.artifacts.download_artifacts(f"runs:/{run_id}/{name}"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--data_dir", default=C.DEFAULT_DATA_DIR)
    args = ap.parse_args()
    subset, epochs = (2000, 3) if args.quick else (10_000, 20)
    store = tempfile.mkdtemp(prefix="mislabel-")
    os.chdir(store)
    mlflow.set_tracking_uri(f"sqlite:///{store}/mlflow.db")
    print(f"Fashion-MNIST, first {subset:,} training images, 10% flipped, {epochs} epochs; "
          f"{platform.processor() or platform.machine()}; store {store}", flush=True)
    rows = []
    for name, shape in MODELS.items():
        common = dict(dataset="fashion-mnist", data_dir=args.data_dir, subset=subset, epochs=epochs, lr=0.1,
                      batch_size=100, label_noise=0.1, attribute_to="test", target_size=1000, device="cpu", **shape)
        t = time.perf_counter()
        run_id = STAGES["train"].run(C.TrainRunConfig(**common).check())
        train = C.TrainConfig(**common)
        scores_id = STAGES["scores"].run(C.ScoresConfig(train=train, train_run_ids=run_id).check())
        found = artifact(scores_id, "label_noise_detection.csv")
        table = artifact(scores_id, "scores.csv")
        if shape["depth"] == 0:  # self-influence: -(1/n) g_i^T (H + lambda I)^-1 g_i, more negative = more suspicious
            influence_id = STAGES["influence"].run(C.InfluenceConfig(
                train=train, train_run_ids=run_id, targets="self", hessian="solver=direct max_direct=8000",
                variants="per_layer=0 unrolled=0").check())
            inf = artifact(influence_id, "influence.csv").set_index("sample_id").loc[table["sample_id"]]
            table["self_influence"] = inf["influence_self"].to_numpy()
            S.HARDER_IS_LARGER["self_influence"] = False
            found = pd.concat([found, S.detection(table, table["flipped"].to_numpy(), ["self_influence"])])
        print(f"{name}: {time.perf_counter() - t:.0f} s", flush=True)
        for r in found.to_dict("records"):
            rows.append({"model": name, **r})
    out = pd.DataFrame(rows)
    columns = [c for c in out if c.startswith("found_at_")]
    print("\n| model | score | " + " | ".join(f"found after {c.removeprefix('found_at_')}%" for c in columns)
          + " | AUROC |\n|---|---|" + "---|" * (len(columns) + 1))
    for r in out.sort_values(["model", "found_at_10"], ascending=[True, False]).to_dict("records"):
        print(f"| {r['model']} | {r['score']} | " + " | ".join(f"{r[c]:.2f}" for c in columns) + f" | {r['auroc']:.3f} |")


if __name__ == "__main__":
    main()
