"""`main` entry point: the whole study (train, stability, decompose, nll, cluster) and its report.
Steps already run with the same configuration are reused."""
from __future__ import annotations

from _cli import PROJECT, entry_point, run_cli

from sample_importance.config import StudyConfig
from sample_importance.study import run_main


main = entry_point(StudyConfig, __doc__, lambda cfg: run_main(cfg, PROJECT))


if __name__ == "__main__":
    run_cli(main)
