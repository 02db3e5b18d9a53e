"""Batch constructions and their comparison (Gao & Jojic, section 3.6, figs. 7 and 8)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .claims import Claim

# The one list of batch constructions (section 3.6), in the order the experiment runs them; the
# configuration, the `ordering` stage and the comparison below import it.
METHODS = ("shuffle", "rand", "nlo", "rnlo", "nlm", "sio", "rsio", "sim")
FIXED = METHODS[1:]  # one fixed split into batches, presented in the same order every epoch
NEEDS_REFERENCE = ("nlo", "rnlo", "nlm", "sio", "rsio", "sim")  # sorted by a reference run's final NLL or tau
MIXED = ("rand", "nlm", "sim")  # batches with diverse difficulty
HOMOGENEOUS = ("nlo", "rnlo", "sio", "rsio")  # batches of similar difficulty


def fixed_batches(method: str, n: int, batch_size: int, nll: np.ndarray | None = None,
                  tau: np.ndarray | None = None, seed: int = 0) -> np.ndarray:
    """The b = n / batch_size disjoint batches of a construction of section 3.6, in training order.

    rand: a random split. nlo / sio: samples sorted by final NLL / total importance (low to high),
    consecutive chunks, easy batches first. rnlo / rsio: the same batches in reverse order. nlm / sim:
    sorted the same way, sample at sorted position i goes to batch i mod b (mixed difficulty).
    Ties in the scores are broken by sample id.

    Returns: (b, batch_size) sample ids; row j is the j-th batch presented in every epoch.
    """
    assert n % batch_size == 0, "the batches must split the training set exactly"
    b = n // batch_size
    if method == "rand":
        return np.random.default_rng([seed, 2]).permutation(n).reshape(b, batch_size)
    key = {"nlo": nll, "rnlo": nll, "nlm": nll, "sio": tau, "rsio": tau, "sim": tau}[method]
    assert key is not None and len(key) == n, f"{method} needs a score for each of the {n} samples"
    ranked = np.argsort(key, kind="stable")  # low to high
    if method in ("nlo", "sio"):
        return ranked.reshape(b, batch_size)
    if method in ("rnlo", "rsio"):
        return ranked.reshape(b, batch_size)[::-1]
    return ranked.reshape(batch_size, b).T  # nlm/sim: batch j holds sorted positions j, j+b, j+2b, ...


def presentation_order(method: str, n: int, batch_size: int, epochs: int, nll=None, tau=None,
                       seed: int = 0) -> np.ndarray:
    """(epochs, n) sample ids in presentation order: the fixed batches, in order, every epoch."""
    batches = fixed_batches(method, n, batch_size, nll, tau, seed)
    return np.tile(batches.reshape(-1), (epochs, 1)).astype(np.int64)


def mean_and_stderr(values: np.ndarray, axis: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Mean and standard error of the mean along `axis` (0 when there is one value)."""
    values = np.asarray(values, dtype=np.float64)
    k = values.shape[axis]
    se = values.std(axis=axis, ddof=1) / np.sqrt(k) if k > 1 else np.zeros_like(values.mean(axis=axis))
    return values.mean(axis=axis), se


@dataclass
class MixedVsHomogeneous:
    mixed: np.ndarray  # (seeds,) mean final test error of the mixed methods, per seed
    homogeneous: np.ndarray  # (seeds,) the same for the homogeneous methods
    difference: float  # mean of mixed - homogeneous (negative: mixed better)
    p_ttest: float  # paired one-sided t-test, mixed < homogeneous
    p_wilcoxon: float  # paired one-sided Wilcoxon signed-rank test (nan with fewer than 2 seeds)


def mixed_vs_homogeneous(final_test_error: dict[str, np.ndarray]) -> MixedVsHomogeneous:
    """The paper's claim that mixed batches (rand, nlm, sim) beat homogeneous ones (nlo, rnlo, sio,
    rsio): per seed (the same initialisation), the mean final test error of each group, compared with
    paired one-sided tests over seeds.

    Args:
        final_test_error: method -> (seeds,) final test error, seeds aligned across methods.
    """
    mixed = [m for m in MIXED if m in final_test_error]
    homog = [m for m in HOMOGENEOUS if m in final_test_error]
    assert mixed and homog, "needs at least one mixed and one homogeneous method"
    a = np.mean([final_test_error[m] for m in mixed], axis=0)
    b = np.mean([final_test_error[m] for m in homog], axis=0)
    diff = a - b
    if len(diff) >= 2 and np.any(diff != 0):
        from scipy.stats import ttest_rel, wilcoxon  # here: every entry point reads this module's names

        p_t = float(ttest_rel(a, b, alternative="less").pvalue)
        p_w = float(wilcoxon(a, b, alternative="less").pvalue)
    else:
        p_t = p_w = float("nan")
    return MixedVsHomogeneous(a, b, float(diff.mean()), p_t, p_w)


def ordering_claim(result: MixedVsHomogeneous, alpha: float = 0.05) -> Claim:
    """Claim 6: mixed batches reach a lower test error than homogeneous ones (paired over seeds)."""
    holds = bool(result.difference < 0 and result.p_ttest < alpha)
    return Claim(6, "Batches mixing easy and hard samples (rand, nlm, sim) beat homogeneous batches "
                    "(nlo, rnlo, sio, rsio)",
                 f"final test error, mixed {result.mixed.mean():.4f} vs homogeneous {result.homogeneous.mean():.4f} "
                 f"(difference {result.difference:+.4f}); paired t-test p={result.p_ttest:.3g}, "
                 f"Wilcoxon p={result.p_wilcoxon:.3g}, over {len(result.mixed)} seeds",
                 holds, "figures/ordering_error.png")


def trajectory_pca(trajectories: dict[str, np.ndarray], components: int = 2) -> dict[str, np.ndarray]:
    """Fig. 8: PCA of parameter trajectories. One PCA is fitted on every point of every trajectory,
    so all paths share the same axes.

    Args:
        trajectories: label -> (T, k) projected parameters at init and after each epoch.
    Returns:
        label -> (T, components).
    """
    labels = list(trajectories)
    stacked = np.concatenate([trajectories[l] for l in labels]).astype(np.float64)
    from sklearn.decomposition import PCA  # here: every entry point reads this module's names

    pca = PCA(n_components=components).fit(stacked)
    return {l: pca.transform(np.asarray(trajectories[l], dtype=np.float64)) for l in labels}
