"""The analysis steps of the study (paper sections 3.2-3.5) and `main`, which chains them.

Each step: find the `train` runs it reads or train them (in this process, several in one loop:
`together.train_many`), load them through the artifact contract, call the pure functions of
`analysis/`, log tables, metrics, figures and its claim(s) (`claims.json`). `main` launches every
step as a child run with `mlflow run` from `project_dir` (reusing finished ones) and assembles
`report.html`.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pandas as pd

from . import mlflow_io, plots
from .analysis import clustering, decomposition, nll, stability
from .config import (AnalysisConfig, ClusterConfig, ConfigError, DecomposeConfig, NllConfig, StabilityConfig,
                     StudyConfig)
from .data import load_dataset, training_data
from .dynamics import Dynamics, check_aligned
from .report import render_report
from .tasks import train_run_name
from .training import check_batching
from .together import train_many

CLAIMS = "claims.json"
TAG_TRAIN_RUNS = "sample_importance.train_run_ids"
MIN_CLUSTERS = 3  # easy, middle, hard


def train_runs(cfg: AnalysisConfig, seeds: list[int], architectures: list[dict] | None = None
               ) -> dict[str, Dynamics]:
    """The given train runs, or for each architecture (training-field overrides, e.g. {"model":
    "cnn"}; default: the configured one) and seed the finished run matching the training fields
    (trained as child runs, together, when there is none). Loaded, validated and checked to hold
    the same samples."""
    ids = cfg.run_ids()
    if not ids:
        ids = train_many([dataclasses.replace(cfg.train_config(), seed=seed, **arch)
                          for arch in architectures or [{}] for seed in seeds], cfg.parallel_models)
    mlflow_io.set_tags({TAG_TRAIN_RUNS: ",".join(ids)})
    runs = {run_id: mlflow_io.load_dynamics(run_id) for run_id in ids}
    check_aligned(runs)
    return runs


def start_analysis(cfg: AnalysisConfig, entry_point: str, description: str):
    cfg.check()
    return mlflow_io.start_run(f"{entry_point} {cfg.dataset}", entry_point,
                               tags={mlflow_io.TAG_FINGERPRINT: cfg.fingerprint()}, description=description,
                               config=cfg.to_dict())


def run_stability(cfg: StabilityConfig) -> str:
    """Fig. 1: Spearman rank correlation of alpha across initialisations, every `every` epochs."""
    with start_analysis(cfg, "stability", "Is sample importance stable across initialisations? (paper fig. 1)") as run:
        runs = train_runs(cfg, list(range(cfg.seed, cfg.seed + cfg.num_seeds)))
        seeds = [str(d.metadata["seed"]) for d in runs.values()]
        labels = seeds if len(set(seeds)) == len(seeds) else list(runs)  # run ids when seeds repeat
        table = stability.stability_table({lab: d.alpha for lab, d in zip(labels, runs.values())}, cfg.every)
        mlflow_io.log_table(table, "stability.csv")
        for epoch, g in table.groupby("epoch"):
            mlflow_io.log_metrics({"spearman_min": g["spearman"].min(), "spearman_mean": g["spearman"].mean(),
                                   "jaccard_top10_mean": g["jaccard_top"].mean()}, step=int(epoch))
        mlflow_io.log_figure(plots.stability_curves(table), "figures/stability.png")
        mlflow_io.log_dict([stability.stability_claim(table).to_dict()], CLAIMS)
        return run.info.run_id


def run_decompose(cfg: DecomposeConfig) -> str:
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


def run_nll(cfg: NllConfig) -> str:
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


def run_cluster(cfg: ClusterConfig) -> str:
    """Figs. 5, 6: k-means on the epoch x layer importance profiles of one class's samples."""
    with start_analysis(cfg, "cluster", f"Clusters of class {cfg.label} by importance profile (paper figs. 5, 6)") as run:
        d = one_run(cfg)
        members = np.flatnonzero(d.label == cfg.label)
        k = min(cfg.num_clusters, len(members))
        if k < MIN_CLUSTERS:
            raise ConfigError(f"Class {cfg.label} has only {len(members)} training samples, too few for {MIN_CLUSTERS} "
                              f"clusters: choose another label or a larger subset.")
        imp = np.asarray(d.importance[:, members])  # (E, m, L)
        loss = np.asarray(d.loss[:, members])  # (E, m)
        assign = clustering.kmeans_clusters(clustering.importance_features(imp, cfg.feature_scale), k, cfg.seed)
        summary = clustering.summarize_clusters(assign, imp, loss)
        names = d.layer_names
        claim, stats = clustering.cluster_claim(summary, names)
        mlflow_io.log_table(pd.DataFrame({"sample_id": d.sample_id[members], "cluster": summary.assignment,
                                          "mean_nll": loss.mean(0)}), "clusters.csv")
        mlflow_io.log_table(pd.DataFrame({"cluster": np.arange(k), "size": summary.size,
                                          "difficulty": summary.difficulty, "peak_epoch": summary.peak_epoch,
                                          **{f"share_{n}": summary.layer_share[:, j] for j, n in enumerate(names)}}),
                            "cluster_summary.csv")
        out = len(names) - 1  # the output layer: the last; the first layer: index 0
        for c in range(k):  # step = cluster rank, 0 = easiest
            mlflow_io.log_metrics({"cluster_peak_epoch": int(summary.peak_epoch[c]),
                                   f"cluster_share_{names[out]}": float(summary.layer_share[c, out]),
                                   f"cluster_share_{names[0]}": float(summary.layer_share[c, 0]),
                                   "cluster_difficulty": float(summary.difficulty[c])}, step=c)
        mlflow_io.log_metrics(stats, step=0)
        shown = [0, k // 2, k - 1]  # easiest, a middle and the hardest cluster
        data = load_dataset(d.metadata["dataset"], cfg.data_dir, d.metadata["subset"])
        images = []
        for c in shown:
            ids = d.sample_id[members][summary.assignment == c][:16]
            images.append(as_images(data.x_train[ids], d.metadata["image_shape"]))
        titles = [f"{kind} cluster: rank {c + 1} of {k}\n{summary.size[c]} samples, mean NLL "
                  f"{summary.difficulty[c]:.3g}" for kind, c in zip(("easy", "middle", "hard"), shown)]
        mlflow_io.log_figure(plots.clusters([summary.profile[c] for c in shown],
                                            [loss[:, summary.assignment == c] for c in shown], images, titles,
                                            names), "figures/clusters.png")
        mlflow_io.log_figure(plots.cluster_summary(summary.difficulty, summary.peak_epoch, summary.layer_share[:, 0],
                                                   summary.layer_share[:, out], (names[0], names[out])),
                             "figures/cluster_summary.png")
        mlflow_io.log_dict([claim.to_dict()], CLAIMS)
        return run.info.run_id


def one_run(cfg: AnalysisConfig) -> Dynamics:
    runs = train_runs(cfg, [cfg.seed])
    return next(iter(runs.values()))


def as_images(x: np.ndarray, shape: list[int]) -> np.ndarray:
    """Flat samples (k, C*H*W) -> images (k, H, W) for grey or (k, H, W, 3) for colour."""
    c, h, w = shape
    imgs = x.reshape(len(x), c, h, w)
    return imgs[:, 0] if c == 1 else imgs.transpose(0, 2, 3, 1)


STEPS = ("stability", "decompose", "nll", "cluster")


def _step_configs(cfg: StudyConfig, train_run_id: str) -> dict:
    """The configuration of every analysis step of the study, reading the train run `train_run_id`."""
    fields = cfg.train_config().to_dict()
    return {
        "stability": StabilityConfig(**fields, num_seeds=cfg.num_seeds, every=cfg.every),
        "decompose": DecomposeConfig(**fields, train_run_ids=train_run_id),
        "nll": NllConfig(**fields, train_run_ids=train_run_id),
        "cluster": ClusterConfig(**fields, train_run_ids=train_run_id, label=cfg.label, num_clusters=cfg.num_clusters),
    }


def _check_against_data(cfg: StudyConfig) -> None:
    """What the data alone decides: the batch must fit the training set, and the class to cluster
    must have enough training samples."""
    data = training_data(cfg)
    check_batching(cfg, data.n_train)
    members = int((data.y_train == cfg.label).sum())
    if members < MIN_CLUSTERS:
        raise ConfigError(f"Class {cfg.label} has only {members} training samples, too few for {MIN_CLUSTERS} "
                          f"clusters: choose another label or a larger subset.")


def run_main(cfg: StudyConfig, project_dir: str | Path) -> str:
    """The study as one parent run: train, then stability, decompose, nll and cluster as child runs
    (each reused when a finished run with the same configuration exists), then `report.html`."""
    cfg.check()
    tcfg = cfg.train_config()
    # Every step's configuration is checked before the first step runs (a bad label or num_seeds
    # must not cost a training run first); the train run's id is filled in once it exists.
    for scfg in _step_configs(cfg, "").values():
        scfg.check()
    _check_against_data(cfg)
    with mlflow_io.start_run(f"main {cfg.dataset}", "main",
                             description=f"The sample-importance study on {cfg.dataset}: training, stability, "
                                         "decomposition, NLL correlation, clustering; see report.html.",
                             config=cfg.to_dict()) as run:
        runs = {}
        runs["train"], reused = mlflow_io.ensure_child(project_dir, "train", tcfg, train_run_name(tcfg))
        print(f"{'reusing' if reused else 'trained'} train run {runs['train']}", flush=True)
        configs = _step_configs(cfg, runs["train"])
        for step, scfg in configs.items():
            runs[step], reused = mlflow_io.ensure_child(project_dir, step, scfg, f"{step} {cfg.dataset}")
            print(f"{'reusing' if reused else 'finished'} {step} run {runs[step]}", flush=True)
        mlflow_io.set_tags({f"sample_importance.{step}_run_id": rid for step, rid in runs.items()})

        claims, figures, sections = [], {}, {}
        for step in ("train", *STEPS):
            names = mlflow_io.list_artifacts(runs[step], "figures")
            sections[step] = [f"{step}/{name}" for name in names]
            for name in names:
                figures[f"{step}/{name}"] = mlflow_io.download_bytes(runs[step], name)
            if step != "train":
                claims += [{**c, "run": step} for c in mlflow_io.load_dict(runs[step], CLAIMS)]
        html = render_report(f"Sample importance on {cfg.dataset}", claims, figures, cfg.to_dict(), runs, sections)
        mlflow_io.log_text(html, "report.html")
        mlflow_io.log_table(pd.DataFrame(claims), "claims.csv")
        mlflow_io.log_metrics({"claims_holding": sum(c["holds"] for c in claims), "claims_total": len(claims)},
                              step=0)
        for c in claims:
            print(f"claim {c['number']}: {'holds' if c['holds'] else 'does not hold'} -- {c['measured']}")
        from .explorer.stage import log_explorer  # the train run, its other seeds and its clusters

        seeds = [s for s in mlflow_io.run_tag(runs["stability"], TAG_TRAIN_RUNS).split(",") if s and s != runs["train"]]
        log_explorer([runs["train"], *seeds], cfg.data_dir, min(2, cfg.epochs), runs["cluster"])
        print(f"report: {mlflow_io.artifact_uri('report.html')}", flush=True)
        return run.info.run_id
