"""`train` entry point: SGD on one dataset with per-sample per-layer importance tracking."""
from __future__ import annotations

from _cli import entry_point, run_cli

from sample_importance.config import TrainRunConfig
from sample_importance.tasks import run_train


def _train(cfg: TrainRunConfig) -> str:
    run_id = run_train(cfg)
    print(f"train run {run_id} finished")
    return run_id


main = entry_point(TrainRunConfig, __doc__, _train)


if __name__ == "__main__":
    run_cli(main)
