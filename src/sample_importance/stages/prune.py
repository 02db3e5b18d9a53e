"""The `prune` stage: train on the fraction of samples each difficulty score keeps (hardest, easiest,
random); test error against the fraction kept."""
from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd

from .. import mlflow_io, plots
from ..analysis import scores as S
from ..config import ConfigError, PruneConfig, trained_config
from ..data import training_data
from ..models import model_of_run
from ..training import fit
from .common import start_analysis
from .scores import flipped_labels, scored_runs


def run(cfg: PruneConfig) -> str:
    """Data pruning: for each score, fraction and seed, train a fresh model (untracked, same settings
    as the scored run) on the hardest or the easiest samples, and on a random choice; test error
    against the fraction kept."""
    with start_analysis(cfg, "prune", "Data pruning: test error when training on the samples each score keeps") as run:
        fractions = sorted(set(cfg.fraction_list()))
        runs, table, missing = scored_runs(cfg)
        d = runs[0]
        tcfg = trained_config(d.metadata, device=cfg.device, data_dir=cfg.data_dir)
        data = training_data(tcfg)  # the scored run's samples, its label noise included
        smallest = max(1, int(round(fractions[0] * data.n_train)))
        if smallest < tcfg.batch_size:
            raise ConfigError(f"keep_fractions={fractions[0]:g} keeps {smallest} samples, fewer than the run's "
                              f"batch_size={tcfg.batch_size}: choose larger fractions.")
        absent = [s for s in cfg.score_list() if s not in table.columns]
        if absent:
            raise ConfigError(f"The run cannot give the score {absent[0]} in prune_scores: "
                              + missing.get(absent[0], f"its layers are {', '.join(d.layer_names)}") + ".")
        plan = [("all", "all", 1.0)] + [("random", "random", f) for f in fractions if f < 1]
        plan += [(score, keep, f) for score in cfg.score_list() for keep in ("hardest", "easiest")
                 for f in fractions if f < 1]
        seeds = list(range(tcfg.seed, tcfg.seed + cfg.num_seeds))
        flipped = flipped_labels(d, cfg.data_dir) if tcfg.label_noise > 0 else None
        rows = []
        for i, (score, keep, fraction) in enumerate(plan):
            for seed in seeds:
                values = table[score].to_numpy() if score in table else np.zeros(data.n_train)
                ids = S.prune_keep(values, fraction, keep, S.HARDER_IS_LARGER.get(score, True), seed)
                scfg = dataclasses.replace(tcfg, seed=seed)
                final = fit(model_of_run(scfg, data, cfg.model), data.keep(ids), scfg, track=False).history[-1]
                rows.append({"score": score, "keep": keep, "fraction": fraction, "seed": seed, "n_kept": len(ids),
                             "test_error": final["test_error"], "test_loss": final["test_loss"]}
                            | ({} if flipped is None else {"flipped_kept": float(flipped[ids].mean())}))
                print(f"prune {i + 1}/{len(plan)} {score:<16} keep {keep:<8} {fraction:4.0%} seed {seed}: "
                      f"test error {final['test_error']:.4f}", flush=True)
        result = pd.DataFrame(rows)
        mlflow_io.log_table(result, "prune.csv")
        summary = result.groupby(["score", "keep", "fraction"], as_index=False)["test_error"].agg(["mean", "std"])
        mlflow_io.log_table(summary, "prune_summary.csv")
        for r in summary.itertuples():
            if r.score != "all":
                mlflow_io.log_metrics({f"test_error_{r.score}_{r.keep}": r.mean}, step=int(round(r.fraction * 100)))
        mlflow_io.log_metrics({"test_error_all": float(summary.loc[summary.score == "all", "mean"].item())}, step=100)
        mlflow_io.log_figure(plots.pruning_curves(summary), "figures/pruning.png")
        return run.info.run_id
