"""Difficulty scores on small hand-made dynamics with known answers."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from sample_importance.analysis import scores as S


def test_forgetting_events_count_correct_to_wrong_transitions():
    correct = np.array([[1, 0, 1, 1, 0],
                        [0, 0, 1, 0, 1],
                        [1, 0, 1, 1, 0],
                        [0, 0, 1, 0, 1]], dtype=bool)  # (E=4, n=5)
    np.testing.assert_array_equal(S.forgetting_events(correct), [2, 0, 0, 2, 1])
    np.testing.assert_array_equal(S.never_learned(correct), [False, True, False, False, False])
    np.testing.assert_array_equal(S.forgetting_score(correct), [2, 4, 0, 2, 1])  # never learned ranks first
    np.testing.assert_allclose(S.correctness(correct), [0.5, 0, 1, 0.5, 0.5])


def test_confidence_variability_and_learnability():
    p = np.array([[0.2, 0.9], [0.4, 0.9], [0.6, 0.9]], dtype=np.float32)
    np.testing.assert_allclose(S.confidence(p), [0.4, 0.9], rtol=1e-6)
    np.testing.assert_allclose(S.variability(p), [np.sqrt(0.08 / 3), 0.0], atol=1e-7)
    L = S.learnability([p, np.array([[0.0, 0.5], [0.0, 0.5], [0.0, 0.5]])])  # second seed: 0.0 and 0.5
    np.testing.assert_allclose(L, [0.2, 0.7], rtol=1e-6)
    np.testing.assert_array_equal(S.learnability_rank(np.array([0.3, 0.9, 0.3, 0.1])), [2.5, 1, 2.5, 4])


def test_grand_recovers_the_gradient_norm_from_importance_with_a_ragged_batch():
    # 5 samples, batch 2: batches [3, 0], [4, 1], [2] (the last of size 1); ||g_i|| = i + 1.
    order = np.array([[3, 0, 4, 1, 2]])
    lr, norms = 0.5, np.arange(1.0, 6.0)
    sizes = np.array([2, 2, 1, 2, 2])  # batch size of sample i
    beta = (lr / sizes) ** 2 * norms ** 2
    importance = np.stack([0.25 * beta, 0.75 * beta], axis=1)[None].astype(np.float32)  # split over 2 layers
    np.testing.assert_array_equal(S.batch_sizes(order[0], 2), sizes)
    np.testing.assert_allclose(S.grand(importance, order, 1, 2, lr), norms, rtol=1e-6)


def test_recorded_error_l2_is_the_distance_of_softmax_to_the_label():
    from sample_importance.models import build_model
    from sample_importance.step import sample_statistics, sgd_step

    model = build_model(6, 4, 1, 8, 0)
    x = torch.randn(9, 6, generator=torch.Generator().manual_seed(0))
    y = torch.arange(9) % 4
    expected = (torch.softmax(model(x), 1) - F.one_hot(y, 4)).norm(dim=1)
    rec = sgd_step(model, torch.optim.SGD(model.parameters(), lr=0.1), x, y)
    torch.testing.assert_close(sample_statistics(rec.logits, rec.loss, y)[2], expected.detach(), rtol=1e-5, atol=1e-6)


def test_detection_auroc_and_precision():
    flipped = np.array([1, 1, 0, 0, 0, 0], dtype=bool)
    table = pd.DataFrame({"final_nll": [5.0, 4.0, 1.0, 0.5, 0.2, 0.1],   # perfect
                          "confidence": [0.1, 0.9, 0.2, 0.8, 0.7, 0.6],  # low = suspicious: one of two found
                          "grand": [0.0, 0.0, 1.0, 1.0, 1.0, 1.0]})      # exactly wrong
    out = S.detection(table, flipped, ["final_nll", "confidence", "grand"]).set_index("score")
    assert out.loc["final_nll", "auroc"] == 1.0 and out.loc["final_nll", "precision_at_k"] == 1.0
    assert out.loc["confidence", "auroc"] == pytest.approx(4 / 8)  # 0.1 beats all 4 clean samples, 0.9 none
    assert out.loc["confidence", "precision_at_k"] == 0.5
    assert out.loc["grand", "auroc"] == 0.0
    rho = S.rank_correlations(table, ["final_nll", "grand"])
    assert rho.loc["final_nll", "final_nll"] == pytest.approx(1.0)
    assert rho.loc["final_nll", "grand"] < 0


def test_prune_keep_hardest_easiest_and_random():
    values = np.array([0.5, 3.0, 1.0, 3.0, -2.0])
    np.testing.assert_array_equal(S.prune_keep(values, 0.4, "hardest"), [1, 3])  # the two largest
    np.testing.assert_array_equal(S.prune_keep(values, 0.4, "easiest"), [0, 4])
    np.testing.assert_array_equal(S.prune_keep(values, 0.4, "hardest", harder_is_larger=False), [0, 4])
    np.testing.assert_array_equal(S.prune_keep(values, 0.6, "hardest"), [1, 2, 3])
    np.testing.assert_array_equal(S.prune_keep(values, 1.0, "easiest"), np.arange(5))
    drawn = S.prune_keep(np.zeros(1000), 0.3, "random", seed=3)
    assert len(drawn) == 300 == len(set(drawn.tolist()))
    np.testing.assert_array_equal(drawn, S.prune_keep(np.zeros(1000), 0.3, "random", seed=3))
    assert not np.array_equal(drawn, S.prune_keep(np.zeros(1000), 0.3, "random", seed=4))


def test_score_table_names_the_scores_a_run_cannot_give():
    """A hand-made run: GraNd at the checkpoint only where it was recorded; without the evaluation,
    the in-batch scores alone, and the reason for the rest."""
    from types import SimpleNamespace

    E, n = 3, 4
    rng = np.random.default_rng(0)
    p_eval = rng.uniform(size=(E, n)).astype(np.float32)
    grad_norm = np.full((E, n), np.nan, np.float32)
    grad_norm[1] = [1.0, 2.0, 3.0, 4.0]
    run = SimpleNamespace(
        importance=rng.uniform(size=(E, n, 2)).astype(np.float32), p_true=rng.uniform(size=(E, n)),
        correct=rng.uniform(size=(E, n)) > 0.5, error_l2=rng.uniform(size=(E, n)),
        batch_order=np.tile(np.arange(n), (E, 1)), final_loss=np.ones(n), label=np.zeros(n, int),
        sample_id=np.arange(n), layer_names=["L1", "Out"], folder="f", has_eval=True, has_importance=True, grand_epoch=2,
        eval_p_true=p_eval, eval_correct=p_eval > 0.5, eval_error_l2=rng.uniform(size=(E, n)),
        eval_grad_norm=grad_norm, metadata={"run_id": "r1", "batch_size": 2, "lr": 0.1, "schema_version": 3})
    table, missing = S.score_table(run, 2)
    assert not missing and set(S.SCORES) <= set(table)
    np.testing.assert_allclose(table["grand"], [1, 2, 3, 4])
    np.testing.assert_allclose(table["variability"], p_eval.astype(np.float64).std(0), rtol=1e-6)  # population std
    table, missing = S.score_table(run, 3)
    assert set(missing) == {"grand"} and "at epoch 2, not at early_epoch=3" in missing["grand"]
    old = SimpleNamespace(**{**vars(run), "has_eval": False, "grand_epoch": None, "eval_p_true": None,
                             "metadata": {**run.metadata, "schema_version": 2}})
    table, missing = S.score_table(old, 2)
    assert set(missing) == set(S.NEEDS_EVAL) and "dynamics schema 2" in missing["el2n"]
    assert set(S.SCORES) - set(table) == set(S.NEEDS_EVAL)
