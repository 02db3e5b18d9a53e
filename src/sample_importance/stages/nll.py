"""The `nll` stage: correlation of importance with the loss and its trend (paper fig. 4)."""
from __future__ import annotations

import numpy as np
import pandas as pd

from .. import mlflow_io, plots
from ..analysis import nll
from ..config import NllConfig
from .common import CLAIMS, one_run, start_analysis


def run(cfg: NllConfig) -> str:
    """Fig. 4: correlation between in-epoch NLL and importance, and its trend over training."""
    with start_analysis(cfg, "nll", "Is a sample's importance related to its loss? (paper fig. 4)") as run:
        d = one_run(cfg)
        alpha = d.alpha
        spear, pear = nll.nll_importance_correlation(np.asarray(d.loss), alpha)
        epochs = np.arange(1, len(spear) + 1)
        mlflow_io.log_table(pd.DataFrame({"epoch": epochs, "spearman": spear, "pearson": pear}),
                            "nll_correlation.csv")
        for e, s, p in zip(epochs, spear, pear):
            mlflow_io.log_metrics({"nll_spearman": float(s), "nll_pearson": float(p)}, step=int(e))
        mlflow_io.log_metrics({"nll_spearman_trend": nll.trend(spear), "nll_pearson_trend": nll.trend(pear)},
                              step=len(epochs))
        mlflow_io.log_figure(plots.nll_correlation(spear, pear, np.asarray(d.loss[-1]), d.total_importance),
                             "figures/nll_correlation.png")
        mlflow_io.log_dict([nll.nll_claim(spear).to_dict()], CLAIMS)
        return run.info.run_id
