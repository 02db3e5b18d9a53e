"""`main` entry point: the whole study (train, stability, decompose, nll, cluster) and its report.
Steps already run with the same configuration are reused."""
from __future__ import annotations

from pathlib import Path

from _cli import parse_config, run_cli

from sample_importance.config import StudyConfig
from sample_importance.study import run_main


def main(argv: list[str] | None = None) -> str:
    cfg = parse_config(StudyConfig, argv, __doc__, StudyConfig.field_help())
    return run_main(cfg, project_dir=Path(__file__).resolve().parent.parent)


if __name__ == "__main__":
    run_cli(main)
