"""The `stability` stage: Spearman of importance across initialisations (paper fig. 1)."""
from __future__ import annotations

from .. import mlflow_io, plots
from ..analysis import stability
from ..config import StabilityConfig
from .common import CLAIMS, compare_once, start_analysis, train_runs


def run(cfg: StabilityConfig) -> str:
    """Fig. 1: Spearman rank correlation of alpha across initialisations, every `every` epochs."""
    with start_analysis(cfg, "stability", "Is sample importance stable across initialisations? (paper fig. 1)") as run:
        runs = train_runs(cfg, list(range(cfg.seed, cfg.seed + cfg.num_seeds)))
        compare_once(cfg, "stability", list(runs), lambda: _compare(cfg, runs))
        return run.info.run_id


def _compare(cfg: StabilityConfig, runs: dict) -> None:
    seeds = [str(d.metadata["seed"]) for d in runs.values()]
    labels = seeds if len(set(seeds)) == len(seeds) else list(runs)  # run ids when seeds repeat
    table = stability.stability_table({lab: d.alpha for lab, d in zip(labels, runs.values())}, cfg.every)
    mlflow_io.log_table(table, "stability.csv")
    for epoch, g in table.groupby("epoch"):
        mlflow_io.log_metrics({"spearman_min": g["spearman"].min(), "spearman_mean": g["spearman"].mean(),
                               "jaccard_top10_mean": g["jaccard_top"].mean()}, step=int(epoch))
    mlflow_io.log_figure(plots.stability_curves(table), "figures/stability.png")
    mlflow_io.log_dict([stability.stability_claim(table).to_dict()], CLAIMS)
