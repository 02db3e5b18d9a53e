"""The `scores` stage: every per-sample difficulty score of a run side by side (`analysis.scores`),
with label-noise detection when the run flipped labels."""
from __future__ import annotations

import numpy as np
import pandas as pd

from .. import mlflow_io, plots
from ..analysis import scores as S
from ..config import RunsConfig, ScoresConfig
from ..data import load_dataset, with_target
from ..dynamics import Dynamics
from .common import start_analysis, train_runs
from .explore import log_explorer_of_active_run


def scored_runs(cfg: RunsConfig) -> tuple[list[Dynamics], pd.DataFrame, dict[str, str]]:
    """The runs (the first is scored; EL2N and GraNd average over all), their score table and the
    scores they cannot give with the reason, which is printed and logged (score_definitions.json)."""
    train = cfg.train_config()
    runs = list(train_runs(cfg, [train.seed]).values())
    table, missing = S.score_table(runs, train.early_epoch)
    for name, reason in missing.items():
        print(f"score {name} cannot be given: {reason}", flush=True)
    mlflow_io.log_dict({name: {"definition": text, "harder_is_larger": harder, "available": name in table,
                               **({"why_not": missing[name]} if name in missing else {})}
                        for name, (harder, text) in {**S.SCORES, **S.ATTRIBUTION_SCORES}.items()
                        if name in S.SCORES or name in table}, "score_definitions.json")  # attribution: where recorded
    return runs, table, missing


def flipped_labels(d: Dynamics, data_dir: str) -> np.ndarray:
    """Which training labels of the run differ from the dataset's (the run's label noise)."""
    config = d.metadata.get("config") or {}
    clean = with_target(load_dataset(d.metadata["dataset"], data_dir, d.metadata["subset"]),
                        config.get("attribute_to", "none"), config.get("target_size", 0)).y_train
    return np.asarray(d.label) != clean


def run(cfg: ScoresConfig) -> str:
    with start_analysis(cfg, "scores", "Every per-sample difficulty score of one run, side by side") as run:
        runs, table, _ = scored_runs(cfg)
        d = runs[0]
        columns = [c for c in (*S.SCORES, *S.ATTRIBUTION_SCORES) if c in table]
        noise = float(d.metadata["config"].get("label_noise", 0.0))
        flipped = flipped_labels(d, cfg.train.data_dir) if noise > 0 else None
        if flipped is not None:
            table["flipped"] = flipped
        mlflow_io.log_table(table, "scores.csv")
        rho = S.rank_correlations(table, columns + [c for c in table if c.startswith("importance_")])
        mlflow_io.log_table(rho.reset_index(names="score"), "rank_correlations.csv")
        mlflow_io.log_figure(plots.correlation_matrix(rho, "Spearman rank correlation between scores"),
                             "figures/rank_correlations.png")
        kind = "" if "confidence" in table else "_inbatch"  # the in-batch map for runs without the evaluation
        mlflow_io.log_figure(plots.data_map(table[f"confidence{kind}"].to_numpy(), table[f"variability{kind}"].to_numpy(),
                                            table[f"correctness{kind}"].to_numpy(), flipped), f"figures/data_map{kind}.png")
        if flipped is not None:
            found = S.detection(table, flipped, columns)
            mlflow_io.log_table(found, "label_noise_detection.csv")
            found_columns = [c for c in found if c.startswith("found_at_")]
            mlflow_io.log_metrics({f"{metric}_{r['score']}": r[metric] for r in found.to_dict("records")
                                   for metric in ("auroc", "precision_at_k", *found_columns)}, step=0)
            for r in found.to_dict("records"):
                print(f"label noise {noise:g}: {r['score']:<19} AUROC {r['auroc']:.3f}  precision@{r['k']} "
                      f"{r['precision_at_k']:.3f}  found after inspecting "
                      + ", ".join(f"{c.removeprefix('found_at_')}%: {r[c]:.2f}" for c in found_columns), flush=True)
        log_explorer_of_active_run(cfg.train.data_dir, cfg.train.early_epoch, model=cfg.train.model)
        return run.info.run_id
