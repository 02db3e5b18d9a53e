"""`train` entry point: SGD on one dataset with per-sample per-layer importance tracking."""
from __future__ import annotations

from _cli import parse_config, run_cli

from sample_importance.config import TrainRunConfig
from sample_importance.tasks import run_train


def main(argv: list[str] | None = None) -> str:
    cfg = parse_config(TrainRunConfig, argv, __doc__, TrainRunConfig.field_help())
    run_id = run_train(cfg)
    print(f"train run {run_id} finished")
    return run_id


if __name__ == "__main__":
    run_cli(main)
