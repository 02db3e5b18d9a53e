"""The `scores`, `prune` and `learnability` entry points: every per-sample difficulty score of a run
side by side (with label-noise detection when the run flipped labels), training on the samples each
score keeps, and sample-wise learnability compared across architectures (Lee et al. 2019)."""
from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import pandas as pd

from . import mlflow_io, plots
from .analysis import scores as S
from .config import ConfigError, LearnabilityConfig, PruneConfig, ScoresConfig, TrainConfig, architecture_of
from .data import load_dataset, training_data
from .dynamics import Dynamics, DynamicsError
from .explorer.stage import log_explorer_of_active_run
from .models import model_for
from .study import as_images, start_analysis, train_runs
from .training import fit



def scored_runs(cfg: ScoresConfig) -> tuple[list[Dynamics], pd.DataFrame, dict[str, str]]:
    """The runs (the first is scored; EL2N and GraNd average over all), their score table and the
    scores they cannot give with the reason, which is printed and logged (score_definitions.json)."""
    runs = list(train_runs(cfg, [cfg.seed]).values())
    table, missing = S.score_table(runs, cfg.early_epoch)
    for name, reason in missing.items():
        print(f"score {name} cannot be given: {reason}", flush=True)
    mlflow_io.log_dict({name: {"definition": text, "harder_is_larger": harder, "available": name in table,
                               **({"why_not": missing[name]} if name in missing else {})}
                        for name, (harder, text) in S.SCORES.items()}, "score_definitions.json")
    return runs, table, missing


def flipped_labels(d: Dynamics, data_dir: str) -> np.ndarray:
    """Which training labels of the run differ from the dataset's (the run's label noise)."""
    clean = load_dataset(d.metadata["dataset"], data_dir, d.metadata["subset"]).y_train
    return np.asarray(d.label) != clean


def run_scores(cfg: ScoresConfig) -> str:
    with start_analysis(cfg, "scores", "Every per-sample difficulty score of one run, side by side") as run:
        runs, table, _ = scored_runs(cfg)
        d = runs[0]
        columns = [c for c in S.SCORES if c in table]
        noise = float(d.metadata["config"].get("label_noise", 0.0))
        flipped = flipped_labels(d, cfg.data_dir) if noise > 0 else None
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
            mlflow_io.log_metrics({f"auroc_{r.score}": r.auroc for r in found.itertuples()}
                                  | {f"precision_at_k_{r.score}": r.precision_at_k for r in found.itertuples()}, step=0)
            for r in found.itertuples():
                print(f"label noise {noise:g}: {r.score:<16} AUROC {r.auroc:.3f}  precision@{r.k} "
                      f"{r.precision_at_k:.3f}", flush=True)
        log_explorer_of_active_run(cfg.data_dir, cfg.early_epoch)
        return run.info.run_id


def run_prune(cfg: PruneConfig) -> str:
    """Data pruning: for each score, fraction and seed, train a fresh model (untracked, same settings
    as the scored run) on the hardest or the easiest samples, and on a random choice; test error
    against the fraction kept."""
    with start_analysis(cfg, "prune", "Data pruning: test error when training on the samples each score keeps") as run:
        fractions = sorted(set(cfg.fraction_list()))
        runs, table, missing = scored_runs(cfg)
        d = runs[0]
        tcfg = TrainConfig(**{**d.metadata["config"], "device": cfg.device, "data_dir": cfg.data_dir})
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
                final = fit(model_for(scfg, data), data.keep(ids), scfg, track=False).history[-1]
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


def run_learnability(cfg: LearnabilityConfig) -> str:
    """Train (or read) num_seeds runs of each architecture, then Table 1 and fig. 1 of Lee et al."""
    with start_analysis(cfg, "learnability", "Sample-wise learnability across architectures (Lee et al. 2019)") as run:
        # Refuses runs on different samples (dataset, subset, sample ids, epochs).
        runs = train_runs(cfg, list(range(cfg.seed, cfg.seed + cfg.num_seeds)),
                          cfg.architecture_list())
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
        log_explorer_of_active_run(cfg.data_dir, min(2, first.metadata["epochs"]))
        return run.info.run_id
