"""`influence` entry point: influence of each training sample on the trained model (paper section 4),
fixed-point and unrolled; `mode=validate` checks it against retraining, `mode=breakdown` maps where
linear response breaks down."""
from __future__ import annotations

from pathlib import Path

from _cli import parse_config, run_cli

from sample_importance.config import InfluenceConfig
from sample_importance.influence import run_influence


def main(argv: list[str] | None = None) -> str:
    cfg = parse_config(InfluenceConfig, argv, __doc__, InfluenceConfig.field_help())
    return run_influence(cfg, project_dir=Path(__file__).resolve().parent.parent)


if __name__ == "__main__":
    run_cli(main)
