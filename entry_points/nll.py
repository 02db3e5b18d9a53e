"""`nll` entry point: Correlation of sample importance with the loss (paper fig. 4)."""
from __future__ import annotations

from pathlib import Path

from _cli import parse_config, run_cli

from sample_importance.config import NllConfig
from sample_importance.study import run_nll


def main(argv: list[str] | None = None) -> str:
    cfg = parse_config(NllConfig, argv, __doc__, NllConfig.field_help())
    return run_nll(cfg, project_dir=Path(__file__).resolve().parent.parent)


if __name__ == "__main__":
    run_cli(main)
