"""Seeded tiny training runs whose importance tests/test_loop_pins.py pins."""
from __future__ import annotations

import numpy as np

from conftest import tiny_dataset
from sample_importance.config import TrainConfig
from sample_importance.data import Dataset
from sample_importance.models import build_model, model_for
from sample_importance.training import fit, fit_many


def run_mlp():
    data = tiny_dataset(n=40)
    cfg = TrainConfig(depth=2, width=16, lr=0.3, batch_size=10, epochs=2, weight_decay=1e-3, seed=1, device="cpu")
    model = build_model(data.x_train.shape[1], data.num_classes, 2, 16, 1)
    recs = []
    fit(model, data, cfg, on_epoch=recs.append)
    return recs[-1].importance[:4]


def run_cnn():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 3 * 6 * 10)).astype(np.float32); y = rng.integers(0, 5, size=40)
    data = Dataset("tiny-images", x[:30], y[:30], x[30:], y[30:], (3, 6, 10), num_classes=5)
    cfg = TrainConfig(model="cnn", lr=0.2, batch_size=7, epochs=2, weight_decay=1e-3, seed=2, device="cpu")
    model = model_for(cfg, data)
    recs = []
    fit(model, data, cfg, on_epoch=recs.append)
    return recs[-1].importance[:4]


def run_stacked():
    data = tiny_dataset(n=40)
    cfgs = [TrainConfig(depth=2, width=16, lr=lr, batch_size=10, epochs=2, seed=s, device="cpu") for lr, s in ((0.3, 1), (0.1, 2))]
    models = [build_model(data.x_train.shape[1], data.num_classes, 2, 16, c.seed) for c in cfgs]
    recs = {}
    fit_many(models, [data, data], cfgs, on_epoch=lambda m, r: recs.__setitem__(m, r))
    return np.stack([recs[0].importance[:4], recs[1].importance[:4]])

