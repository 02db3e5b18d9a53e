"""The `train` stage: one tracked training run (`runs.TrainRun`); under torchrun, data-parallel."""
from __future__ import annotations

from .. import distributed
from ..config import TrainRunConfig
from ..runs import follow_train, run_train


def run(cfg: TrainRunConfig) -> str:
    """The `train` entry point; under torchrun, data-parallel over its processes (rank 0 writes the
    one run, which reads as if one process had trained it)."""
    with distributed.process_group(cfg.device) as (rank, _):
        if rank:
            follow_train(cfg)
            return ""
        run_id = run_train(cfg)
    print(f"train run {run_id} finished")
    return run_id
