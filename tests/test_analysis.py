"""Each analysis on small synthetic arrays whose answer is known."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import adjusted_rand_score

from sample_importance.analysis import clustering, decomposition, nll, stability


def test_identical_rankings_give_spearman_one_and_full_overlap():
    rng = np.random.default_rng(0)
    a = rng.random((12, 200))
    table = stability.stability_table({"s0": a, "s1": a * 3.0, "s2": a ** 2}, every=5)  # monotone maps
    assert table["epoch"].unique().tolist() == [5, 10, 12]
    assert len(table) == 3 * 3  # 3 epochs x 3 pairs
    np.testing.assert_allclose(table["spearman"], 1.0)
    np.testing.assert_allclose(table["jaccard_top"], 1.0)
    assert stability.stability_claim(table).holds


def test_reversed_rankings_give_minus_one_and_no_overlap():
    a = np.tile(np.arange(100.0), (5, 1))
    table = stability.stability_table({"a": a, "b": -a}, every=5)
    assert table["spearman"].tolist() == [pytest.approx(-1.0)]
    assert table["jaccard_top"].tolist() == [0.0]
    assert not stability.stability_claim(table).holds


def test_stability_claim_needs_higher_early():
    table = pd.DataFrame({"epoch": [5, 10], "seed_a": "0", "seed_b": "1", "spearman": [0.92, 0.97],
                          "jaccard_top": [0.5, 0.5]})
    assert not stability.stability_claim(table).holds  # above 0.9 but rising


def test_decomposition_sums_and_shares():
    imp = np.zeros((3, 10, 2))
    imp[:, 0, 0] = [1.0, 4.0, 2.0]  # sample 0 carries everything in layer 0 ...
    imp[:, :, 1] = 1.0  # ... layer 1 is spread evenly
    labels = np.array([0, 1] * 5)
    totals = decomposition.layer_totals(imp)
    np.testing.assert_allclose(totals, [[1, 10], [4, 10], [2, 10]])
    np.testing.assert_array_equal(decomposition.peak_epochs(totals), [2, 1])
    per_class = decomposition.class_contribution(imp, labels, 2)
    np.testing.assert_allclose(per_class.sum(1), totals)
    np.testing.assert_allclose(per_class[:, 0, 0], [1, 4, 2])
    tau = imp.sum((0, 2))
    shares = decomposition.group_shares(imp, tau)  # groups: top 1 sample, next 1, other 8
    np.testing.assert_allclose(shares[:, 0], [[1, 0, 0]] * 3)
    np.testing.assert_allclose(shares[:, 1], [[0.1, 0.1, 0.8]] * 3)
    np.testing.assert_allclose(decomposition.top_share(imp, tau, 0.2), [1.0, 0.2])
    np.testing.assert_allclose(decomposition.per_parameter(totals, [2, 5]), totals / [2, 5])


def test_per_parameter_and_top_share_claims():
    names = ["L1", "Out"]
    totals = np.array([[1.0, 5.0], [3.0, 2.0], [2.0, 1.0], [1.0, 1.0]])  # Out peaks at epoch 1, L1 at 2
    assert decomposition.per_parameter_claim(totals, [100, 10], names).holds
    assert not decomposition.per_parameter_claim(totals, [1, 1000], names).holds  # L1 larger per parameter
    assert decomposition.top_share_claim(np.array([0.9, 0.7]), names).holds
    assert not decomposition.top_share_claim(np.array([0.6, 0.7]), names).holds  # more in Out than L1


def test_nll_correlation_and_trend():
    rng = np.random.default_rng(1)
    alpha = rng.random((4, 300))
    noise = rng.random((4, 300))
    loss = np.stack([alpha[t] * t + noise[t] * (3 - t) for t in range(4)])  # ever more related
    spear, pear = nll.nll_importance_correlation(loss, alpha)
    assert spear[-1] == pytest.approx(1.0) and pear[-1] == pytest.approx(1.0)
    assert np.all(np.diff(spear) > 0)
    assert nll.trend([0.1, 0.2, 0.3]) == pytest.approx(0.1)
    assert nll.nll_claim(spear).holds and not nll.nll_claim(spear[::-1]).holds


def planted(k=3, per=40, E=6, L=3, seed=0):
    """k groups of samples whose importance profiles peak at different epochs and layers."""
    rng = np.random.default_rng(seed)
    imp = np.empty((E, k * per, L))
    truth = np.repeat(np.arange(k), per)
    for c in range(k):
        profile = np.full((E, L), 1e-4)
        profile[min(2 * c, E - 1), L - 1 - c] = 1.0  # group c peaks at epoch 2c+1 in layer L-1-c
        imp[:, truth == c] = profile[:, None, :] * rng.lognormal(0, 0.1, size=(E, per, L))
    loss = np.repeat(truth[None, :] + 0.1, E, axis=0) * rng.uniform(0.9, 1.1, (E, k * per))
    return imp, loss, truth


def test_planted_clusters_are_recovered_and_ranked_by_difficulty():
    imp, loss, truth = planted()
    assign = clustering.kmeans_clusters(clustering.importance_features(imp), k=3)
    assert adjusted_rand_score(truth, assign) == 1.0
    summary = clustering.summarize_clusters(assign, imp, loss)
    # Cluster 0 is the easiest (group 0, loss ~0.1), 2 the hardest; renumbering follows difficulty.
    np.testing.assert_array_equal(summary.assignment, truth)
    assert np.all(np.diff(summary.difficulty) > 0)
    np.testing.assert_array_equal(summary.peak_epoch, [1, 3, 5])
    np.testing.assert_array_equal(summary.layer_share.argmax(1), [2, 1, 0])  # easy: top layer; hard: L1
    np.testing.assert_array_equal(summary.size, [40, 40, 40])
    claim, stats = clustering.cluster_claim(summary, ["L1", "L2", "Out"])
    assert claim.holds and stats["rho_difficulty_peak_epoch"] == pytest.approx(1.0)
    # The opposite pattern (hard samples peak early in Out) refutes the claim.
    flipped = clustering.summarize_clusters(assign, imp, loss[:, ::-1] * 0 + (2.1 - truth)[None, :])
    assert not clustering.cluster_claim(flipped, ["L1", "L2", "Out"])[0].holds


def test_claims_take_layer_names_from_the_data():
    """Any model's layer names: the first and last layer by order, never the paper's literals."""
    names = ["conv1", "layer1.0.conv1", "fc"]
    totals = np.array([[1.0, 1.0, 5.0], [3.0, 2.0, 2.0], [2.0, 1.0, 1.0], [1.0, 1.0, 1.0]])
    claim = decomposition.per_parameter_claim(totals, [100, 100, 10], names)
    assert claim.holds and "largest per-parameter importance: fc" in claim.measured
    assert decomposition.top_share_claim(np.array([0.9, 0.8, 0.7]), names).holds
    assert not decomposition.top_share_claim(np.array([0.6, 0.8, 0.7]), names).holds
