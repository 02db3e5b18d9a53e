"""`sweep` entry point: Optuna search over the learning rate (each trial over several seeds), tracked
in MLflow; rerun to add trials, start several to share one study."""
from __future__ import annotations

from _cli import entry_point, run_cli

from sample_importance.config import SweepConfig
from sample_importance.sweep import run_sweep


main = entry_point(SweepConfig, __doc__, run_sweep)


if __name__ == "__main__":
    run_cli(main)
