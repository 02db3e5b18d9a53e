"""`explore` entry point: one self-contained explorer.html of a train run (data map, every sample's scores, curves, image)."""
from __future__ import annotations

from _cli import entry_point, run_cli

from sample_importance.config import ExploreConfig
from sample_importance.explorer.stage import run_explore


main = entry_point(ExploreConfig, __doc__, run_explore)


if __name__ == "__main__":
    run_cli(main)
