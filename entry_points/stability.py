"""`stability` entry point: Stability of sample importance across initialisations (paper fig. 1)."""
from __future__ import annotations

from _cli import entry_point, run_cli

from sample_importance.config import StabilityConfig
from sample_importance.study import run_stability


main = entry_point(StabilityConfig, __doc__, run_stability)


if __name__ == "__main__":
    run_cli(main)
