"""Per-sample difficulty scores, all computed from the recorded dynamics (arrays indexed by sample id).

Each function takes arrays of the `dynamics/` contract: importance (E, n, L), p_true (E, n),
correct (E, n), error_l2 (E, n), batch_order (E, n); it returns one value per sample (n,).
"""
from __future__ import annotations

import numpy as np
import pandas as pd
from scipy.stats import rankdata, spearmanr
from sklearn.metrics import roc_auc_score


def total_importance(importance: np.ndarray) -> np.ndarray:
    """tau_i = sum over epochs and layers of beta_{i,d}^t (Gao & Jojic 2017, section 2.2)."""
    return importance.sum(axis=(0, 2), dtype=np.float64)


def layer_importance(importance: np.ndarray) -> np.ndarray:
    """sum over epochs of beta_{i,d}^t, per layer (n, L) (Gao & Jojic 2017, fig. 3)."""
    return importance.sum(axis=0, dtype=np.float64)


def confidence(p_true: np.ndarray) -> np.ndarray:
    """Mean over epochs of the probability of the true label: the confidence of dataset cartography
    (Swayamdipta et al. 2020, eq. 1) and, for one run, the learnability of Lee et al. (2019, eq. 1)."""
    return p_true.mean(axis=0, dtype=np.float64)


def variability(p_true: np.ndarray) -> np.ndarray:
    """Standard deviation over epochs of the probability of the true label (Swayamdipta et al. 2020,
    eq. 2; population standard deviation)."""
    return p_true.astype(np.float64).std(axis=0)


def correctness(correct: np.ndarray) -> np.ndarray:
    """Fraction of epochs in which the sample was classified correctly (Swayamdipta et al. 2020)."""
    return correct.mean(axis=0, dtype=np.float64)


def forgetting_events(correct: np.ndarray) -> np.ndarray:
    """Number of transitions from correct to incorrect between consecutive presentations (Toneva et
    al. 2019, section 2). A sample never classified correctly has none; `never_learned` flags it (Toneva
    et al. count such samples as forgotten infinitely often; `forgetting_score` does so)."""
    c = correct.astype(bool)
    return (c[:-1] & ~c[1:]).sum(axis=0).astype(np.float64)


def never_learned(correct: np.ndarray) -> np.ndarray:
    return ~correct.astype(bool).any(axis=0)


def forgetting_score(correct: np.ndarray) -> np.ndarray:
    """Forgetting events with never-learned samples ranked above every other (Toneva et al. 2019)."""
    events = forgetting_events(correct)
    return np.where(never_learned(correct), len(correct), events)


def el2n(error_l2: np.ndarray, epoch: int) -> np.ndarray:
    """EL2N: ||softmax(f(x_i)) - onehot(y_i)||_2 early in training (Paul et al. 2021, section 2), here
    at the 1-based `epoch` from its in-batch forward pass, for one initialisation (average runs for
    the paper's expectation)."""
    return error_l2[epoch - 1].astype(np.float64)


def batch_sizes(batch_order_row: np.ndarray, batch_size: int) -> np.ndarray:
    """(n,) the size of the batch each sample was in during one epoch (the last batch may be smaller)."""
    n = len(batch_order_row)
    sizes = np.full(n, batch_size, dtype=np.float64)
    last = n % batch_size
    if last:
        sizes[batch_order_row[n - last:]] = last
    return sizes


def grand(importance: np.ndarray, batch_order: np.ndarray, epoch: int, batch_size: int, lr: float) -> np.ndarray:
    """GraNd: the norm of the sample's own loss gradient ||g_i|| at the 1-based `epoch` (Paul et al.
    2021), exactly from the recorded importance: beta = (lr / B)^2 ||g_i||^2 summed over layers."""
    alpha = importance[epoch - 1].sum(axis=1, dtype=np.float64)
    return np.sqrt(alpha) * batch_sizes(batch_order[epoch - 1], batch_size) / lr


def learnability(p_true_runs: list[np.ndarray]) -> np.ndarray:
    """L_f(x_i): mean over runs (initialisations) of the mean over epochs of p(true label) (Lee et
    al. 2019, eq. 1)."""
    return np.mean([confidence(p) for p in p_true_runs], axis=0)


def learnability_rank(values: np.ndarray) -> np.ndarray:
    """R_{f,i}: rank of the sample's learnability, 1 = easiest (largest), ties averaged (Lee et al. eq. 2)."""
    return rankdata(-np.asarray(values, dtype=np.float64), method="average")


# Scores where a larger value means a harder (or more suspicious) sample; the others are negated
# for detection and pruning.
HARDER_IS_LARGER = {"total_importance": True, "final_nll": True, "confidence": False, "variability": True,
                    "correctness": False, "forgetting": True, "el2n": True, "grand": True}


def score_table(d, early_epoch: int) -> pd.DataFrame:
    """Every score of one run (a dynamics.Dynamics), one row per sample id."""
    imp = np.asarray(d.importance)
    meta = d.metadata
    table = pd.DataFrame({"sample_id": d.sample_id, "label": d.label,
                          "total_importance": total_importance(imp),
                          "final_nll": np.asarray(d.final_loss, np.float64),
                          "confidence": confidence(np.asarray(d.p_true)),
                          "variability": variability(np.asarray(d.p_true)),
                          "correctness": correctness(np.asarray(d.correct)),
                          "forgetting": forgetting_score(np.asarray(d.correct)),
                          "el2n": el2n(np.asarray(d.error_l2), early_epoch),
                          "grand": grand(imp, np.asarray(d.batch_order), early_epoch, meta["batch_size"], meta["lr"])})
    for k, name in enumerate(d.layer_names):
        table[f"importance_{name}"] = layer_importance(imp)[:, k]
    return table


def rank_correlations(table: pd.DataFrame, columns: list[str]) -> pd.DataFrame:
    """Spearman rank correlation between every pair of scores."""
    rho = spearmanr(table[columns].to_numpy()).statistic
    if np.ndim(rho) == 0:  # two columns: scipy returns the one coefficient
        rho = np.array([[1.0, rho], [rho, 1.0]])
    return pd.DataFrame(rho, index=columns, columns=columns)


def detection(table: pd.DataFrame, flipped: np.ndarray, columns: list[str]) -> pd.DataFrame:
    """How well each score finds the flipped labels: AUROC and precision among the k highest-scored
    samples, k = the number flipped (harder = more suspicious)."""
    flipped = np.asarray(flipped, bool)
    k = int(flipped.sum())
    rows = []
    for col in columns:
        s = table[col].to_numpy(np.float64) * (1 if HARDER_IS_LARGER.get(col, True) else -1)
        top = np.argsort(-s, kind="stable")[:k]
        rows.append({"score": col, "auroc": float(roc_auc_score(flipped, s)),
                     "precision_at_k": float(flipped[top].mean()) if k else float("nan"), "k": k})
    return pd.DataFrame(rows)


def prune_keep(values: np.ndarray, fraction: float, keep: str, harder_is_larger: bool = True,
               seed: int = 0) -> np.ndarray:
    """Sample ids kept when pruning the training set to `fraction` of its samples (data pruning, Paul
    et al. 2021; Toneva et al. 2019): the `hardest` or `easiest` by the score `values` (ties broken by
    sample id), or `random` (drawn with `seed`). Returns round(fraction * n) ids, sorted."""
    n = len(values)
    k = max(1, int(round(fraction * n)))
    if k == n:
        return np.arange(n)
    if keep == "random":
        return np.sort(np.random.default_rng([seed, 29]).choice(n, size=k, replace=False))
    hardness = np.asarray(values, np.float64) * (1 if harder_is_larger else -1)
    order = np.argsort(-hardness if keep == "hardest" else hardness, kind="stable")
    return np.sort(order[:k])
