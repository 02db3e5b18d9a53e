"""`decompose` entry point: Decomposition of sample importance by epoch, layer, class and sample group (paper figs. 2, 3, 10)."""
from __future__ import annotations

from _cli import entry_point, run_cli

from sample_importance.config import DecomposeConfig
from sample_importance.study import run_decompose


main = entry_point(DecomposeConfig, __doc__, run_decompose)


if __name__ == "__main__":
    run_cli(main)
