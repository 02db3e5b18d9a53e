"""The `scores` and `learnability` entry points on small digits runs."""
from __future__ import annotations

import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from conftest import folded

from sample_importance.errors import UserError
from sample_importance.explorer import data as X

pytestmark = pytest.mark.integration  # real processes, stores, servers or trained runs

BASE = ["--subset", "100", "--epochs", "4", "--batch_size", "20", "--device", "cpu"]


def downgrade_to_schema_2(folder) -> None:
    """Make a dynamics folder look as `train` wrote it before the end-of-epoch evaluation (schema 2)."""
    import json

    from sample_importance.dynamics import PER_EPOCH_EVAL

    meta = json.loads((folder / "metadata.json").read_text())
    for name in PER_EPOCH_EVAL:
        (folder / f"{name}.npy").unlink()
        del meta["checksums"][name]
    for key in ("eval_train", "grand_epoch"):
        del meta[key]
    meta["schema_version"] = 2
    (folder / "metadata.json").write_text(json.dumps(meta))


def table(run_id: str, name: str) -> pd.DataFrame:
    return pd.read_csv(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=name))


def explorer_payload(run_id: str) -> dict:
    """The data of a run's explorer.html."""
    import json

    page = mlflow.artifacts.load_text(f"runs:/{run_id}/explorer.html")
    start = page.index('id="si-data">') + len('id="si-data">')
    return json.loads(page[start:page.index("</script>", start)])


def test_scores_with_label_noise(tracking):
    import scores
    import train

    noisy = train.main(BASE + ["--width", "32", "--label_noise", "0.2", "--lr", "0.3"])
    run_id = scores.main(folded("scores", ["--train_run_ids", noisy, "--early_epoch", "2"] + BASE))
    s = table(run_id, "scores.csv")
    assert s["sample_id"].tolist() == list(range(100)) and s["flipped"].sum() == 20
    from sample_importance.analysis.scores import SCORES

    assert [c for c in s if c in SCORES] == list(SCORES)  # every score, in-batch variants under their own names
    for col in list(SCORES) + ["importance_L1", "importance_Out"]:
        assert np.isfinite(s[col]).all(), col
    # Recomputed from the run's raw arrays by the authors' formulas.
    from sample_importance import load_dynamics

    d = load_dynamics(noisy)
    p = np.asarray(d.eval_p_true, np.float64)  # (E, n): the model after each epoch
    np.testing.assert_allclose(s["confidence"], p.mean(0), rtol=1e-6)  # Swayamdipta et al. eq. 1
    np.testing.assert_allclose(s["variability"], np.sqrt(((p - p.mean(0)) ** 2).mean(0)), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(s["correctness"], np.asarray(d.eval_correct).mean(0), rtol=1e-6)
    np.testing.assert_allclose(s["el2n"], d.eval_error_l2[1], rtol=1e-6)  # Paul et al. at epoch 2
    np.testing.assert_allclose(s["grand"], d.eval_grad_norm[1], rtol=1e-6)
    np.testing.assert_allclose(s["confidence_inbatch"], np.asarray(d.p_true, np.float64).mean(0), rtol=1e-6)
    assert not np.allclose(s["confidence"], s["confidence_inbatch"])
    definitions = mlflow.artifacts.load_dict(f"runs:/{run_id}/score_definitions.json")
    assert all(v["available"] for v in definitions.values()) and "Paul et al." in definitions["grand"]["definition"]
    found = table(run_id, "label_noise_detection.csv").set_index("score")
    assert found["k"].eq(20).all() and found["auroc"].between(0, 1).all()
    assert found.loc["final_nll", "auroc"] > 0.6  # flipped labels keep a high loss, even after 4 epochs
    rho = table(run_id, "rank_correlations.csv").set_index("score")
    assert rho.loc["confidence", "confidence"] == pytest.approx(1.0)
    page = explorer_payload(run_id)  # the explorer of the scored run, its flipped labels marked
    assert X.unblob(page["flipped"]).tolist() == s["flipped"].astype(int).tolist()
    figures = {f.path for f in MlflowClient().list_artifacts(run_id, "figures")}
    assert {"figures/data_map.png", "figures/rank_correlations.png"} <= figures

    import prune

    run_id = prune.main(["--train_run_ids", noisy, "--keep_fractions", "0.5", "--prune_scores", "final_nll,forgetting"]
                        + BASE + ["--num_seeds", "2"])
    p = table(run_id, "prune.csv")
    assert len(p) == 2 * (1 + 1 + 2 * 2)  # seeds x (all, random, 2 scores x hardest/easiest)
    assert set(p.loc[p.score != "all", "n_kept"]) == {50} and set(p.loc[p.score == "all", "n_kept"]) == {100}
    nll = p[p.score == "final_nll"].set_index(["keep", "seed"])["flipped_kept"]
    # The flipped labels keep the highest final loss: keeping the easiest half drops them.
    assert (nll.loc["easiest"] < 0.1).all() and (nll.loc["hardest"] > 0.3).all()
    # Untracked retraining on every sample with the run's seed repeats the tracked run exactly.
    full = p[(p.score == "all") & (p.seed == 0)]["test_error"].item()
    assert full == pytest.approx(mlflow.get_run(noisy).data.metrics["final_test_error"], abs=1e-12)
    assert {"figures/pruning.png"} <= {f.path for f in MlflowClient().list_artifacts(run_id, "figures")}
    with pytest.raises(UserError, match="fewer than the run's batch_size"):
        prune.main(["--train_run_ids", noisy, "--keep_fractions", "0.1"] + BASE)

    # Several runs: EL2N and GraNd are the mean over them (Paul et al.: an expectation over initialisations).
    other = train.main(BASE + ["--width", "32", "--label_noise", "0.2", "--lr", "0.3", "--seed", "1"])
    both = table(scores.main(folded("scores", ["--train_run_ids", f"{noisy},{other}"] + BASE)), "scores.csv")
    e = load_dynamics(other)
    np.testing.assert_allclose(both["el2n"], (d.eval_error_l2[1].astype(np.float64) + e.eval_error_l2[1]) / 2,
                               rtol=1e-6)
    np.testing.assert_allclose(both["grand"], (d.eval_grad_norm[1].astype(np.float64) + e.eval_grad_norm[1]) / 2,
                               rtol=1e-6)
    np.testing.assert_allclose(both["confidence"], s["confidence"])  # the first run is the one scored

    # A run written before the end-of-epoch evaluation (schema 2) gives every in-batch score and names the rest.
    downgrade_to_schema_2(d.folder)
    old = load_dynamics(noisy)
    assert old.metadata["schema_version"] == 2 and not old.has_eval and old.grand_epoch is None
    run_id = scores.main(folded("scores", ["--train_run_ids", noisy] + BASE))
    s2 = table(run_id, "scores.csv")
    gone = {"confidence", "variability", "correctness", "el2n", "grand"}
    assert set(SCORES) - set(s2) == gone
    for col in set(SCORES) - gone:
        np.testing.assert_allclose(s2[col], s[col], rtol=1e-12, err_msg=col)
    definitions = mlflow.artifacts.load_dict(f"runs:/{run_id}/score_definitions.json")
    assert {k for k, v in definitions.items() if not v["available"]} == gone
    assert "no end-of-epoch evaluation (dynamics schema 2" in definitions["el2n"]["why_not"]
    with pytest.raises(UserError, match="cannot give the score el2n in prune_scores: run .* no end-of-epoch"):
        prune.main(["--train_run_ids", noisy, "--keep_fractions", "0.5", "--prune_scores", "el2n"] + BASE)


def test_learnability_table_and_mismatch_refusal(tracking):
    import learnability
    import train

    ids = [train.main(BASE + arch + ["--seed", str(seed)]) for arch in (["--width", "16", "--depth", "1"],
                                                                          ["--model", "cnn"]) for seed in (0, 1)]
    run_id = learnability.main(["--train_run_ids", ",".join(ids)] + BASE)
    pairs = table(run_id, "table1.csv")
    assert pairs[["model_a", "model_b"]].values.tolist() == [["mlp:1x16", "cnn"]]
    page = explorer_payload(run_id)  # the first run, its other seed and the other architecture's curves
    assert "learnability" in [sc["name"] for sc in page["scores"]]
    assert [o["layers"] for o in page["other_runs"]] == [["L1", "Out"], ["C1", "C2", "Out"]]
    assert pairs["seeds_a"].item() == 2 and pairs["seeds_b"].item() == 2
    learn = table(run_id, "learnability.csv")
    assert sorted(learn["rank_cnn"]) == pytest.approx(sorted(np.arange(1, 101)), abs=0.5)  # ranks 1..n (ties averaged)
    # Recomputed from the runs' own arrays: mean over seeds of the mean over epochs of p(true label).
    from scipy.stats import spearmanr

    from sample_importance import load_dynamics

    # Lee et al. eq. 1: p(true label) under the model after each epoch, mean over epochs and seeds.
    mlp = np.mean([np.asarray(load_dynamics(i).eval_p_true, np.float64).mean(0) for i in ids[:2]], axis=0)
    cnn = np.mean([np.asarray(load_dynamics(i).eval_p_true, np.float64).mean(0) for i in ids[2:]], axis=0)
    np.testing.assert_allclose(learn["learnability_mlp:1x16"], mlp, rtol=1e-6)
    np.testing.assert_allclose(learn["learnability_cnn"], cnn, rtol=1e-6)
    assert pairs["pearson_learnability"].item() == pytest.approx(np.corrcoef(mlp, cnn)[0, 1], abs=1e-6)
    assert pairs["spearman_rank"].item() == pytest.approx(spearmanr(mlp, cnn).statistic, abs=1e-6)
    other = train.main(["--subset", "80", "--epochs", "4", "--batch_size", "20", "--device", "cpu", "--depth", "0"])
    with pytest.raises(UserError, match="cannot be compared"):
        learnability.main(["--train_run_ids", f"{ids[0]},{other}"] + BASE)
    downgrade_to_schema_2(load_dynamics(ids[3]).folder)
    with pytest.raises(UserError, match=f"Run {ids[3]} has no end-of-epoch evaluation .* learnability"):
        learnability.main(["--train_run_ids", ",".join(ids)] + BASE)
