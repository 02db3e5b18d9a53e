"""The `influence` stage (paper section 4): the influence of every training sample's weight on
targets of a trained model, fixed-point (eq. 4/5) and unrolled through the recorded SGD run; in
`validate` mode checked against actual retraining, in `breakdown` mode mapped over the size of the
weight change, the learning rate and the training length.

Sign convention: influence = dT/dv_i at v = 1; removing sample i (v_i: 1 -> 0) changes T by about
-influence. Negative influence on a loss target = helpful (up-weighting the sample lowers the loss).
"""
from __future__ import annotations

import dataclasses
import sys
import time
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from torch.func import grad

from .. import dynamics as dyn
from .. import mlflow_io, plots
from ..analysis import influence as inf
from ..config import ConfigError, InfluenceConfig, TrainConfig, parse_floats, trained_config
from ..data import Dataset, training_data
from ..models import model_for
from ..training import resolve_device, shuffled_orders
from .common import as_images, train_runs
from ..runs import retrain


INFLUENCE_MODELS = ("mlp", "cnn")  # the models whose parameters are all in `layers` (inf.Flat.blocks)


@dataclass
class Trained:
    """A finished train run, ready to differentiate: float64 model at its final parameters."""

    run_id: str
    dynamics: dyn.Dynamics
    config: TrainConfig
    data: Dataset
    model: torch.nn.Module
    init_state: dict
    init_theta: torch.Tensor  # the initial parameters, flat, float64 (where the unrolled influence starts)
    device: torch.device


def load_trained(run_id: str, d: dyn.Dynamics, data_dir: str, device: str) -> Trained:
    """The run's configuration, data, initial and final parameters (dynamics/init_state.pt, final_state.pt)."""
    paths = {name: d.folder / name for name in (dyn.INIT_STATE, dyn.FINAL_STATE)}
    missing = [name for name, p in paths.items() if not p.is_file()]
    if missing:
        raise inf.InfluenceError(f"Run {run_id} has no trained model ({dyn.DIRNAME}/{missing[0]} is missing): pass the "
                                 "id of a train run finished by this version of sample-importance.")
    meta = d.metadata
    cfg = trained_config(meta, data_dir=data_dir, device=device)
    if cfg.model not in INFLUENCE_MODELS or cfg.momentum:
        raise inf.InfluenceError(f"Run {run_id} trained model={cfg.model}" + (f" with momentum={cfg.momentum}" if cfg.momentum
                                 else "") + f": influence (explicit Hessians and the unrolled plain-SGD trajectory) is "
                                 f"implemented for {' and '.join(INFLUENCE_MODELS)} trained by plain SGD; pass such a run.")
    data = training_data(cfg)
    dev = resolve_device(device)
    model = model_for(cfg, data).double().to(dev)
    init_state = d.state(dyn.INIT_STATE)
    model.load_state_dict(init_state)
    init_theta = inf.Flat(model).of_model()
    model.load_state_dict(d.state(dyn.FINAL_STATE))
    return Trained(run_id, d, cfg, data, model, init_state, init_theta, dev)


def target_set(data: Dataset, cfg: InfluenceConfig) -> np.ndarray:
    """Indices of the test samples the targets are measured on."""
    m = len(data.y_test)
    ids = cfg.target_set.test_id_list()
    if ids:
        bad = [i for i in ids if i >= m]
        if bad:
            raise ConfigError(f"test id {bad[0]} is out of range: the test set of {data.name} has {m} samples "
                              f"(0..{m - 1}).")
        return np.array(sorted(set(ids)))
    ts = cfg.target_set
    if ts.test_class >= data.num_classes:
        raise ConfigError(f"test_class={ts.test_class} is not a class of {data.name} (0..{data.num_classes - 1}).")
    pool = np.arange(m) if ts.test_class < 0 else np.flatnonzero(data.y_test == ts.test_class)
    rng = np.random.default_rng([cfg.train.seed, 7])
    return np.sort(rng.choice(pool, size=min(ts.num_test, len(pool)), replace=False))


def retrained_parameters(trained_cfg: TrainConfig, data: Dataset, init_state: dict, order: np.ndarray,
           weight: np.ndarray | None = None) -> torch.Tensor:
    """A counterfactual run: retrained in float64 without tracking, from `init_state` in `order`
    with sample weights `weight`; its final flat parameters."""
    result = retrain(trained_cfg, data, init_state, order, weight, dtype=torch.float64, track=False)
    return inf.Flat(result.model).of_model()


def _chosen(values: np.ndarray, k: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The k samples of largest |value| and k others drawn at random (seeded)."""
    top = np.argsort(-np.abs(values), kind="stable")[:k]
    rest = np.setdiff1d(np.arange(len(values)), top)
    rnd = np.random.default_rng([seed, 11]).choice(rest, size=min(k, len(rest)), replace=False)
    return top, np.sort(rnd)


def inrun_target(d: dyn.Dynamics, cfg: InfluenceConfig) -> np.ndarray | None:
    """The run's in-run attribution target (its test-sample indices) where this influence measures
    the same target: the run attributed to test samples and no other target set was asked for."""
    meta = d.metadata
    asked = cfg.target_set.test_id_list() or cfg.target_set.test_class >= 0  # another target set
    if d.contribution is None or meta.get("target_split") != "test" or asked:
        return None
    return np.asarray(meta["target_ids"], dtype=np.int64)


def run(cfg: InfluenceConfig) -> str:
    cfg.check()
    with mlflow_io.start_run(f"influence {cfg.train.dataset}" + ("" if cfg.mode == "influence" else f" {cfg.mode}"),
                             "influence", tags={mlflow_io.TAG_FINGERPRINT: cfg.fingerprint()},
                             description="Influence of each training sample on the trained model (paper section 4)"
                                         f"; mode {cfg.mode}.", config=cfg.to_dict()) as run:
        if cfg.mode == "breakdown":
            _breakdown(cfg)
            return run.info.run_id
        run_id, d = next(iter(train_runs(cfg, [cfg.train.seed]).items()))
        trained = load_trained(run_id, d, cfg.train.data_dir, cfg.train.device)
        data, dev = trained.data, trained.device
        inrun = inrun_target(d, cfg)
        test = target_set(data, cfg) if inrun is None else inrun
        if inrun is not None:
            print(f"the run recorded in-run attribution to {d.metadata['target']}: the targets are measured on the "
                  "same test samples and compared with it", flush=True)
        flat = inf.Flat(trained.model)
        x = torch.as_tensor(data.x_train, dtype=torch.float64, device=dev)
        y = torch.as_tensor(data.y_train, device=dev)
        xt = torch.as_tensor(data.x_test[test], dtype=torch.float64, device=dev)
        yt = torch.as_tensor(data.y_test[test], device=dev)
        obj = inf.Objective(flat, x, y, trained.config.weight_decay)
        if not 0 <= cfg.target_set.target_class < data.num_classes:
            raise ConfigError(f"target_class={cfg.target_set.target_class} is not a class of {data.name} "
                              f"(0..{data.num_classes - 1}).")
        targets = [inf.make_target(t, flat, xt, yt, cfg.target_set.target_class) for t in cfg.target_list()]

        h = cfg.hessian
        theta, before, after = inf.polish(obj, flat.of_model(), h.polish_steps)
        print(f"gradient norm of the training objective: {before:.3e} at the end of SGD"
              + (f", {after:.3e} after {h.polish_steps} L-BFGS steps" if h.polish_steps else ""), flush=True)
        mlflow_io.log_metrics({"grad_norm_sgd": before, "grad_norm_polished": after}, step=0)
        mlflow_io.set_tags({"sample_importance.train_run_id": run_id})

        table = pd.DataFrame({"sample_id": d.sample_id, "label": d.label, "total_importance": d.total_importance,
                              "final_nll": d.final_loss})
        if inrun is not None:  # sum over epochs and layers: the sample's first-order part of the change of L_V
            table["inrun_contribution"] = np.asarray(d.contribution, np.float64).sum(axis=(0, 2))
        damping = choose_damping(cfg, obj, theta)
        solves = []
        blocks = flat.blocks(d.layer_names)
        opts = dict(max_direct=h.max_direct, cg_tol=h.cg_tol, cg_maxiter=h.cg_maxiter, lissa_depth=h.lissa_depth,
                    lissa_scale=h.lissa_scale, lissa_batch=h.lissa_batch, seed=cfg.train.seed)

        def record(name: str, block: str, sol: inf.Solve, s: torch.Tensor) -> None:
            """The solve's row of solves.csv and its influence column, named unconverged_... when the
            solve did not reach cg_tol (so nothing reads it as a result)."""
            solves.append({"target": name, "block": block, "solver": h.solver, "damping": damping,
                           "residual": sol.residual, "tol": sol.tol, "converged": sol.converged,
                           "matvecs": sol.matvecs, "seconds": sol.seconds, **sol.info})
            column = f"influence_{name}" + ("" if block == "all" else f"_{block}")
            table[column if sol.converged else f"unconverged_{column}"] = (
                inf.fixed_point_influence(obj, theta, s).cpu().numpy())

        for target in targets:
            if target.fn is None:
                start = time.perf_counter()
                table["influence_self"] = inf.self_influence(obj, theta, damping, h.max_direct).cpu().numpy()
                solves.append({"target": "self", "block": "all", "solver": "direct (Cholesky)", "damping": damping,
                               "seconds": time.perf_counter() - start})
                continue
            b = grad(target.fn)(theta)
            sol = inf.solve(h.solver, obj, theta, b, damping, **opts)
            print(f"{target.name}: {h.solver} solve, relative residual {sol.residual:.2e}, {sol.matvecs} "
                  f"Hessian-vector products, {sol.seconds:.1f} s", flush=True)
            record(target.name, "all", sol, sol.x)
            if cfg.variants.per_layer:
                for layer, sl in blocks.items():
                    sol_l = inf.solve(h.solver, obj, theta, b[sl], damping, sl, **opts)
                    s = torch.zeros_like(b)
                    s[sl] = sol_l.x
                    record(target.name, layer, sol_l, s)
        _report_unconverged(solves, h.cg_tol)
        differentiable = [t for t in targets if t.fn is not None]
        if differentiable and _unrolled_wanted(cfg, flat, d, len(differentiable)):
            start = time.perf_counter()
            unrolled, _ = inf.unrolled_influence(
                flat, trained.init_theta, x, y, d.batch_order, trained.config.batch_size, trained.config.lr,
                trained.config.weight_decay, [t.fn for t in differentiable], max_bytes=cfg.variants.max_memory_gb * 1e9,
                progress=lambda m: print(m, flush=True))
            for t, row in zip(differentiable, unrolled.cpu().numpy()):
                table[f"unrolled_{t.name}"] = row
            solves.append({"target": "all", "block": "unrolled",
                           "solver": "reverse-mode replay", "seconds": time.perf_counter() - start})
        _log_influence(trained, table, targets, test, solves)
        if cfg.mode == "validate":
            _validate(cfg, trained, obj, theta, next(t for t in targets if t.fn is not None), table)
        return run.info.run_id


def choose_damping(cfg: InfluenceConfig, obj: inf.Objective, theta: torch.Tensor) -> float:
    """The damping every solve of this run uses: as given, or (damping=auto) none where H is positive
    definite and otherwise just enough to make it so (`analysis.influence.auto_damping`); logged as the
    metric `damping`, with `min_eigenvalue` (and its residual) when it was chosen."""
    given = cfg.hessian.damping_value()
    if given is not None:
        mlflow_io.log_metrics({"damping": given}, step=0)
        return given
    spec = inf.auto_damping(obj, theta, seed=cfg.train.seed)
    mlflow_io.log_metrics({"damping": spec.damping, "min_eigenvalue": spec.min_eigenvalue,
                           "min_eigenvalue_residual": spec.residual, "min_eigenvalue_seconds": spec.seconds}, step=0)
    verdict = ("positive definite: no damping" if spec.damping == 0 else
               f"not positive definite: damping {spec.damping:.3e}")
    print(f"smallest eigenvalue of the Hessian: {spec.min_eigenvalue:.3e} (+- {spec.residual:.1e}, {spec.matvecs} "
          f"Hessian-vector products, {spec.seconds:.1f} s): {verdict}", flush=True)
    return spec.damping


def _report_unconverged(solves: list[dict], tol: float) -> None:
    """A solve above its tolerance is not a result: say so on stderr and in the tag
    sample_importance.unconverged (its residual is the metric residual_<target>_<block>)."""
    bad = [r for r in solves if r.get("converged") is False]
    if not bad:
        return
    text = "; ".join(f"{r['target']}/{r['block']}: residual {r['residual']:.2e}" for r in bad)
    print(f"WARNING: {len(bad)} solve(s) did not converge to cg_tol={tol:g} ({text}); their influence.csv columns are "
          "named unconverged_influence_... and are not results: raise cg_maxiter, use damping=auto or a larger "
          "damping.", file=sys.stderr, flush=True)
    mlflow_io.set_tags({"sample_importance.unconverged": text[:4000]})


def _unrolled_wanted(cfg: InfluenceConfig, flat: inf.Flat, d: dyn.Dynamics, targets: int) -> bool:
    if cfg.variants.unrolled == 0:
        return False
    steps = d.batch_order.shape[0] * -(-d.metadata["n"] // d.metadata["batch_size"])
    need = inf.unrolled_memory_bytes(flat.size, steps, targets=targets)
    if cfg.variants.unrolled == -1 and need > cfg.variants.max_memory_gb * 1e9:
        print(f"skipping the unrolled influence: it needs about {need / 1e9:.1f} GB, more than max_memory_gb="
              f"{cfg.variants.max_memory_gb:g} (unrolled=1 insists and says so)", flush=True)
        return False
    return True


def _log_influence(trained: Trained, table: pd.DataFrame, targets: list[inf.Target],
                   test: np.ndarray, solves: list[dict]) -> None:
    """influence.csv, solver table, correlations with importance and NLL, the figures."""
    from scipy.stats import spearmanr

    metrics = {}
    mlflow_io.log_table(table, "influence.csv")
    mlflow_io.log_table(pd.DataFrame(solves), "solves.csv")
    mlflow_io.log_dict({"test_ids": test.tolist(), "targets": {t.name: t.description for t in targets},
                        "train_run_id": trained.run_id,
                        "sign": "influence = dT/dv_i at v = 1; removing sample i changes T by about -influence"},
                       "targets.json")
    shape = trained.dynamics.metadata["image_shape"]
    for t in targets:
        if f"influence_{t.name}" not in table:  # its solve did not converge: no figures or correlations
            continue
        col = table[f"influence_{t.name}"].to_numpy()
        metrics[f"spearman_tau_{t.name}"] = float(spearmanr(np.abs(col), table["total_importance"]).statistic)
        metrics[f"spearman_nll_{t.name}"] = float(spearmanr(np.abs(col), table["final_nll"]).statistic)
        order = np.argsort(col)
        helpful, harmful = order[:8], order[::-1][:8]
        mlflow_io.log_figure(plots.influence_images(as_images(trained.data.x_train[helpful], shape),
                                                    as_images(trained.data.x_train[harmful], shape),
                                                    col[helpful], col[harmful], t.name),
                             f"figures/top_{t.name}.png")
        panels = [{"x": table["total_importance"], "y": np.abs(col), "xlabel": r"total importance $\tau_i$",
                   "ylabel": "|influence|", "title": f"{t.name}: |influence| vs importance", "diagonal": False},
                  {"x": table["final_nll"], "y": np.abs(col), "xlabel": "final NLL", "ylabel": "|influence|",
                   "title": f"{t.name}: |influence| vs final NLL", "diagonal": False}]
        if f"unrolled_{t.name}" in table:
            unrolled = table[f"unrolled_{t.name}"].to_numpy()
            metrics[f"pearson_fixed_unrolled_{t.name}"] = float(np.corrcoef(col, unrolled)[0, 1])
            panels.append({"x": col, "y": unrolled, "xlabel": "fixed-point influence (eq. 5)",
                           "ylabel": "unrolled influence", "title": f"{t.name}: fixed point vs trajectory"})
        if t.name == "test_loss" and "inrun_contribution" in table:  # the same target, attributed in the run
            c = table["inrun_contribution"].to_numpy()
            for method, values in (("fixed", col), ("unrolled", table.get("unrolled_test_loss"))):
                if values is not None:
                    values = np.asarray(values)
                    metrics[f"pearson_inrun_{method}_test_loss"] = float(np.corrcoef(c, values)[0, 1])
                    metrics[f"spearman_inrun_{method}_test_loss"] = float(spearmanr(c, values).statistic)
                    panels.append({"x": values, "y": c, "xlabel": f"{method} influence", "ylabel": "in-run contribution",
                                   "title": f"test_loss: {method} influence vs in-run"})
        fig = plots.scatter_panels(panels)
        for ax in fig.axes[:2]:
            ax.set(xscale="log", yscale="log")
        mlflow_io.log_figure(fig, f"figures/influence_{t.name}.png")
    for row in solves:
        key = f"{row['target']}_{row['block']}"
        metrics[f"seconds_{key}"] = row["seconds"]
        if "residual" in row:
            metrics[f"residual_{key}"] = row["residual"]
    mlflow_io.log_metrics(metrics, step=0)


def _validate(cfg: InfluenceConfig, trained: Trained, obj: inf.Objective, theta: torch.Tensor,
              target: inf.Target, table: pd.DataFrame) -> None:
    """Predicted against actual changes of T for the most influential and random samples:
    replayed SGD with v_i = 1 - small_change and with v_i = 0 (float64, same init and order), and
    warm-started leave-one-out L-BFGS from theta* (both the base and the run without i continue
    for loo_steps iterations, so the difference is the sample's, not the optimiser's)."""
    unrolled = table.get(f"unrolled_{target.name}")
    fixed = table.get(f"influence_{target.name}")  # None when its solve did not converge: not validated
    chooser = next(c for c in (fixed, unrolled, table.get(f"unconverged_influence_{target.name}")) if c is not None)
    fixed = np.full(len(table), np.nan) if fixed is None else fixed.to_numpy()
    top, rnd = _chosen(np.asarray(chooser), cfg.validation.num_validate, cfg.train.seed)
    chosen = np.concatenate([top, rnd])
    n = len(fixed)
    order = np.asarray(trained.dynamics.batch_order)
    tcfg = trained.config
    data = trained.data
    t0 = float(target.fn(retrained_parameters(tcfg, data, trained.init_state, order)))
    base, _, base_grad = inf.polish(obj, theta, cfg.validation.loo_steps)
    t_base = float(target.fn(base))
    print(f"validating on {len(chosen)} samples: 2 replays and 1 leave-one-out each "
          f"(base gradient norm after {cfg.validation.loo_steps} L-BFGS steps: {base_grad:.2e})", flush=True)
    rows = []
    for k, i in enumerate(chosen):
        w = np.ones(n)
        w[i] = 1.0 - cfg.validation.small_change
        small = float(target.fn(retrained_parameters(tcfg, data, trained.init_state, order, w))) - t0
        w[i] = 0.0
        removal = float(target.fn(retrained_parameters(tcfg, data, trained.init_state, order, w))) - t0
        wt = torch.ones(n, dtype=torch.float64, device=theta.device)
        wt[i] = 0.0
        loo_theta, _, loo_grad = inf.polish(obj, base, cfg.validation.loo_steps, weight=wt)
        rows.append({"sample_id": int(i), "group": "top" if k < len(top) else "random",
                     "influence_fixed": fixed[i], "influence_unrolled": np.nan if unrolled is None else unrolled[i],
                     "actual_small": small, "actual_removal": removal,
                     "actual_loo": float(target.fn(loo_theta)) - t_base, "loo_grad_norm": loo_grad})
        print(f"  sample {i}: predicted removal {-fixed[i]:+.3e} (fixed point), actual: replay {removal:+.3e}, "
              f"leave-one-out {rows[-1]['actual_loo']:+.3e}", flush=True)
    val = pd.DataFrame(rows)
    mlflow_io.log_table(val, "validation.csv")
    results = []
    for method in ("fixed", "unrolled"):
        if val[f"influence_{method}"].isna().any():
            continue
        panels = []
        for counterfactual, dv in (("small", -cfg.validation.small_change), ("removal", -1.0), ("loo", -1.0)):
            predicted = dv * val[f"influence_{method}"].to_numpy()
            actual = val[f"actual_{counterfactual}"].to_numpy()
            stats = inf.agreement(predicted, actual)
            results.append({"method": method, "counterfactual": counterfactual, **stats})
            mlflow_io.log_metrics({f"{method}_vs_{counterfactual}_{k}": v for k, v in stats.items() if k != "n"},
                                  step=0)
            panels.append({"x": predicted, "y": actual, "xlabel": f"predicted ({method})",
                           "ylabel": f"actual ({counterfactual})",
                           "title": f"{method} vs {counterfactual}: Pearson {stats['pearson']:.3f}"})
        mlflow_io.log_figure(plots.scatter_panels(panels), f"figures/validation_{method}.png")
    mlflow_io.log_table(pd.DataFrame(results), "validation_summary.csv")
    for r in results:
        print(f"{r['method']:>8} vs {r['counterfactual']:<7}: Pearson {r['pearson']:.3f}  Spearman "
              f"{r['spearman']:.3f}  sign agreement {r['sign_agreement']:.2f}", flush=True)


def _breakdown(cfg: InfluenceConfig) -> None:
    """For each (lr, epochs): train from the seed's initialisation in float64, take the unrolled
    influence on the test-loss target, replay with v_i = 1 - change for the chosen samples and
    correlate the predicted change (-change x influence) with the replayed one."""
    data = training_data(cfg.train)
    dev = resolve_device(cfg.train.device)
    test = target_set(data, cfg)
    xt = torch.as_tensor(data.x_test[test], dtype=torch.float64, device=dev)
    yt = torch.as_tensor(data.y_test[test], device=dev)
    x = torch.as_tensor(data.x_train, dtype=torch.float64, device=dev)
    y = torch.as_tensor(data.y_train, device=dev)
    changes = parse_floats(cfg.validation.breakdown_changes, "breakdown_changes")
    rows, samples = [], []
    for lr in parse_floats(cfg.validation.breakdown_lrs, "breakdown_lrs"):
        for epochs in [int(e) for e in parse_floats(cfg.validation.breakdown_epochs, "breakdown_epochs")]:
            tcfg = dataclasses.replace(cfg.train, lr=lr, epochs=epochs)
            model = model_for(tcfg, data).double()
            init = {k: v.clone() for k, v in model.state_dict().items()}
            flat = inf.Flat(model.to(dev))
            target = inf.make_target("test_loss", flat, xt, yt)
            order = shuffled_orders(data.n_train, epochs, tcfg.seed)
            influence, _ = inf.unrolled_influence(flat, flat.of_model(), x, y, order, tcfg.batch_size, lr,
                                                  tcfg.weight_decay, [target.fn], max_bytes=cfg.variants.max_memory_gb * 1e9)
            influence = influence[0].cpu().numpy()
            # The baseline goes through the same retraining code as the counterfactuals, so their
            # difference is the weight change alone.
            t0 = float(target.fn(retrained_parameters(tcfg, data, init, order)))
            chosen = np.concatenate(_chosen(influence, cfg.validation.num_validate, cfg.train.seed))
            for change in changes:
                actual = []
                for i in chosen:
                    w = np.ones(data.n_train)
                    w[i] = 1.0 - change
                    actual.append(float(target.fn(retrained_parameters(tcfg, data, init, order, w))) - t0)
                predicted = -change * influence[chosen]
                stats = inf.agreement(predicted, np.array(actual))
                rows.append({"lr": lr, "epochs": epochs, "change": change, **stats})
                samples += [{"lr": lr, "epochs": epochs, "change": change, "sample_id": int(i), "predicted": p,
                             "actual": a} for i, p, a in zip(chosen, predicted, actual)]
                print(f"lr {lr:g}, {epochs} epochs, change {change:g}: Pearson {stats['pearson']:.3f}, sign "
                      f"agreement {stats['sign_agreement']:.2f}", flush=True)
    table = pd.DataFrame(rows)
    mlflow_io.log_table(table, "breakdown.csv")
    mlflow_io.log_table(pd.DataFrame(samples), "breakdown_samples.csv")
    mlflow_io.log_figure(plots.breakdown_curves(table), "figures/breakdown.png")
