"""What several stages share: the train runs an analysis reads (found, trained together, or shared
with other workers), the start of an analysis run, its comparison done by one worker, the claims
artifact, and samples as images."""
from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

from .. import mlflow_io, workers
from ..config import RunsConfig, SharedRunsConfig, TrainConfig, fingerprint_of
from ..dynamics import Dynamics, check_aligned
from ..runs import get_or_train

CLAIMS = "claims.json"
TAG_TRAIN_RUNS = "sample_importance.train_run_ids"
TAG_AGGREGATED_IN = "sample_importance.aggregated_in"  # on a worker's run: the run that holds the results


def train_runs(cfg: RunsConfig, seeds: list[int], architectures: list[dict] | None = None
               ) -> dict[str, Dynamics]:
    """The given train runs, or for each architecture (training-field overrides, e.g. {"model":
    "cnn"}; default: the configured one) and seed the finished run matching the training fields
    (trained as child runs, together, when there is none). Loaded, validated and checked to hold
    the same samples."""
    ids = cfg.run_ids()
    if not ids:
        ids = get_or_train([dataclasses.replace(cfg.train_config(), seed=seed, **arch)
                            for arch in architectures or [{}] for seed in seeds], **how_to_train(cfg))
    mlflow_io.set_tags({TAG_TRAIN_RUNS: ",".join(ids)})
    runs = {run_id: mlflow_io.load_dynamics(run_id) for run_id in ids}
    check_aligned(runs)
    return runs


def how_to_train(cfg) -> dict:
    """`get_or_train`'s options from a stage's configuration: models per loop, and the workers'
    storage where the stage shares its runs (`SharedRunsConfig.storage`)."""
    shared = isinstance(cfg, SharedRunsConfig) and cfg.storage
    return {"parallel_models": cfg.train_config().parallel_models,
            **({"storage": cfg.storage, "heartbeat": cfg.heartbeat} if shared else {})}


def compare_once(cfg: TrainConfig, entry_point: str, run_ids: list[str], compare: Callable[[], None]) -> bool:
    """Run `compare` (the stage's comparison of its train runs, logged to the active run) here, or,
    when cfg has a `storage`, in exactly one of the workers of the same command: the first to find
    every run finished (`workers.share`; another worker takes it over if that one dies). True where it
    ran; a worker whose run holds no results tags it with the run that does and renames its entry
    point `<entry_point>-worker` (so it is never reused as a finished `<entry_point>` run)."""
    if not (isinstance(cfg, SharedRunsConfig) and cfg.storage):
        compare()
        return True
    me = mlflow_io.active_run_id()
    name = f"{entry_point}-{fingerprint_of([cfg.fingerprint(), *run_ids])}"

    def work(_: int, record_run: Callable[[str], None]) -> None:
        record_run(me)
        compare()

    if workers.share(name, cfg.storage, cfg.heartbeat, 1, work):
        return True
    holder = workers.complete_runs(name, cfg.storage, cfg.heartbeat).get(0, "")
    mlflow_io.set_tags({mlflow_io.TAG_ENTRY_POINT: f"{entry_point}-worker", TAG_AGGREGATED_IN: holder})
    print(f"this worker's runs are done; the comparison is in run {holder}", flush=True)
    return False


def start_analysis(cfg: RunsConfig, entry_point: str, description: str):
    cfg.check()
    return mlflow_io.start_run(f"{entry_point} {cfg.train_config().dataset}", entry_point,
                               tags={mlflow_io.TAG_FINGERPRINT: cfg.fingerprint()}, description=description,
                               config=cfg.to_dict())


def one_run(cfg: RunsConfig) -> Dynamics:
    runs = train_runs(cfg, [cfg.train_config().seed])
    return next(iter(runs.values()))


def as_images(x: np.ndarray, shape: list[int]) -> np.ndarray:
    """Flat samples (k, C*H*W) -> images (k, H, W) for grey or (k, H, W, 3) for colour."""
    c, h, w = shape
    imgs = x.reshape(len(x), c, h, w)
    return imgs[:, 0] if c == 1 else imgs.transpose(0, 2, 3, 1)


