"""`sweep` entry point: Optuna search over the learning rate (each trial over several seeds), tracked
in MLflow; rerun to add trials, start several to share one study."""
from __future__ import annotations

from _cli import parse_config, run_cli

from sample_importance.config import SweepConfig
from sample_importance.sweep import run_sweep


def main(argv: list[str] | None = None) -> str:
    cfg = parse_config(SweepConfig, argv, __doc__, SweepConfig.field_help())
    return run_sweep(cfg)


if __name__ == "__main__":
    run_cli(main)
