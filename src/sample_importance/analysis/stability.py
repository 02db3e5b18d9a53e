"""Stability of sample importance across initialisations (Gao & Jojic, section 3.2, fig. 1)."""
from __future__ import annotations

from itertools import combinations

import numpy as np
import pandas as pd
from scipy.stats import spearmanr

from .claims import Claim


def evaluated_epochs(num_epochs: int, every: int) -> list[int]:
    """1-based epochs at which importance is compared: every `every`-th epoch, and the last one."""
    epochs = list(range(every, num_epochs + 1, every))
    if not epochs or epochs[-1] != num_epochs:
        epochs.append(num_epochs)
    return epochs


def top_fraction_jaccard(a: np.ndarray, b: np.ndarray, fraction: float = 0.1) -> float:
    """Jaccard overlap of the top `fraction` of samples ranked by a and by b (ties broken by sample id)."""
    k = max(1, int(round(fraction * len(a))))
    top_a = set(np.argsort(-a, kind="stable")[:k].tolist())
    top_b = set(np.argsort(-b, kind="stable")[:k].tolist())
    return len(top_a & top_b) / len(top_a | top_b)


def stability_table(alpha_by_seed: dict[str, np.ndarray], every: int = 5, top_fraction: float = 0.1
                    ) -> pd.DataFrame:
    """Fig. 1: for every evaluated epoch and pair of seeds, Spearman's rank correlation of alpha_i^t
    over samples, and the Jaccard overlap of their top-`top_fraction` samples.

    Args:
        alpha_by_seed: seed label -> alpha (E, n), the same samples in the same order for every seed.
    Returns:
        one row per (epoch, seed_a, seed_b) with columns spearman and jaccard_top.
    """
    labels = list(alpha_by_seed)
    shapes = {alpha_by_seed[s].shape for s in labels}
    assert len(shapes) == 1, f"all seeds need the same (epochs, samples), got {shapes}"
    assert len(labels) >= 2, "stability needs at least two seeds"
    E = next(iter(shapes))[0]
    rows = []
    for epoch in evaluated_epochs(E, every):
        for sa, sb in combinations(labels, 2):
            a, b = alpha_by_seed[sa][epoch - 1], alpha_by_seed[sb][epoch - 1]
            rows.append({"epoch": epoch, "seed_a": sa, "seed_b": sb,
                         "spearman": float(spearmanr(a, b).statistic),
                         "jaccard_top": top_fraction_jaccard(a, b, top_fraction)})
    return pd.DataFrame(rows)


def stability_claim(table: pd.DataFrame, threshold: float = 0.9) -> Claim:
    """Claim 1: Spearman across initialisations exceeds `threshold` at every epoch, higher early."""
    by_epoch = table.groupby("epoch")["spearman"].agg(["min", "mean"])
    first, last = by_epoch["mean"].iloc[0], by_epoch["mean"].iloc[-1]
    worst = float(by_epoch["min"].min())
    holds = bool(worst > threshold and first >= last)
    return Claim(1, f"Spearman correlation of importance across initialisations is above {threshold} at "
                    "every epoch, and higher early in training",
                 f"min over epochs and seed pairs {worst:.3f}; mean at epoch {by_epoch.index[0]} {first:.3f}, "
                 f"at epoch {by_epoch.index[-1]} {last:.3f}", holds, "figures/stability.png")
