"""The model registry: every model's importance against per-sample autograd, on each image shape;
the researcher's own factory; track=outputs; momentum."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sample_importance.config import ConfigError, TrainConfig, parse_architecture
from sample_importance.data import Dataset
from sample_importance.models import REGISTRY, build_model, importance_columns, importance_groups
from sample_importance.training import fit, make_optimizer
from sample_importance.step import sgd_step
from sample_importance.importance import ImportanceRecorder

SHAPES = [(1, 8, 8), (1, 28, 28), (3, 32, 32)]  # digits, (Fashion-)MNIST, CIFAR-10
CASES = [("mlp", "group"), ("cnn", "group")] + [(name, norm) for name, e in REGISTRY.items() if e.norm
                                                  for norm in ("group", "batch")]


def _reference_beta(model, x, y, lr, momentum_factor=1.0):
    """beta (B, columns) one sample at a time: g_i = dL_i/dtheta through the batch's forward pass
    (with BatchNorm, L_i depends on the whole batch), phi_i = -(lr / B) c g_i, summed per column."""
    names, grouping, _ = importance_columns(model)
    module_of = {id(p): mod for mod in grouping for _, p in model.get_submodule(mod).named_parameters(recurse=False)}
    params = [p for p in model.parameters()]
    logits = model(x)
    loss_i = F.cross_entropy(logits, y, reduction="none")
    B = len(y)
    beta = torch.zeros(B, len(names), dtype=torch.float64)
    for i in range(B):
        grads = torch.autograd.grad(loss_i[i], params, retain_graph=True, allow_unused=True)
        for p, g in zip(params, grads):
            if g is not None:
                col = names.index(grouping[module_of[id(p)]])
                beta[i, col] += ((lr / B) * momentum_factor) ** 2 * g.double().square().sum()
    return beta


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("name,norm", CASES)
def test_registered_model_importance_matches_per_sample_autograd(name, norm, shape):
    """One SGD step of each registered model (tiny widths), on each image shape: the recorded beta per
    column equals the per-sample autograd reference (GroupNorm: the outer-product rules; BatchNorm:
    batchnorm=exact)."""
    cfg = TrainConfig(model=name, norm=norm, channels=0 if name in ("mlp", "cnn") else 4, depth=1, width=8,
                      batchnorm="exact" if norm == "batch" else "refuse", track="importance").check()
    d = int(np.prod(shape))
    model = build_model(d, 3, cfg.depth, cfg.width, 0, name, shape, cfg).double()
    x = torch.randn(5, d, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([0, 1, 2, 0, 1])
    want = _reference_beta(model, x, y, 0.1)
    model.zero_grad()
    opt = make_optimizer(model, cfg)
    with ImportanceRecorder(model, batchnorm=cfg.batchnorm, groups=importance_groups(model)) as rec:
        got = sgd_step(model, opt, x, y, recorder=rec).importance
    assert got.shape == want.shape
    assert torch.allclose(got, want, rtol=1e-9, atol=1e-30), (got - want).abs().max()


def _tiny_data(n=24, shape=(1, 4, 4), classes=3, seed=0) -> Dataset:
    rng = np.random.default_rng(seed)
    d = int(np.prod(shape))
    x = rng.normal(size=(n, d)).astype(np.float32)
    y = rng.integers(0, classes, n)
    return Dataset("tiny", x, y, x[:6], y[:6], shape, classes)


@pytest.mark.parametrize("nesterov", [0, 1])
def test_momentum_importance_is_the_steps_phi(nesterov):
    """With momentum the loop records the step's own phi_i = -(lr / B) c g_i (c = 1, or 1 + momentum
    for Nesterov): checked at every step of an epoch against autograd before that step."""
    data = _tiny_data()
    cfg = TrainConfig(model="resnet20", channels=2, epochs=1, batch_size=8, lr=0.05, momentum=0.9,
                      nesterov=nesterov, device="cpu", eval_train=0).check()
    model = build_model(16, 3, 0, 0, 0, "resnet20", data.image_shape, cfg).double()
    want = {}

    def probe(m, ids):
        ids = ids.cpu().numpy()
        x = torch.as_tensor(data.x_train[ids], dtype=torch.float64)
        y = torch.as_tensor(data.y_train[ids])
        want.update(zip(ids.tolist(), _reference_beta(m, x, y, cfg.lr, 1.9 if nesterov else 1.0)))
        m.zero_grad()

    rec = []
    fit(model, data, cfg, on_batch=probe, on_epoch=rec.append)
    got = rec[0].importance
    ref = np.stack([want[i].numpy() for i in range(data.n_train)])
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-30)


def test_track_outputs_records_statistics_only():
    """track=outputs: no importance columns, the same per-sample statistics as track=importance
    (the models are the same: importance does not change the step), at plain training's cost."""
    data = _tiny_data()
    base = TrainConfig(model="cnn", epochs=2, batch_size=8, device="cpu").check()
    outs = dataclasses.replace(base, track="outputs").check()
    a, b = [], []
    fit(build_model(16, 3, 0, 0, 0, "cnn", data.image_shape, base), data, base, on_epoch=a.append)
    fit(build_model(16, 3, 0, 0, 0, "cnn", data.image_shape, outs), data, outs, on_epoch=b.append)
    assert a[0].importance.shape == (24, 3) and b[0].importance.shape == (24, 0)
    for ra, rb in zip(a, b):
        for name in ("loss", "p_true", "eval_p_true", "eval_error_l2"):
            np.testing.assert_allclose(getattr(ra, name), getattr(rb, name), rtol=1e-5, atol=1e-6)
        assert np.isnan(rb.eval_grad_norm).all()  # GraNd needs the recorder


def test_config_refuses_what_cannot_work():
    with pytest.raises(ConfigError, match="batchnorm=exact"):
        TrainConfig(model="resnet20", norm="batch").check()
    TrainConfig(model="resnet20", norm="batch", track="outputs").check()
    with pytest.raises(ConfigError, match="norm and channels apply"):
        TrainConfig(model="mlp", norm="batch").check()
    with pytest.raises(ConfigError, match="cannot import"):
        TrainConfig(model="no_such_package.module:factory").check()
    with pytest.raises(ConfigError, match="has no function"):
        TrainConfig(model="tests.fixtures:nothing").check()
    with pytest.raises(ConfigError, match="nesterov"):
        TrainConfig(nesterov=1).check()
    assert parse_architecture("resnet20:batch") == {"model": "resnet20", "norm": "batch", "channels": 0,
                                                    "track": "outputs"}
    assert parse_architecture("vgg16:group:8") == {"model": "vgg16", "norm": "group", "channels": 8}
    with pytest.raises(ConfigError, match="resnet20"):
        parse_architecture("resnet20:layer")


@pytest.mark.parametrize("factory,message", [("not_a_model", "must return an nn.Module"),
                                             ("wrong_output", "must return logits")])
def test_unusable_factory_is_named(factory, message):
    with pytest.raises(ConfigError, match=message):
        build_model(64, 10, 0, 0, 0, f"tests.fixtures:{factory}", (1, 8, 8))


def test_factory_model_is_seeded_and_takes_images():
    a = build_model(64, 10, 0, 0, 3, "tests.fixtures:tiny_model", (1, 8, 8))
    b = build_model(64, 10, 0, 0, 3, "tests.fixtures:tiny_model", (1, 8, 8))
    c = build_model(64, 10, 0, 0, 4, "tests.fixtures:tiny_model", (1, 8, 8))
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert not torch.equal(a[0].weight, c[0].weight)
    assert a(torch.randn(2, 64)).shape == (2, 10)  # flat samples become images (B, 1, 8, 8)
    assert importance_columns(a)[0] == ["0", "1", "4"]  # each parameterised module alone


@pytest.mark.integration
def test_own_model_through_mlflow_run_then_decompose_and_scores(tracking):
    """`mlflow run . -e train -P model=tests.fixtures:tiny_model`: the researcher's factory trains
    through the same `train` path (dynamics, metrics, model), and `decompose` and `scores` read it."""
    import subprocess
    import sys

    import mlflow
    import pandas as pd

    import decompose
    import scores
    from conftest import REPO, all_runs
    from sample_importance import load_dynamics

    params = ["model=tests.fixtures:tiny_model", "subset=60", "epochs=3", "batch_size=20", "device=cpu"]
    cmd = [sys.executable, "-m", "mlflow", "run", str(REPO), "-e", "train", "--env-manager", "local"]
    for p in params:
        cmd += ["-P", p]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    (run,) = all_runs(tracking)
    assert run.info.status == "FINISHED" and run.data.params["model"] == "tests.fixtures:tiny_model"
    d = load_dynamics(run.info.run_id)
    assert d.layer_names == ["0", "1", "4"] and d.importance.shape == (3, 60, 3) and (d.importance > 0).all()
    assert d.metadata["parameter_counts"] == {"0": 30, "1": 6, "4": 3 * 64 * 10 + 10}
    assert d.metadata["layer_groups"] == {"0": "0", "1": "1", "4": "4"}
    # The decomposition's per-layer totals and the scores' per-layer importance are the run's arrays.
    base = ["--train_run_ids", run.info.run_id, "--train", "subset=60 epochs=3 batch_size=20 device=cpu"]
    dec = decompose.main(base)
    totals = pd.read_csv(mlflow.artifacts.download_artifacts(run_id=dec, artifact_path="layer_totals.csv"))
    np.testing.assert_allclose(totals["importance_4"], d.importance[:, :, 2].sum(1, dtype=np.float64), rtol=1e-6)
    sc = scores.main(base[:-1] + [base[-1] + " early_epoch=2"])
    table = pd.read_csv(mlflow.artifacts.download_artifacts(run_id=sc, artifact_path="scores.csv"))
    np.testing.assert_allclose(table["total_importance"], d.total_importance, rtol=1e-6)
    assert np.isfinite(table[["importance_0", "importance_1", "importance_4", "grand", "el2n"]]).all().all()


@pytest.mark.integration
def test_learnability_on_lee_et_al_architectures(tracking):
    """`learnability` with Lee et al.'s three architectures (tiny widths; GroupNorm, and a BatchNorm
    ResNet trained with track=outputs) and an MLP: Table 1 has every pair, each learnability is the
    mean end-of-epoch p(true label) of its run (60 digits, 2 epochs)."""
    import mlflow
    import pandas as pd

    import learnability
    from sample_importance import load_dynamics
    from sample_importance.stages.common import TAG_TRAIN_RUNS

    archs = "resnet20:group:4,vgg16:group:4,mobilenet:group:4,resnet20:batch:4,mlp:1x16"
    run_id = learnability.main(["--architectures", archs, "--num_seeds", "1", "--subset", "60", "--epochs", "2",
                                "--batch_size", "20", "--device", "cpu"])
    pairs = pd.read_csv(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="table1.csv"))
    assert len(pairs) == 10 and set(pairs["model_a"]) | set(pairs["model_b"]) == set(archs.split(","))
    learn = pd.read_csv(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="learnability.csv"))
    ids = mlflow.get_run(run_id).data.tags[TAG_TRAIN_RUNS].split(",")
    by_arch = {}
    for rid in ids:
        d = load_dynamics(rid)
        c = d.metadata["config"]
        by_arch[f"{c['model']}:{c['norm']}:{c['channels']}" if c["model"] != "mlp" else "mlp:1x16"] = d
    assert not by_arch["resnet20:batch:4"].has_importance and by_arch["resnet20:group:4"].has_importance
    for arch, d in by_arch.items():
        np.testing.assert_allclose(learn[f"learnability_{arch}"], np.asarray(d.eval_p_true, np.float64).mean(0),
                                   rtol=1e-5)


@pytest.mark.integration
def test_an_outputs_run_is_refused_by_importance_analyses(tracking):
    """track=outputs writes no importance.npy; `decompose` stops with one sentence naming the run and
    the option (its run ends FAILED, never RUNNING); `scores` gives the other scores and names the rest."""
    import mlflow
    import pandas as pd

    import decompose
    import scores
    import train
    from conftest import all_runs, folded
    from sample_importance import load_dynamics
    from sample_importance.errors import UserError

    base = ["--subset", "60", "--epochs", "2", "--batch_size", "20", "--device", "cpu"]
    run_id = train.main(base + ["--model", "resnet20", "--channels", "2", "--norm", "batch", "--track", "outputs"])
    d = load_dynamics(run_id)
    assert not (d.folder / "importance.npy").exists() and d.eval_p_true.shape == (2, 60)
    with pytest.raises(UserError, match=f"Run {run_id} was trained with track=outputs"):
        decompose.main(folded("decompose", ["--train_run_ids", run_id] + base))
    assert {r.info.status for r in all_runs(tracking)} == {"FINISHED", "FAILED"}
    sc = scores.main(folded("scores", ["--train_run_ids", run_id] + base))
    table = pd.read_csv(mlflow.artifacts.download_artifacts(run_id=sc, artifact_path="scores.csv"))
    assert "total_importance" not in table and np.isfinite(table[["final_nll", "confidence", "el2n"]]).all().all()
    defs = mlflow.artifacts.load_dict(f"runs:/{sc}/score_definitions.json")
    assert "track=outputs" in json.dumps(defs)
