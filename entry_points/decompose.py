"""`decompose` entry point: Decomposition of sample importance by epoch, layer, class and sample group (paper figs. 2, 3, 10)."""
from __future__ import annotations

from pathlib import Path

from _cli import parse_config, run_cli

from sample_importance.config import DecomposeConfig
from sample_importance.study import run_decompose


def main(argv: list[str] | None = None) -> str:
    cfg = parse_config(DecomposeConfig, argv, __doc__, DecomposeConfig.field_help())
    return run_decompose(cfg, project_dir=Path(__file__).resolve().parent.parent)


if __name__ == "__main__":
    run_cli(main)
