"""How well a data attribution predicts retraining: the linear datamodeling score (LDS; Park et al.,
"TRAK", ICML 2023, eq. 5; the protocol of dattri, Deng et al., NeurIPS 2024 datasets and benchmarks
track, `dattri.metric.lds`), and the random subsets it is measured on.
"""
from __future__ import annotations

import numpy as np
from scipy.stats import spearmanr


def lds_subsets(n: int, count: int, fraction: float, seed: int = 0) -> np.ndarray:
    """(count, n) bool: subset s holds int(n * fraction) training samples drawn without replacement by
    numpy's default_rng(seed + s), as dattri's `retrain_lds` draws them."""
    size = int(n * fraction)
    masks = np.zeros((count, n), dtype=bool)
    for s in range(count):
        masks[s, np.random.default_rng(seed + s).choice(n, size, replace=False)] = True
    return masks


def lds(scores: np.ndarray, subsets: np.ndarray, outputs: np.ndarray) -> tuple[float, np.ndarray]:
    """The LDS of an attribution and its value per target.

    Args:
        scores: (K, n) attribution of each training sample to each of K targets, larger = the sample
            helps the target (lowers its loss).
        subsets: (S, n) bool, the training subsets the ground truth was retrained on.
        outputs: (S, K) the ground truth: each target's value after training on each subset, larger =
            better (dattri flips the loss: pass minus the retrained test loss).

    Returns the mean over targets of the Spearman correlation across subsets between the attribution
    summed over the subset and the retrained output (targets whose correlation is undefined, a
    constant column, left out as dattri leaves out NaN), and the (K,) per-target values."""
    predicted = subsets.astype(np.float64) @ np.asarray(scores, np.float64).T  # (S, K)
    per_target = np.array([spearmanr(predicted[:, k], outputs[:, k]).statistic for k in range(predicted.shape[1])])
    valid = ~np.isnan(per_target)
    return (float(per_target[valid].mean()) if valid.any() else float("nan")), per_target
