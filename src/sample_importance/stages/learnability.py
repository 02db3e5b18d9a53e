"""The `learnability` stage: sample-wise learnability compared across architectures (Lee et al. 2019,
Table 1 and fig. 1)."""
from __future__ import annotations

import itertools

import numpy as np
import pandas as pd

from .. import mlflow_io, plots
from ..analysis import scores as S
from ..config import ConfigError, LearnabilityConfig, architecture_of
from ..data import load_dataset
from ..dynamics import Dynamics, DynamicsError
from .common import as_images, compare_once, start_analysis, train_runs
from .explore import log_explorer_of_active_run


def run(cfg: LearnabilityConfig) -> str:
    """Train (or read) num_seeds runs of each architecture, then Table 1 and fig. 1 of Lee et al."""
    with start_analysis(cfg, "learnability", "Sample-wise learnability across architectures (Lee et al. 2019)") as run:
        # Refuses runs on different samples (dataset, subset, sample ids, epochs).
        runs = train_runs(cfg, list(range(cfg.seed, cfg.seed + cfg.num_seeds)),
                          cfg.architecture_list())
        compare_once(cfg, "learnability", list(runs), lambda: _compare(cfg, runs))
        return run.info.run_id


def _compare(cfg: LearnabilityConfig, runs: dict[str, Dynamics]) -> None:
    """Table 1 and fig. 1 of Lee et al. from the runs, grouped by architecture."""
    groups: dict[str, list[Dynamics]] = {}
    for d in runs.values():
        groups.setdefault(architecture_of(d.metadata["config"]), []).append(d)
    if len(groups) < 2:
        raise ConfigError(f"All runs are of one architecture ({next(iter(groups))}): learnability compares at "
                          "least two; pass runs of different architectures.")
    first = next(iter(runs.values()))
    lacking = [run_id for run_id, d in runs.items() if not d.has_eval]
    if lacking:
        raise DynamicsError(f"Run {lacking[0]} has no end-of-epoch evaluation (dynamics schema "
                            f"{runs[lacking[0]].metadata.get('schema_version')} or eval_train=0), so its learnability "
                            "(Lee et al. eq. 1: p(true label) under the model after each epoch) cannot be given: "
                            "re-train it with eval_train=1, or leave train_run_ids empty.")
    L = {arch: S.learnability([np.asarray(d.eval_p_true) for d in ds]) for arch, ds in groups.items()}
    R = {arch: S.learnability_rank(v) for arch, v in L.items()}
    table = pd.DataFrame({"sample_id": first.sample_id, "label": first.label,
                          **{f"learnability_{a}": v for a, v in L.items()},
                          **{f"rank_{a}": v for a, v in R.items()}})
    mlflow_io.log_table(table, "learnability.csv")
    pairs = []
    for a, b in itertools.combinations(L, 2):
        pairs.append({"model_a": a, "model_b": b, "pearson_learnability": float(np.corrcoef(L[a], L[b])[0, 1]),
                      "spearman_rank": float(np.corrcoef(R[a], R[b])[0, 1]),  # Pearson of ranks = Spearman
                      "seeds_a": len(groups[a]), "seeds_b": len(groups[b])})
    pairs = pd.DataFrame(pairs)
    mlflow_io.log_table(pairs, "table1.csv")
    for p in pairs.itertuples():
        print(f"{p.model_a:>10} vs {p.model_b:<10}: Pearson of learnability {p.pearson_learnability:.3f}, "
              f"Spearman of ranks {p.spearman_rank:.3f}", flush=True)
        mlflow_io.log_metrics({f"pearson_{p.model_a}_vs_{p.model_b}": p.pearson_learnability,
                               f"spearman_{p.model_a}_vs_{p.model_b}": p.spearman_rank}, step=0)
    archs = list(L)
    for a, b in itertools.combinations(archs, 2):
        mlflow_io.log_figure(plots.learnability_pair(L[a], L[b], R[a], R[b], a, b),
                             f"figures/pair_{a}_vs_{b}.png".replace(":", "-"))
    mean_rank = np.mean([R[a] for a in archs], axis=0)
    data = load_dataset(first.metadata["dataset"], cfg.data_dir, first.metadata["subset"])
    shape = first.metadata["image_shape"]
    rows, images, titles = [], [], []
    for kind, chosen in (("easiest", np.argsort(mean_rank)[:8]), ("hardest", np.argsort(-mean_rank)[:8])):
        rows.append(kind)
        images.append(as_images(data.x_train[chosen], shape))
        titles.append(["\n".join(f"{a}: {R[a][i]:.0f}" for a in archs) for i in chosen])
    mlflow_io.log_figure(plots.extreme_images(images, titles, rows), "figures/easiest_hardest.png")
    log_explorer_of_active_run(cfg.data_dir, min(2, first.metadata["epochs"]), model=cfg.model)
