"""`stability` entry point: Stability of sample importance across initialisations (paper fig. 1)."""
from __future__ import annotations

from pathlib import Path

from _cli import parse_config, run_cli

from sample_importance.config import StabilityConfig
from sample_importance.study import run_stability


def main(argv: list[str] | None = None) -> str:
    cfg = parse_config(StabilityConfig, argv, __doc__, StabilityConfig.field_help())
    return run_stability(cfg, project_dir=Path(__file__).resolve().parent.parent)


if __name__ == "__main__":
    run_cli(main)
