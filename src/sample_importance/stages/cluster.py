"""The `cluster` stage: k-means clusters of one class's samples by importance profile (paper figs. 5, 6)."""
from __future__ import annotations

import numpy as np
import pandas as pd

from .. import mlflow_io, plots
from ..analysis import clustering
from ..config import ClusterConfig, ConfigError
from ..data import load_dataset
from .common import CLAIMS, as_images, one_run, start_analysis

MIN_CLUSTERS = 3  # easy, middle, hard


def check_class_size(label: int, members: int, num_clusters: int = MIN_CLUSTERS) -> None:
    """The class to cluster needs a training sample per cluster at least."""
    if members < MIN_CLUSTERS:
        raise ConfigError(f"Class {label} has only {members} training samples, too few for {MIN_CLUSTERS} "
                          f"clusters: choose another label or a larger subset.")
    if num_clusters > members:
        raise ConfigError(f"num_clusters={num_clusters} is more than the {members} training samples of class {label}: "
                          f"choose at most {members}.")


def run(cfg: ClusterConfig) -> str:
    """Figs. 5, 6: k-means on the epoch x layer importance profiles of one class's samples."""
    with start_analysis(cfg, "cluster", f"Clusters of class {cfg.label} by importance profile (paper figs. 5, 6)") as run:
        d = one_run(cfg)
        members = np.flatnonzero(d.label == cfg.label)
        check_class_size(cfg.label, len(members), cfg.num_clusters)
        k = cfg.num_clusters
        imp = np.asarray(d.importance[:, members])  # (E, m, L)
        loss = np.asarray(d.loss[:, members])  # (E, m)
        assign = clustering.kmeans_clusters(clustering.importance_features(imp, cfg.feature_scale), k, cfg.train.seed)
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
        data = load_dataset(d.metadata["dataset"], cfg.train.data_dir, d.metadata["subset"])
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
