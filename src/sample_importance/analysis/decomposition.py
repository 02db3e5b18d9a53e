"""Decomposition of sample importance over epochs, layers, classes and samples
(Gao & Jojic, section 3.3, figs. 2, 3 and 10)."""
from __future__ import annotations

import numpy as np

from .claims import Claim


def layer_totals(importance: np.ndarray) -> np.ndarray:
    """B_d^t = sum_i beta_{i,d}^t (fig. 2); A^t is its sum over layers. (E, n, L) -> (E, L) float64."""
    return importance.sum(axis=1, dtype=np.float64)


def per_parameter(totals: np.ndarray, parameter_counts: list[int]) -> np.ndarray:
    """Average importance per parameter of each layer, B_d^t / |Q_d| (fig. 2, right). (E, L) -> (E, L)."""
    return totals / np.asarray(parameter_counts, dtype=np.float64)


def class_contribution(importance: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Importance contributed by each class to each layer per epoch (fig. 2, per class). -> (E, C, L)."""
    E, n, L = importance.shape
    out = np.zeros((E, num_classes, L))
    for c in range(num_classes):
        out[:, c] = importance[:, labels == c].sum(axis=1, dtype=np.float64)
    return out


def group_shares(importance: np.ndarray, total_importance: np.ndarray,
                 cuts: tuple[float, ...] = (0.1, 0.2)) -> np.ndarray:
    """Fig. 3: share of each layer's importance (per epoch) carried by the samples ranked by total
    importance tau into groups: top 10%, next 10% (10-20%), the other 80% with the default cuts.

    Returns: (E, L, groups) shares; each (epoch, layer) sums to 1.
    """
    n = len(total_importance)
    rank = np.empty(n, dtype=np.int64)
    rank[np.argsort(-total_importance, kind="stable")] = np.arange(n)  # 0 = most important
    bounds = [0] + [int(round(c * n)) for c in cuts] + [n]
    per_group = np.stack([importance[:, (rank >= lo) & (rank < hi)].sum(axis=1, dtype=np.float64)
                          for lo, hi in zip(bounds, bounds[1:])], axis=-1)  # (E, L, G)
    return per_group / per_group.sum(axis=-1, keepdims=True)


def top_share(importance: np.ndarray, total_importance: np.ndarray, fraction: float = 0.2) -> np.ndarray:
    """Share of each layer's importance, summed over all epochs, carried by the top `fraction` of
    samples by total importance. (E, n, L) -> (L,)."""
    k = int(round(fraction * len(total_importance)))
    top = np.argsort(-total_importance, kind="stable")[:k]
    per_layer = importance.sum(axis=0, dtype=np.float64)  # (n, L)
    return per_layer[top].sum(axis=0) / per_layer.sum(axis=0)


def peak_epochs(totals: np.ndarray) -> np.ndarray:
    """1-based epoch at which each layer's importance B_d^t is largest. (E, L) -> (L,)."""
    return totals.argmax(axis=0) + 1


def per_parameter_claim(totals: np.ndarray, parameter_counts: list[int], layer_names: list[str]) -> Claim:
    """Claim 2: the output layer (the last layer, by order) has the largest importance per
    parameter, and peaks early (no later than any other layer, within the first quarter of training)."""
    E = totals.shape[0]
    avg = per_parameter(totals, parameter_counts).mean(axis=0)
    peaks = peak_epochs(totals)
    out = len(layer_names) - 1  # the output layer: the last recorded
    largest = layer_names[int(np.argmax(avg))]
    holds = bool(largest == layer_names[out] and peaks[out] <= peaks.min() and peaks[out] <= max(1, E // 4))
    return Claim(2, "The output layer has the largest importance per parameter and its importance peaks early",
                 f"largest per-parameter importance: {largest}; peak epoch per layer "
                 + ", ".join(f"{n} {p}" for n, p in zip(layer_names, peaks)) + f" (of {E})",
                 holds, "figures/layer_importance.png")


def top_share_claim(shares: np.ndarray, layer_names: list[str]) -> Claim:
    """Claim 3: the top 20% of samples carry most of the importance, more so in lower layers
    (the first layer, by order, against the last)."""
    out, first = len(layer_names) - 1, 0
    holds = bool((shares > 0.5).all() and shares[first] >= shares[out])
    return Claim(3, "The top 20% of samples carry most of the importance, more so in lower layers",
                 "share carried by the top 20%: " + ", ".join(f"{n} {s:.2f}" for n, s in zip(layer_names, shares)),
                 holds, "figures/group_shares.png")
