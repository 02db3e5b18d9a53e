"""The `decompose` stage: importance by epoch, layer, class, parameter and sample group (paper figs. 2, 3, 10)."""
from __future__ import annotations

import numpy as np
import pandas as pd

from .. import mlflow_io, plots
from ..analysis import decomposition
from ..config import DecomposeConfig
from .common import CLAIMS, one_run, start_analysis


def run(cfg: DecomposeConfig) -> str:
    """Figs. 2, 3, 10: importance by epoch, layer, class, parameter and group of samples."""
    with start_analysis(cfg, "decompose", "Which samples, classes and layers carry the importance, and when? "
                                  "(paper figs. 2, 3, 10)") as run:
        d = one_run(cfg)
        names = d.layer_names
        counts = [d.metadata["parameter_counts"][name] for name in names]  # metadata.json sorts its keys
        totals = decomposition.layer_totals(d.importance)  # (E, L)
        per_param = decomposition.per_parameter(totals, counts)
        tau = d.total_importance
        per_class = decomposition.class_contribution(d.importance, d.label, d.metadata["num_classes"])
        shares = decomposition.group_shares(d.importance, tau)  # (E, L, 3)
        top20 = decomposition.top_share(d.importance, tau, 0.2)
        peaks = decomposition.peak_epochs(totals)
        epochs = np.arange(1, len(totals) + 1)
        mlflow_io.log_table(pd.DataFrame({"epoch": epochs, "importance_total": totals.sum(1),
                                          **{f"importance_{n}": totals[:, k] for k, n in enumerate(names)},
                                          **{f"per_parameter_{n}": per_param[:, k] for k, n in enumerate(names)}}),
                            "layer_totals.csv")
        mlflow_io.log_table(pd.DataFrame([{"epoch": e + 1, "class": c, "layer": n, "importance": per_class[e, c, k]}
                                          for e in range(len(epochs)) for c in range(per_class.shape[1])
                                          for k, n in enumerate(names)]), "class_contribution.csv")
        mlflow_io.log_table(pd.DataFrame([{"epoch": e + 1, "layer": n, "top10": shares[e, k, 0],
                                           "top10_20": shares[e, k, 1], "other80": shares[e, k, 2]}
                                          for e in range(len(epochs)) for k, n in enumerate(names)]),
                            "group_shares.csv")
        mlflow_io.log_table(pd.DataFrame({"sample_id": d.sample_id, "label": d.label, "total_importance": tau}),
                            "total_importance.csv")
        mlflow_io.log_metrics({**{f"top20_share_{n}": float(top20[k]) for k, n in enumerate(names)},
                               **{f"peak_epoch_{n}": int(peaks[k]) for k, n in enumerate(names)}}, step=len(epochs))
        mlflow_io.log_figure(plots.layer_importance(totals, names, counts), "figures/layer_importance.png")
        mlflow_io.log_figure(plots.class_contribution(per_class, names), "figures/class_contribution.png")
        mlflow_io.log_figure(plots.group_shares(shares, names), "figures/group_shares.png")
        mlflow_io.log_figure(plots.total_importance_histogram(tau), "figures/total_importance_hist.png")
        mlflow_io.log_dict([decomposition.per_parameter_claim(totals, counts, names).to_dict(),
                            decomposition.top_share_claim(top20, names).to_dict()], CLAIMS)
        return run.info.run_id
