"""Sample importance and negative log-likelihood (Gao & Jojic, section 3.4, fig. 4)."""
from __future__ import annotations

import numpy as np
from scipy.stats import linregress, pearsonr, spearmanr

from .claims import Claim


def nll_importance_correlation(loss: np.ndarray, alpha: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per epoch, Spearman and Pearson correlation over samples between the in-epoch NLL and the
    importance alpha_i^t (fig. 4, left). (E, n), (E, n) -> spearman (E,), pearson (E,)."""
    spear = np.array([spearmanr(l, a).statistic for l, a in zip(loss, alpha)])
    pear = np.array([pearsonr(l.astype(np.float64), a).statistic for l, a in zip(loss, alpha)])
    return spear, pear


def trend(values: np.ndarray) -> float:
    """Least-squares slope of `values` against the 1-based epoch."""
    values = np.asarray(values, dtype=np.float64)
    if len(values) < 2:
        return 0.0
    return float(linregress(np.arange(1, len(values) + 1), values).slope)


def nll_claim(spearman: np.ndarray) -> Claim:
    """Claim 4: the NLL-importance correlation rises over training (positive slope over epochs)."""
    slope = trend(spearman)
    return Claim(4, "The correlation between a sample's NLL and its importance rises over training",
                 f"Spearman at epoch 1 {spearman[0]:.3f}, at the last epoch {spearman[-1]:.3f}; "
                 f"slope {slope:+.2e} per epoch", bool(slope > 0), "figures/nll_correlation.png")
