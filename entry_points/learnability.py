"""`learnability` entry point: sample-wise learnability compared across architectures (Lee et al. 2019, Table 1 and fig. 1)."""
from __future__ import annotations

from pathlib import Path

from _cli import parse_config, run_cli

from sample_importance.config import LearnabilityConfig
from sample_importance.difficulty import run_learnability


def main(argv: list[str] | None = None) -> str:
    cfg = parse_config(LearnabilityConfig, argv, __doc__, LearnabilityConfig.field_help())
    return run_learnability(cfg, project_dir=Path(__file__).resolve().parent.parent)


if __name__ == "__main__":
    run_cli(main)
