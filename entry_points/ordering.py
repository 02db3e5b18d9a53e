"""`ordering` entry point: the batch-construction experiment (paper section 3.6) with every variant
in the model registry."""
from __future__ import annotations

from pathlib import Path

from _cli import parse_config, run_cli

from sample_importance.config import OrderingConfig
from sample_importance.orderings import run_ordering


def main(argv: list[str] | None = None) -> str:
    cfg = parse_config(OrderingConfig, argv, __doc__, OrderingConfig.field_help())
    return run_ordering(cfg, project_dir=Path(__file__).resolve().parent.parent)


if __name__ == "__main__":
    run_cli(main)
