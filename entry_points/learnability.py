"""`learnability` entry point: sample-wise learnability compared across architectures (Lee et al. 2019, Table 1 and fig. 1)."""
from __future__ import annotations

from _cli import entry_point, run_cli

from sample_importance.config import LearnabilityConfig
from sample_importance.difficulty import run_learnability


main = entry_point(LearnabilityConfig, __doc__, run_learnability)


if __name__ == "__main__":
    run_cli(main)
