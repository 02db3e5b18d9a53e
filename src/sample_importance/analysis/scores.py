"""Per-sample difficulty scores, all computed from the recorded dynamics (arrays indexed by sample id).

Each function takes arrays of the `dynamics/` contract: importance (E, n, L), p_true (E, n),
correct (E, n), error_l2 (E, n), batch_order (E, n), or their end-of-epoch counterparts eval_p_true,
eval_correct, eval_error_l2, eval_grad_norm (E, n); it returns one value per sample (n,).

Which arrays a score reads is part of its definition (`SCORES`, the one list of score names): the
in-batch arrays hold each sample as it was seen at its own step within the epoch (every sample under
different parameters), the end-of-epoch arrays every sample under the parameters after the epoch,
as Lee et al., Swayamdipta et al. and Paul et al. define their scores.
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
    """EL2N: ||softmax(f(x_i)) - onehot(y_i)||_2 early in training (Paul et al. 2021, section 2), at the
    1-based `epoch` of one run's (E, n) array (eval_error_l2: the parameters after that epoch, as
    Paul et al. define it; error_l2: the in-batch forward pass). `mean_at_epoch` averages runs."""
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


def self_contribution(importance: np.ndarray, batch_order: np.ndarray, batch_size: int, step_scale: float) -> np.ndarray:
    """In-run self-contribution (TracIn-self restricted to the steps actually taken): sum over the
    sample's own steps of <g_i, phi_i> = -(step_scale / B) ||g_i||^2 = -(B / step_scale) alpha_i^t,
    exactly from the recorded importance (SGD family: phi_i = -(step_scale / B) g_i). Negative: a
    step always lowers the sample's own loss to first order; more negative = larger self-influence."""
    alpha = importance.sum(axis=2, dtype=np.float64)  # (E, n)
    sizes = np.stack([batch_sizes(order, batch_size) for order in batch_order])  # (E, n)
    return -(alpha * sizes).sum(0) / step_scale


def sgd_family(metadata: dict) -> bool:
    """Whether the run's phi is -(lr / B) c g_i (torch.optim.SGD, with or without momentum): what
    GraNd from the importance and the self-contribution read. A run whose metadata names no
    convention is one of this project's plain-SGD runs."""
    convention = metadata.get("phi_convention")
    return convention is None or str(convention).startswith("phi_i = -(lr / B)")


def _step_scale(metadata: dict) -> float:
    """lr times the momentum factor c of the recorder (phi = -(lr / B) c g_i): c = 1 for plain SGD and
    for momentum without dampening, 1 + momentum for Nesterov (see importance.recorder)."""
    return metadata["lr"] * (1 + metadata.get("momentum", 0.0) if metadata.get("nesterov") else 1.0)


def learnability(p_true_runs: list[np.ndarray]) -> np.ndarray:
    """L_f(x_i): mean over runs (initialisations) of the mean over epochs of p(true label) (Lee et
    al. 2019, eq. 1), with f^(t) the model after epoch t: pass the runs' eval_p_true (E, n)."""
    return np.mean([confidence(p) for p in p_true_runs], axis=0)


def learnability_rank(values: np.ndarray) -> np.ndarray:
    """R_{f,i}: rank of the sample's learnability, 1 = easiest (largest), ties averaged (Lee et al. eq. 2)."""
    return rankdata(-np.asarray(values, dtype=np.float64), method="average")


def mean_at_epoch(rows_runs: list[np.ndarray], epoch: int) -> np.ndarray:
    """The mean over runs (initialisations) of one epoch's row (1-based `epoch`) of per-epoch arrays
    (E, n): the expectation over initialisations of EL2N and GraNd (Paul et al. 2021, section 2)."""
    return np.mean([np.asarray(r[epoch - 1], np.float64) for r in rows_runs], axis=0)


# The one list of score names: name -> (a larger value means harder, definition and source). Names
# ending in _inbatch are the same formulas on the in-batch arrays.
SCORES = {
    "total_importance": (True, "tau_i = sum over epochs and layers of beta_{i,d}^t, from each sample's own "
                               "SGD step (Gao & Jojic, section 2.2)"),
    "final_nll": (True, "NLL under the final parameters"),
    "confidence": (False, "mean over epochs of p(true label) under the end-of-epoch parameters "
                          "(Swayamdipta et al. 2020, eq. 1; for one run, Lee et al. 2019's learnability)"),
    "variability": (True, "population standard deviation over epochs of the end-of-epoch p(true label) "
                          "(Swayamdipta et al. 2020, eq. 2; np.std as in their code)"),
    "correctness": (False, "fraction of epochs in which the end-of-epoch parameters classify the sample "
                           "correctly (Swayamdipta et al. 2020)"),
    "forgetting": (True, "correct-to-incorrect transitions between consecutive in-batch presentations; "
                         "never-learned samples first (Toneva et al. 2019, section 2)"),
    "el2n": (True, "||softmax - onehot(label)||_2 under the parameters after early_epoch, mean over the runs "
                   "given (Paul et al. 2021)"),
    "grand": (True, "||grad of the sample's own loss|| under the parameters after early_epoch (exact, "
                    "recorded without a step), mean over the runs given (Paul et al. 2021)"),
    "confidence_inbatch": (False, "confidence from the in-batch p(true label) (each sample at its own step)"),
    "variability_inbatch": (True, "variability from the in-batch p(true label)"),
    "correctness_inbatch": (False, "correctness from the in-batch predictions"),
    "el2n_inbatch": (True, "EL2N from the in-batch forward pass of early_epoch, mean over the runs given"),
    "grand_inbatch": (True, "GraNd from the recorded importance at each sample's step of early_epoch: "
                            "||g_i|| = (B / lr) sqrt(alpha_i), mean over the runs given"),
    "self_contribution": (False, "in-run self-contribution (TracIn-self over the steps taken): sum over the "
                                 "sample's own steps of <grad of its own loss, phi_i> = -(B / lr) alpha_i^t "
                                 "(SGD family); more negative = larger self-influence (Pruthi et al. 2020)"),
}
# Scores of the runs that recorded in-run attribution (contribution.npy) only; the same form.
ATTRIBUTION_SCORES = {
    "contribution_total": (True, "sum over steps and layers of c_{i,d}^t = <grad of the target loss L_V, "
                                 "phi_{i,d}^t>: the sample's first-order part of the change of L_V over its "
                                 "steps; positive = it raised L_V (harmful). In-run attribution, as In-Run Data "
                                 "Shapley's first order (Wang et al. 2025) under the step actually taken"),
}
HARDER_IS_LARGER = {name: harder for name, (harder, _) in {**SCORES, **ATTRIBUTION_SCORES}.items()}
NEEDS_EVAL = ("confidence", "variability", "correctness", "el2n", "grand")  # read the end-of-epoch arrays


def score_table(runs, early_epoch: int) -> tuple[pd.DataFrame, dict[str, str]]:
    """Every score of a run (a dynamics.Dynamics, or a list of them: the first is scored, EL2N and
    GraNd are averaged over all), one row per sample id; and, for each score the runs cannot give,
    why. Runs without the end-of-epoch evaluation (schema 2, or eval_train=0) give the in-batch scores
    only; GraNd at the checkpoint needs every run to have recorded it at `early_epoch`."""
    runs = list(runs) if isinstance(runs, (list, tuple)) else [runs]
    d = runs[0]
    table = pd.DataFrame({"sample_id": d.sample_id, "label": d.label})
    missing: dict[str, str] = {}
    no_importance = [r.metadata.get("run_id", str(r.folder)) for r in runs if not r.has_importance]
    if d.has_importance:
        imp = np.asarray(d.importance)
        table["total_importance"] = total_importance(imp)
    else:
        missing["total_importance"] = (f"run {no_importance[0]} was trained with track=outputs (no sample importance): "
                                       "re-train it with track=importance")
    table["final_nll"] = np.asarray(d.final_loss, np.float64)
    lacking = [r.metadata.get("run_id", str(r.folder)) for r in runs if not r.has_eval]
    if not lacking:
        p_true = np.asarray(d.eval_p_true)
        table["confidence"] = confidence(p_true)
        table["variability"] = variability(p_true)
        table["correctness"] = correctness(np.asarray(d.eval_correct))
        table["el2n"] = mean_at_epoch([r.eval_error_l2 for r in runs], early_epoch)
        other = [r for r in runs if r.grand_epoch != early_epoch]
        if other:
            r = other[0]
            where = "at no epoch" if r.grand_epoch is None else f"at epoch {r.grand_epoch}"
            missing["grand"] = (f"run {r.metadata.get('run_id', r.folder)} recorded GraNd's gradient norms {where}, "
                                f"not at early_epoch={early_epoch}: train with early_epoch={early_epoch}"
                                + ("" if r.grand_epoch is None else f", or score at early_epoch={r.grand_epoch}"))
        else:
            table["grand"] = mean_at_epoch([r.eval_grad_norm for r in runs], early_epoch)
    else:
        reason = (f"run {lacking[0]} has no end-of-epoch evaluation (dynamics schema "
                  f"{d.metadata.get('schema_version')}, or trained with eval_train=0): re-train it with eval_train=1")
        missing |= {name: reason for name in NEEDS_EVAL}
    p_in = np.asarray(d.p_true)
    table["confidence_inbatch"] = confidence(p_in)
    table["variability_inbatch"] = variability(p_in)
    table["correctness_inbatch"] = correctness(np.asarray(d.correct))
    table["forgetting"] = forgetting_score(np.asarray(d.correct))
    table["el2n_inbatch"] = mean_at_epoch([r.error_l2 for r in runs], early_epoch)
    if no_importance:
        missing["grand_inbatch"] = (f"run {no_importance[0]} was trained with track=outputs (no sample importance): "
                                    "re-train it with track=importance")
    else:
        table["grand_inbatch"] = np.mean([grand(np.asarray(r.importance), np.asarray(r.batch_order), early_epoch,
                                                r.metadata["batch_size"], _step_scale(r.metadata)) for r in runs], axis=0)
        for k, name in enumerate(d.layer_names):
            table[f"importance_{name}"] = layer_importance(imp)[:, k]
    if d.has_importance and sgd_family(d.metadata):
        table["self_contribution"] = self_contribution(imp, np.asarray(d.batch_order), d.metadata["batch_size"],
                                                       _step_scale(d.metadata))
    elif d.has_importance:
        missing["self_contribution"] = (f"run {d.metadata.get('run_id', d.folder)} did not step with SGD "
                                        f"({d.metadata.get('phi_convention')}): its importance does not give "
                                        "<g_i, phi_i>")
    else:
        missing["self_contribution"] = missing["total_importance"]
    if getattr(d, "contribution", None) is not None:  # in-run attribution (a run that recorded it; not asked of the others)
        per_layer = np.asarray(d.contribution, np.float64).sum(0)  # (n, L) over epochs
        table["contribution_total"] = per_layer.sum(1)
        for k, name in enumerate(d.layer_names):
            table[f"contribution_{name}"] = per_layer[:, k]
    order = [c for c in ("sample_id", "label", *SCORES, *ATTRIBUTION_SCORES) if c in table]
    return table[order + [c for c in table if c not in order]], missing


def rank_correlations(table: pd.DataFrame, columns: list[str]) -> pd.DataFrame:
    """Spearman rank correlation between every pair of scores."""
    rho = spearmanr(table[columns].to_numpy()).statistic
    if np.ndim(rho) == 0:  # two columns: scipy returns the one coefficient
        rho = np.array([[1.0, rho], [rho, 1.0]])
    return pd.DataFrame(rho, index=columns, columns=columns)


INSPECTED = (0.05, 0.10, 0.20)  # fractions of the data inspected, most suspicious first (kronfluence's curve)


def detection(table: pd.DataFrame, flipped: np.ndarray, columns: list[str]) -> pd.DataFrame:
    """How well each score finds the flipped labels: AUROC, precision among the k highest-scored
    samples (k = the number flipped; harder = more suspicious) and, for each fraction f of
    INSPECTED, the share of the flipped samples among the round(f * n) most suspicious
    (`found_at_<percent>`)."""
    flipped = np.asarray(flipped, bool)
    k, n = int(flipped.sum()), len(flipped)
    rows = []
    for col in columns:
        s = table[col].to_numpy(np.float64) * (1 if HARDER_IS_LARGER.get(col, True) else -1)
        ranked = np.argsort(-s, kind="stable")
        rows.append({"score": col, "auroc": float(roc_auc_score(flipped, s)),
                     "precision_at_k": float(flipped[ranked[:k]].mean()) if k else float("nan"), "k": k,
                     **{f"found_at_{round(100 * f)}": float(flipped[ranked[:round(f * n)]].sum() / k) if k
                        else float("nan") for f in INSPECTED}})
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
