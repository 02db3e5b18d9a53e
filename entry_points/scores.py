"""`scores` entry point: every per-sample difficulty score of one train run side by side, with label-noise detection."""
from __future__ import annotations

from pathlib import Path

from _cli import parse_config, run_cli

from sample_importance.config import ScoresConfig
from sample_importance.difficulty import run_scores


def main(argv: list[str] | None = None) -> str:
    cfg = parse_config(ScoresConfig, argv, __doc__, ScoresConfig.field_help())
    return run_scores(cfg, project_dir=Path(__file__).resolve().parent.parent)


if __name__ == "__main__":
    run_cli(main)
