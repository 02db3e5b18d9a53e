"""`prune` entry point: train on the fraction of samples each difficulty score keeps (hardest, easiest, random); test error against the fraction."""
from __future__ import annotations

from pathlib import Path

from _cli import parse_config, run_cli

from sample_importance.config import PruneConfig
from sample_importance.difficulty import run_prune


def main(argv: list[str] | None = None) -> str:
    cfg = parse_config(PruneConfig, argv, __doc__, PruneConfig.field_help())
    return run_prune(cfg, project_dir=Path(__file__).resolve().parent.parent)


if __name__ == "__main__":
    run_cli(main)
