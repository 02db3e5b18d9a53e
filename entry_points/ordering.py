"""`ordering` entry point: the batch-construction experiment (paper section 3.6) with every variant
in the model registry."""
from __future__ import annotations

from _cli import PROJECT, entry_point, run_cli

from sample_importance.config import OrderingConfig
from sample_importance.orderings import run_ordering


main = entry_point(OrderingConfig, __doc__, lambda cfg: run_ordering(cfg, PROJECT))


if __name__ == "__main__":
    run_cli(main)
