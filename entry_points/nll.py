"""`nll` entry point: Correlation of sample importance with the loss (paper fig. 4)."""
from __future__ import annotations

from _cli import entry_point, run_cli

from sample_importance.config import NllConfig
from sample_importance.study import run_nll


main = entry_point(NllConfig, __doc__, run_nll)


if __name__ == "__main__":
    run_cli(main)
