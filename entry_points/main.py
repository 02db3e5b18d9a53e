"""`main` entry point: the study. For now: the tracked `train` run on the chosen dataset (reused when
a finished run with the same configuration exists), as a child of one parent run."""
from __future__ import annotations

from pathlib import Path

from _cli import parse_config, run_cli

from sample_importance.config import TrainConfig
from sample_importance.tasks import run_main


def main(argv: list[str] | None = None) -> None:
    cfg = parse_config(TrainConfig, argv, __doc__, TrainConfig.field_help())
    run_main(cfg, project_dir=Path(__file__).resolve().parent.parent)


if __name__ == "__main__":
    run_cli(main)
