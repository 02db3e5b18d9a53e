"""What several stages share: the train runs an analysis reads (found, or trained together), the
start of an analysis run, the claims artifact, and samples as images."""
from __future__ import annotations

import dataclasses

import numpy as np

from .. import mlflow_io
from ..config import AnalysisConfig
from ..dynamics import Dynamics, check_aligned
from .train import train_many

CLAIMS = "claims.json"
TAG_TRAIN_RUNS = "sample_importance.train_run_ids"


def train_runs(cfg: AnalysisConfig, seeds: list[int], architectures: list[dict] | None = None
               ) -> dict[str, Dynamics]:
    """The given train runs, or for each architecture (training-field overrides, e.g. {"model":
    "cnn"}; default: the configured one) and seed the finished run matching the training fields
    (trained as child runs, together, when there is none). Loaded, validated and checked to hold
    the same samples."""
    ids = cfg.run_ids()
    if not ids:
        ids = train_many([dataclasses.replace(cfg.train_config(), seed=seed, **arch)
                          for arch in architectures or [{}] for seed in seeds], cfg.parallel_models)
    mlflow_io.set_tags({TAG_TRAIN_RUNS: ",".join(ids)})
    runs = {run_id: mlflow_io.load_dynamics(run_id) for run_id in ids}
    check_aligned(runs)
    return runs


def start_analysis(cfg: AnalysisConfig, entry_point: str, description: str):
    cfg.check()
    return mlflow_io.start_run(f"{entry_point} {cfg.dataset}", entry_point,
                               tags={mlflow_io.TAG_FINGERPRINT: cfg.fingerprint()}, description=description,
                               config=cfg.to_dict())


def one_run(cfg: AnalysisConfig) -> Dynamics:
    runs = train_runs(cfg, [cfg.seed])
    return next(iter(runs.values()))


def as_images(x: np.ndarray, shape: list[int]) -> np.ndarray:
    """Flat samples (k, C*H*W) -> images (k, H, W) for grey or (k, H, W, 3) for colour."""
    c, h, w = shape
    imgs = x.reshape(len(x), c, h, w)
    return imgs[:, 0] if c == 1 else imgs.transpose(0, 2, 3, 1)


