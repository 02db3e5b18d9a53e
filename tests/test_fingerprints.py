"""Run fingerprints are how a tracking store's finished runs are found and reused: they must not
change when the code is reorganised or options are added. Pinned values computed with the code of
commit 5b2a1cd (before the model registry and the stage reorganisation)."""
from __future__ import annotations

import pytest

from sample_importance import config as C

PINNED = {
    "train_default": (C.TrainConfig(), "f9a2bbfce6b574cd"),
    "train_fmnist_cnn": (C.TrainConfig(dataset="fashion-mnist", model="cnn", epochs=20, seed=3), "0a16a69e02e1d577"),
    "train_noisy": (C.TrainConfig(label_noise=0.1, width=64, depth=1, lr=0.05), "35245c5907290620"),
    "trainrun_ordering": (C.TrainRunConfig(ordering="nlo", reference_run_id="abc123"), "8333e783af36a270"),
    "stability": (C.StabilityConfig(num_seeds=3), "fbdc4eabe67bfc00"),
    "ordering": (C.OrderingConfig(num_seeds=2), "494c107f03698d52"),
    "learnability": (C.LearnabilityConfig(), "ad7b423daae85b2b"),
    "scores_runs": (C.ScoresConfig(train_run_ids="r1,r2"), "6b08e2385a3a9436"),
    "sweep": (C.SweepConfig(), "b6a74d39ea215a24"),
    "influence": (C.InfluenceConfig(), "6859f625dd8daae3"),
}


@pytest.mark.parametrize("name", PINNED)
def test_fingerprint_is_unchanged(name):
    cfg, want = PINNED[name]
    assert cfg.fingerprint() == want


def test_new_options_at_their_defaults_keep_the_fingerprint_and_change_it_otherwise():
    base = C.TrainConfig()
    for change in ({"momentum": 0.9}, {"track": "outputs"}, {"model": "resnet20"},
                   {"model": "resnet20", "norm": "batch", "track": "outputs"}, {"model": "vgg16", "channels": 8}):
        assert C.TrainConfig(**change).fingerprint() != base.fingerprint(), change
    assert C.TrainConfig(model="resnet20", norm="group").fingerprint() == C.TrainConfig(model="resnet20").fingerprint()
