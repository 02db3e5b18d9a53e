"""`influence` entry point: influence of each training sample on the trained model (paper section 4),
fixed-point and unrolled; `mode=validate` checks it against retraining, `mode=breakdown` maps where
linear response breaks down."""
from __future__ import annotations

from _cli import entry_point, run_cli

from sample_importance.config import InfluenceConfig
from sample_importance.influence import run_influence


main = entry_point(InfluenceConfig, __doc__, run_influence)


if __name__ == "__main__":
    run_cli(main)
