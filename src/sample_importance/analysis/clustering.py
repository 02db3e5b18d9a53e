"""Clusters of samples by their epoch x layer importance profiles (Gao & Jojic, section 3.5, figs. 5, 6)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.stats import spearmanr
from sklearn.cluster import KMeans

from .claims import Claim


@dataclass
class ClusterSummary:
    assignment: np.ndarray  # (m,) cluster of each selected sample, clusters renumbered by difficulty (0 = easiest)
    difficulty: np.ndarray  # (k,) mean in-epoch NLL of each cluster
    size: np.ndarray  # (k,)
    peak_epoch: np.ndarray  # (k,) 1-based epoch of the cluster's largest mean alpha
    layer_share: np.ndarray  # (k, L) share of the cluster's importance in each layer (over all epochs)
    profile: np.ndarray  # (k, E, L) mean beta per epoch and layer


def importance_features(importance: np.ndarray, scale: str = "log") -> np.ndarray:
    """Epoch x layer profile of each sample as a feature vector (n, E*L). `log` uses log10(beta):
    importance spans orders of magnitude, and on raw values k-means groups by a few extremes."""
    E, n, L = importance.shape
    feats = np.transpose(importance, (1, 0, 2)).reshape(n, E * L).astype(np.float64)
    if scale == "log":
        floor = feats[feats > 0].min() if (feats > 0).any() else 1e-30
        feats = np.log10(np.maximum(feats, floor))
    elif scale != "raw":
        raise ValueError(f"scale must be 'log' or 'raw', got {scale!r}")
    return feats


def kmeans_clusters(features: np.ndarray, k: int, seed: int = 0) -> np.ndarray:
    """k-means (scikit-learn) cluster of each row."""
    return KMeans(n_clusters=k, n_init=10, random_state=seed).fit_predict(features)


def summarize_clusters(assignment: np.ndarray, importance: np.ndarray, loss: np.ndarray) -> ClusterSummary:
    """Rank clusters by mean NLL (easiest first) and describe each: peak epoch, share per layer, profile.

    Args:
        assignment: (m,) cluster ids of the selected samples.
        importance: (E, m, L) beta of the same samples; loss: (E, m) their in-epoch NLL.
    """
    ids = np.unique(assignment)
    difficulty = np.array([loss[:, assignment == c].mean(dtype=np.float64) for c in ids])
    order = ids[np.argsort(difficulty, kind="stable")]
    remap = {old: new for new, old in enumerate(order)}
    assignment = np.array([remap[c] for c in assignment])
    profile = np.stack([importance[:, assignment == c].mean(axis=1, dtype=np.float64) for c in range(len(ids))])
    alpha = profile.sum(axis=2)  # (k, E)
    totals = profile.sum(axis=1)  # (k, L)
    return ClusterSummary(
        assignment=assignment, difficulty=np.sort(difficulty),
        size=np.bincount(assignment, minlength=len(ids)), peak_epoch=alpha.argmax(axis=1) + 1,
        layer_share=totals / totals.sum(axis=1, keepdims=True), profile=profile,
    )


def cluster_claim(summary: ClusterSummary, layer_names: list[str]) -> tuple[Claim, dict[str, float]]:
    """Claim 5: easy clusters peak early and in the output layer, hard clusters late and in lower layers.

    Measured as Spearman correlations across clusters between difficulty (mean NLL) and (a) the peak
    epoch, (b) the share of importance in the first layer (by order; L1 of the paper's MLP); both must
    be positive. The output layer is the last."""
    lower = summary.layer_share[:, 0]
    first_name, out_name = layer_names[0], layer_names[-1]
    out = summary.layer_share[:, -1]
    rho_peak = spearmanr(summary.difficulty, summary.peak_epoch)
    rho_lower = spearmanr(summary.difficulty, lower)
    rho_out = spearmanr(summary.difficulty, out)
    stats = {"rho_difficulty_peak_epoch": float(np.nan_to_num(rho_peak.statistic)),
             "p_difficulty_peak_epoch": float(np.nan_to_num(rho_peak.pvalue, nan=1.0)),
             "rho_difficulty_lower_share": float(np.nan_to_num(rho_lower.statistic)),
             "p_difficulty_lower_share": float(np.nan_to_num(rho_lower.pvalue, nan=1.0)),
             "rho_difficulty_out_share": float(np.nan_to_num(rho_out.statistic))}
    holds = stats["rho_difficulty_peak_epoch"] > 0 and stats["rho_difficulty_lower_share"] > 0
    claim = Claim(5, "Easy clusters peak early and in the output layer; hard clusters peak late and in lower layers",
                  f"across {len(summary.size)} clusters, Spearman of difficulty with peak epoch "
                  f"{stats['rho_difficulty_peak_epoch']:+.2f} (p={stats['p_difficulty_peak_epoch']:.2g}), "
                  f"with {first_name} share {stats['rho_difficulty_lower_share']:+.2f} "
                  f"(p={stats['p_difficulty_lower_share']:.2g}), with {out_name} share "
                  f"{stats['rho_difficulty_out_share']:+.2f}",
                  bool(holds), "figures/clusters.png")
    return claim, stats
