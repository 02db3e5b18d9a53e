"""Batch constructions of paper section 3.6 and the `ordering` entry point."""
from __future__ import annotations

import mlflow
import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from conftest import all_runs
from sample_importance.analysis import ordering as O
from sample_importance.config import ORDERINGS

pytestmark = pytest.mark.integration  # real processes, stores, servers or trained runs

N, B = 12, 3  # 12 samples in b = 4 batches of 3
NLL = np.array([5.0, 0.1, 3.0, 0.2, 9.0, 1.0, 0.5, 7.0, 2.0, 4.0, 0.3, 6.0])
TAU = -NLL  # another ranking: reversed


def test_every_construction_splits_into_equal_disjoint_batches():
    for method in ("rand", "nlo", "rnlo", "nlm", "sio", "rsio", "sim"):
        batches = O.fixed_batches(method, N, B, NLL, TAU, seed=1)
        assert batches.shape == (N // B, B), method
        assert sorted(batches.ravel().tolist()) == list(range(N)), method


def test_sorted_constructions_follow_the_paper():
    ranked = np.argsort(NLL)  # [1, 3, 10, 6, 5, 8, 2, 9, 0, 11, 7, 4]: low NLL first
    nlo = O.fixed_batches("nlo", N, B, NLL, TAU)
    np.testing.assert_array_equal(nlo, ranked.reshape(4, 3))  # B_1 = the 3 lowest NLL, ...
    np.testing.assert_array_equal(O.fixed_batches("rnlo", N, B, NLL, TAU), nlo[::-1])  # same batches, reversed
    nlm = O.fixed_batches("nlm", N, B, NLL, TAU)
    for j in range(4):  # batch j holds the samples at sorted positions j, j+b, j+2b
        np.testing.assert_array_equal(nlm[j], ranked[[j, j + 4, j + 8]])
    np.testing.assert_array_equal(O.fixed_batches("sio", N, B, NLL, TAU), np.argsort(TAU).reshape(4, 3))
    np.testing.assert_array_equal(O.fixed_batches("rsio", N, B, NLL, TAU), np.argsort(TAU).reshape(4, 3)[::-1])
    np.testing.assert_array_equal(O.fixed_batches("sim", N, B, NLL, TAU), np.argsort(TAU).reshape(3, 4).T)


def test_fixed_batches_repeat_every_epoch_and_rand_depends_on_seed():
    order = O.presentation_order("rand", N, B, epochs=3, seed=4)
    assert order.shape == (3, N) and (order == order[0]).all()
    assert not np.array_equal(order[0], O.presentation_order("rand", N, B, 1, seed=5)[0])


def test_mixed_vs_homogeneous_paired_test():
    errs = {"rand": np.array([0.10, 0.12, 0.11, 0.10]), "nlm": np.array([0.11, 0.12, 0.10, 0.11]),
            "nlo": np.array([0.20, 0.25, 0.22, 0.21]), "sio": np.array([0.30, 0.28, 0.27, 0.31])}
    r = O.mixed_vs_homogeneous(errs)
    np.testing.assert_allclose(r.mixed, [0.105, 0.12, 0.105, 0.105])
    assert r.difference < 0 and r.p_ttest < 0.01
    assert O.ordering_claim(r).holds
    flipped = O.mixed_vs_homogeneous({"rand": errs["nlo"], "nlo": errs["rand"]})
    assert flipped.difference > 0 and flipped.p_ttest > 0.5 and not O.ordering_claim(flipped).holds


def test_trajectory_pca_shares_axes():
    t = np.linspace(0, 1, 6)[:, None]
    paths = O.trajectory_pca({"a": t * [1.0, 0, 0], "b": t * [-1.0, 0, 0]})
    np.testing.assert_allclose(np.abs(paths["a"][:, 0]), np.abs(paths["b"][:, 0]))
    assert np.sign(paths["a"][-1, 0]) == -np.sign(paths["b"][-1, 0])


def test_train_with_an_ordering_presents_the_constructed_batches(tracking):
    import train as train_entry

    from sample_importance import load_dynamics

    args = ["--subset", "60", "--epochs", "2", "--width", "8", "--batch_size", "20"]
    ref = train_entry.main(args)
    run_id = train_entry.main(args + ["--ordering", "rnlo", "--reference_run_id", ref])
    d, r = load_dynamics(run_id), load_dynamics(ref)
    expected = O.presentation_order("rnlo", 60, 20, 2, np.asarray(r.final_loss), r.total_importance)
    np.testing.assert_array_equal(d.batch_order, expected)
    assert d.metadata["ordering"] == "rnlo" and d.metadata["reference_run_id"] == ref


ARGS = ["--subset", "100", "--epochs", "3", "--width", "8", "--batch_size", "25", "--num_seeds", "2"]


def test_ordering_end_to_end_with_registry(tracking):
    import ordering

    parent = ordering.main(ARGS)
    client = MlflowClient()
    runs = all_runs(tracking)
    trains = [r for r in runs if r.data.tags.get("sample_importance.entry_point") == "train"]
    # the reference run (seed 0, shuffle) doubles as the shuffle variant of seed 0: 8 x 2 variants in 16 runs
    assert sorted((r.data.params["ordering"], r.data.params["seed"]) for r in trains) == \
        sorted((m, str(s)) for m in ORDERINGS for s in (0, 1))
    assert all(r.info.status == "FINISHED" for r in runs)
    children = [r for r in trains if r.data.tags.get("mlflow.parentRunId") == parent]
    assert len(children) == 16  # the reference run was launched by the experiment too
    files = {f.path for f in client.list_artifacts(parent, "figures")}
    assert files == {"figures/ordering_error.png", "figures/ordering_pca.png"}
    table = mlflow.artifacts.load_text(f"runs:/{parent}/final_test_error.csv").splitlines()
    assert table[0].startswith("method,final_test_error_mean,final_test_error_se") and len(table) == 9
    claims = mlflow.artifacts.load_dict(f"runs:/{parent}/claims.json")
    assert claims[0]["number"] == 6 and "paired t-test p=" in claims[0]["measured"]

    versions = client.search_model_versions("name = 'ordering-digits'")
    assert len(versions) == 16
    by_version = {v.version: v for v in versions}
    assert {(v.tags["method"], v.tags["seed"]) for v in versions} == {(m, str(s)) for m in ORDERINGS for s in (0, 1)}
    model = client.get_registered_model("ordering-digits")
    assert set(model.aliases) == set(ORDERINGS) | {"champion"}
    best = min(float(v.tags["final_test_error"]) for v in versions)
    assert float(by_version[model.aliases["champion"]].tags["final_test_error"]) == best
    for method in ORDERINGS:
        mine = [float(v.tags["final_test_error"]) for v in versions if v.tags["method"] == method]
        assert float(by_version[model.aliases[method]].tags["final_test_error"]) == min(mine)
    loaded = mlflow.pytorch.load_model("models:/ordering-digits@champion")
    import torch

    assert loaded(torch.zeros(2, 64)).shape == (2, 10)

    # Again: every variant is reused and no version is registered twice.
    ordering.main(ARGS)
    assert len(client.search_model_versions("name = 'ordering-digits'")) == 16
    assert len([r for r in all_runs(tracking) if r.data.tags.get("sample_importance.entry_point") == "train"]) == 16


@pytest.mark.parametrize("args,message", [
    (["--methods", "nlo,bogus"], "Unknown ordering method(s) bogus"),
    (["--batch_size", "30"], "choose a batch_size that divides 100"),
    (["--reference_run_id", "REF"], "has no dynamics/ artifacts"),
])
def test_ordering_bad_input_fails_before_training(tracking, capsys, args, message):
    import ordering
    from _cli import run_cli

    with mlflow.start_run() as other:  # a run without dynamics/, for the reference case
        pass
    args = [other.info.run_id if a == "REF" else a for a in args]
    with pytest.raises(SystemExit) as info:
        run_cli(lambda: ordering.main(["--subset", "100", "--epochs", "1", "--width", "8", *args]))
    assert info.value.code == 2
    err = [l for l in capsys.readouterr().err.splitlines() if l.startswith("error: ")]
    assert len(err) == 1 and message in err[0], err
    runs = all_runs(tracking)
    assert not [r for r in runs if r.data.tags.get("sample_importance.entry_point") == "train"]
    assert all(r.info.status != "RUNNING" for r in runs)
