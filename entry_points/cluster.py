"""`cluster` entry point: k-means clusters of one class's samples by importance profile (paper figs. 5, 6)."""
from __future__ import annotations

from pathlib import Path

from _cli import parse_config, run_cli

from sample_importance.config import ClusterConfig
from sample_importance.study import run_cluster


def main(argv: list[str] | None = None) -> str:
    cfg = parse_config(ClusterConfig, argv, __doc__, ClusterConfig.field_help())
    return run_cluster(cfg, project_dir=Path(__file__).resolve().parent.parent)


if __name__ == "__main__":
    run_cli(main)
