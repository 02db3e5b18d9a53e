"""`cluster` entry point: k-means clusters of one class's samples by importance profile (paper figs. 5, 6)."""
from __future__ import annotations

from _cli import entry_point, run_cli

from sample_importance.config import ClusterConfig
from sample_importance.study import run_cluster


main = entry_point(ClusterConfig, __doc__, run_cluster)


if __name__ == "__main__":
    run_cli(main)
