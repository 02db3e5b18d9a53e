"""The `ordering` stage: the batch-ordering experiment (paper section 3.6): every construction over several seeds, one
parent run, every variant's model in the registry."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pandas as pd

from .. import mlflow_io, plots
from ..analysis import ordering
from ..config import ConfigError, OrderingConfig, TrainRunConfig
from ..data import training_data
from ..dynamics import check_matches
from ..training import check_batching
from ..runs import get_or_train
from .common import compare_once, how_to_train

def registered_name(dataset: str) -> str:
    return f"ordering-{dataset}"


def run(cfg: OrderingConfig, project_dir: str | Path) -> str:
    """Train every (method, seed), compare them (figs. 7, 8, table, paired test), register the models."""
    cfg.check()
    methods, seeds = cfg.method_list(), list(range(cfg.seed, cfg.seed + cfg.num_seeds))
    with mlflow_io.start_run(f"ordering {cfg.dataset}", "ordering", tags={mlflow_io.TAG_FINGERPRINT: cfg.fingerprint()},
                             description=f"Batch constructions {', '.join(methods)} on {cfg.dataset} over seeds "
                                         f"{seeds[0]}..{seeds[-1]} (paper section 3.6, figs. 7 and 8).",
                             config=cfg.to_dict()) as run:
        # Everything that can be wrong is checked before the first model trains.
        data = training_data(cfg)
        check_batching(cfg, data.n_train)
        if data.n_train % cfg.batch_size:
            raise ConfigError(f"The ordering experiment splits the {data.n_train} training samples into equal "
                              f"batches: choose a batch_size that divides {data.n_train}.")
        reference = cfg.reference_run_id
        if any(m in ordering.NEEDS_REFERENCE for m in methods):
            if reference:
                check_matches(reference, mlflow_io.load_dynamics(reference), cfg.dataset, data.n_train)
            else:  # with a storage, one of the workers trains it and the others wait for it
                reference = get_or_train([cfg.train_config()], launch_from=project_dir, **how_to_train(cfg))[0]
        mlflow_io.set_tags({"sample_importance.reference_run_id": reference})

        variants = [(method, seed) for seed in seeds for method in methods]
        ids = get_or_train([TrainRunConfig(**dataclasses.replace(cfg.train_config(), seed=seed).to_dict(),
                                           ordering=method,
                                           reference_run_id=reference if method in ordering.NEEDS_REFERENCE else "")
                            for method, seed in variants], **how_to_train(cfg))
        runs = pd.DataFrame([{"method": m, "seed": s, "run_id": i} for (m, s), i in zip(variants, ids)])
        compare_once(cfg, "ordering", ids, lambda: _compare(cfg, runs, methods, reference))
        return run.info.run_id


def _compare(cfg: OrderingConfig, runs: pd.DataFrame, methods: list[str], reference: str) -> None:
    """The comparison of every variant (figures, table, paired test) and the registry."""
    for name in ("train_error", "test_error"):
        runs[name] = [mlflow_io.metric_series(r, name) for r in runs["run_id"]]
    runs["final_test_error"] = [s[-1] for s in runs["test_error"]]
    runs["final_train_error"] = [s[-1] for s in runs["train_error"]]
    _log_comparison(cfg, runs, methods)
    _register(cfg, runs, reference)
    mlflow_io.log_table(runs.drop(columns=["train_error", "test_error"]), "runs.csv")


def _log_comparison(cfg: OrderingConfig, runs: pd.DataFrame, methods: list[str]) -> None:
    curves, table = {}, []
    for method in methods:
        sel = runs[runs["method"] == method]
        curves[method] = {k: ordering.mean_and_stderr(np.stack(sel[k].to_list())) for k in ("train_error", "test_error")}
        mean, se = ordering.mean_and_stderr(sel["final_test_error"].to_numpy())
        table.append({"method": method, "final_test_error_mean": float(mean), "final_test_error_se": float(se),
                      "final_train_error_mean": float(sel["final_train_error"].mean()), "seeds": len(sel)})
        mlflow_io.log_metrics({f"final_test_error_{method}": float(mean),
                               f"final_test_error_se_{method}": float(se)}, step=cfg.epochs)
    for epoch in range(cfg.epochs):  # per-epoch means, so the parent's charts show every method
        mlflow_io.log_metrics({f"test_error_{m}": float(curves[m]["test_error"][0][epoch]) for m in methods},
                              step=epoch + 1)
    mlflow_io.log_table(pd.DataFrame(table), "final_test_error.csv")
    mlflow_io.log_figure(plots.ordering_errors(curves), "figures/ordering_error.png")

    # One PCA per initialisation: the methods of a seed share their starting point, and across seeds the
    # distance between initialisations would dominate the first components.
    paths = {}
    for seed, sel in runs.groupby("seed"):
        paths[seed] = ordering.trajectory_pca(
            {r.method: np.asarray(mlflow_io.load_dynamics(r.run_id).param_projection) for r in sel.itertuples()})
    mlflow_io.log_figure(plots.trajectories(paths, methods), "figures/ordering_pca.png")

    finals = {m: runs[runs["method"] == m].sort_values("seed")["final_test_error"].to_numpy() for m in methods}
    if any(m in finals for m in ordering.MIXED) and any(m in finals for m in ordering.HOMOGENEOUS):
        result = ordering.mixed_vs_homogeneous(finals)
        mlflow_io.log_metrics({"mixed_minus_homogeneous": result.difference, "p_ttest": result.p_ttest,
                               "p_wilcoxon": result.p_wilcoxon}, step=cfg.epochs)
        claim = ordering.ordering_claim(result)
        mlflow_io.log_dict([claim.to_dict()], "claims.json")
        print(f"claim 6: {'holds' if claim.holds else 'does not hold'} -- {claim.measured}", flush=True)
    else:
        mlflow_io.log_dict([], "claims.json")


def _register(cfg: OrderingConfig, runs: pd.DataFrame, reference: str) -> None:
    """Every (method, seed) model as a version of one registered model; aliases: each method's best
    version, and `champion` for the best overall (lowest final test error)."""
    name = registered_name(cfg.dataset)
    versions = []
    for r in runs.itertuples():
        versions.append(mlflow_io.register_version(
            name, r.run_id, {"method": r.method, "seed": r.seed, "final_test_error": f"{r.final_test_error:.6g}",
                             "reference_run_id": reference},
            description=f"Models of the batch-ordering experiment on {cfg.dataset}; aliases name each method's "
                        "best version, `champion` the best overall."))
    runs["model_version"] = versions
    for method, sel in runs.groupby("method"):
        best = sel.sort_values(["final_test_error", "seed"]).iloc[0]
        mlflow_io.set_alias(name, method, best["model_version"])
    champion = runs.sort_values(["final_test_error", "method", "seed"]).iloc[0]
    mlflow_io.set_alias(name, "champion", champion["model_version"])
    print(f"registered {len(runs)} versions of {name}; champion: {champion['method']} seed {champion['seed']} "
          f"(version {champion['model_version']}, test error {champion['final_test_error']:.4f})", flush=True)
