"""`prune` entry point: train on the fraction of samples each difficulty score keeps (hardest, easiest, random); test error against the fraction."""
from __future__ import annotations

from _cli import entry_point, run_cli

from sample_importance.config import PruneConfig
from sample_importance.difficulty import run_prune


main = entry_point(PruneConfig, __doc__, run_prune)


if __name__ == "__main__":
    run_cli(main)
