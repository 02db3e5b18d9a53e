"""`scores` entry point: every per-sample difficulty score of one train run side by side, with label-noise detection."""
from __future__ import annotations

from _cli import entry_point, run_cli

from sample_importance.config import ScoresConfig
from sample_importance.difficulty import run_scores


main = entry_point(ScoresConfig, __doc__, run_scores)


if __name__ == "__main__":
    run_cli(main)
