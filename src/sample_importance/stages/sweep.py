"""The `sweep` stage: Optuna search over the learning rate, tracked in MLflow, resumable, shared by workers.

One Optuna study (its storage: a journal file on one machine, a database across machines) and one
MLflow parent run per study, whose id the study keeps as a user attribute. Each trial is a child
run of that parent, and each of its seeds a `train` run nested under the trial. Any number of
workers (`sweep` processes) can share a study; running the command again adds trials.
"""
from __future__ import annotations

import dataclasses
import time
from itertools import combinations

import warnings

import numpy as np
import optuna
from scipy.stats import spearmanr

from .. import liveness, mlflow_io, plots, workers
from ..config import SWEEP_METRICS, SweepConfig
from ..errors import Stopped
from ..training import DivergenceError
from ..runs import get_or_train, run_train

warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)  # matplotlib plots

ATTR_PARENT = "mlflow_parent_run_id"


class TrialSeededTPE(optuna.samplers.BaseSampler):
    """Optuna's TPE sampler, its random stream seeded anew for every trial from (sampler_seed, trial
    number). Trial numbers are unique across the workers of a study, so parallel or restarted workers
    draw different learning rates instead of the same ones; one worker alone stays reproducible.
    (TPE keeps no state between trials but its random generator: it reads the history from the study.)"""

    def __init__(self, seed: int):
        self.seed = seed
        self._tpe = optuna.samplers.TPESampler(seed=seed)

    def before_trial(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        trial_seed = int(np.random.SeedSequence([self.seed, trial.number]).generate_state(1)[0])
        self._tpe = optuna.samplers.TPESampler(seed=trial_seed)
        self._tpe.before_trial(study, trial)

    def infer_relative_search_space(self, study, trial):
        return self._tpe.infer_relative_search_space(study, trial)

    def sample_relative(self, study, trial, search_space):
        return self._tpe.sample_relative(study, trial, search_space)

    def sample_independent(self, study, trial, param_name, param_distribution):
        return self._tpe.sample_independent(study, trial, param_name, param_distribution)

    def after_trial(self, study, trial, state, values) -> None:
        self._tpe.after_trial(study, trial, state, values)


def open_study(cfg: SweepConfig) -> optuna.Study:
    """Create or load the study; one clear error when the storage cannot be reached."""
    sampler = TrialSeededTPE(cfg.sampler_seed)
    pruner = optuna.pruners.MedianPruner(n_startup_trials=2) if cfg.pruner == "median" else optuna.pruners.NopPruner()
    return workers.open_study(cfg.name(), cfg.storage, cfg.heartbeat, sampler=sampler, pruner=pruner,
                              direction="minimize")


def tau_spearman(taus: list[np.ndarray]) -> float:
    """Mean Spearman correlation of total importance over all pairs of runs (nan for one run)."""
    pairs = [spearmanr(a, b).statistic for a, b in combinations(taus, 2)]
    return float(np.mean(pairs)) if pairs else float("nan")


def run(cfg: SweepConfig) -> str:
    """Add cfg.n_trials trials to the study; returns the study's MLflow parent run id."""
    cfg.check()
    study = open_study(cfg)  # before any run: a bad storage fails here, leaving nothing behind
    seeds = cfg.seed_list()
    with mlflow_io.start_run(f"sweep {cfg.name()}", "sweep", tags={"sample_importance.study": cfg.name()},
                             description=f"Optuna study {cfg.name()}: lr in [{cfg.lr_min}, {cfg.lr_max}] "
                                         f"(log-uniform), seeds {seeds}, minimising {cfg.metric}.",
                             config=cfg.to_dict()) as run:
        parent = _claim_parent(study, run.info.run_id)
        if parent != run.info.run_id:
            mlflow_io.set_tags({"sample_importance.sweep_parent_run_id": parent})
            print(f"continuing study {cfg.name()} under parent run {parent}", flush=True)
        failed = workers.fail_orphaned_trials(study)
        if failed:
            print(f"trials {failed} were interrupted (their worker died) and are marked failed", flush=True)
        reference = _reference_tau(cfg, seeds[0])

        def objective(trial: optuna.Trial) -> float:
            return _trial(cfg, trial, parent, seeds, reference)

        # A learning rate that diverges is a finding, not a crash: that trial FAILs and the study goes on.
        study.optimize(objective, n_trials=cfg.n_trials or None, timeout=cfg.timeout or None,
                       catch=(DivergenceError,), gc_after_trial=True)
        _log_study(study, parent, cfg)
        return parent


def _claim_parent(study: optuna.Study, run_id: str) -> str:
    """The study's parent run: the first invocation's run. Workers starting at once may both write
    the attribute; after a short wait everyone reads the same (last) value and uses it."""
    parent = study.user_attrs.get(ATTR_PARENT)
    if parent is None:
        study.set_user_attr(ATTR_PARENT, run_id)
        time.sleep(1.0)
        parent = optuna.load_study(study_name=study.study_name, storage=study._storage).user_attrs[ATTR_PARENT]
    return parent


def _reference_tau(cfg: SweepConfig, seed: int) -> np.ndarray:
    """Total importance of a run at the reference learning rate (reused if one exists)."""
    ref = dataclasses.replace(cfg.train_config(), lr=cfg.reference_lr, seed=seed)
    run_id = mlflow_io.find_finished_run("train", ref.fingerprint())
    while run_id is None:
        try:
            print(f"training the reference run (lr={cfg.reference_lr}, seed {seed})", flush=True)
            run_id = run_train(ref, quiet=True)
        except liveness.RunBusyError:  # another worker trains it right now: use its run
            print("another worker trains the reference run; waiting for it", flush=True)
            run_id = mlflow_io.wait_for_finished_run("train", ref.fingerprint())
    return mlflow_io.load_dynamics(run_id).total_importance


def _trial(cfg: SweepConfig, trial: optuna.Trial, parent: str, seeds: list[int], reference: np.ndarray) -> float:
    lr = trial.suggest_float("lr", cfg.lr_min, cfg.lr_max, log=True)
    run_id = mlflow_io.create_run(parent, f"trial {trial.number} lr={lr:.4g}",
                                  {"sample_importance.entry_point": "trial", "optuna.study": cfg.name(),
                                   "optuna.trial": str(trial.number)})
    trial.set_user_attr(workers.ATTR_RUN, run_id)
    trial.set_user_attr(workers.ATTR_OWNER, liveness.owner())
    per_epoch = SWEEP_METRICS[cfg.metric]
    try:
        with mlflow_io.start_run(f"trial {trial.number} lr={lr:.4g}", "trial", run_id=run_id):
            mlflow_io.log_params_once({"lr": lr, "seeds": ",".join(map(str, seeds)), "trial": trial.number})
            def report(group: int, epoch: int, rows: list[dict[str, float]]) -> None:
                # The mean over the seeds trained together; groups one after another on one axis.
                trial.report(float(np.mean([r[per_epoch] for r in rows])), group * cfg.epochs + epoch + 1)
                if trial.should_prune():
                    raise Stopped(f"trial {trial.number} pruned at epoch {epoch + 1}")

            ids = get_or_train([dataclasses.replace(cfg.train_config(), lr=lr, seed=seed) for seed in seeds],
                               cfg.parallel_models, verbose=False, epoch_callback=report)
            values = [mlflow_io.metric_series(i, cfg.metric)[-1] for i in ids]
            taus = [mlflow_io.load_dynamics(i).total_importance for i in ids]
            value = float(np.mean(values))
            rho_seeds = tau_spearman(taus)
            rho_ref = float(spearmanr(taus[0], reference).statistic)
            mlflow_io.log_metrics({cfg.metric: value, "tau_spearman_seeds": rho_seeds,
                                   "tau_spearman_reference": rho_ref}, step=0)
            mlflow_io.set_tags({"sample_importance.trial_state": "COMPLETE"})
            trial.set_user_attr("tau_spearman_seeds", rho_seeds)
            trial.set_user_attr("tau_spearman_reference", rho_ref)
    except Stopped:
        mlflow_io.log_to(run_id, tags={"sample_importance.trial_state": "PRUNED"})
        print(f"trial {trial.number} (lr={lr:.4g}) pruned", flush=True)
        raise optuna.TrialPruned() from None
    print(f"trial {trial.number}: lr={lr:.4g} {cfg.metric}={value:.4f} tau Spearman between seeds "
          f"{rho_seeds:.3f}, with lr={cfg.reference_lr} {rho_ref:.3f}", flush=True)
    return value


def _log_study(study: optuna.Study, parent: str, cfg: SweepConfig) -> None:
    """Figures and the best parameters on the parent run, from every trial of every worker so far."""
    from optuna.visualization import matplotlib as ovm

    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    counts = {s.name.lower(): len(study.get_trials(deepcopy=False, states=(s,))) for s in optuna.trial.TrialState}
    metrics = {f"trials_{k}": v for k, v in counts.items()}
    figures, dicts = {}, {}
    if complete:
        best = study.best_trial
        metrics.update({f"best_{cfg.metric}": best.value, "best_lr": best.params["lr"]})
        dicts["best_params.json"] = {"trial": best.number, "value": best.value, **best.params,
                                     "mlflow_run_id": best.user_attrs.get(workers.ATTR_RUN)}
        figures["figures/optimization_history.png"] = ovm.plot_optimization_history(study).figure
        figures["figures/stability_vs_lr.png"] = plots.stability_vs_lr(
            [t.params["lr"] for t in complete], [t.user_attrs.get("tau_spearman_seeds", np.nan) for t in complete],
            [t.user_attrs.get("tau_spearman_reference", np.nan) for t in complete], cfg.reference_lr)
    if len(complete) >= 2:
        try:
            figures["figures/param_importances.png"] = ovm.plot_param_importances(study).figure
        except (RuntimeError, ValueError) as exc:  # e.g. every trial at the same value
            print(f"parameter importances not plotted: {exc}", flush=True)
    mlflow_io.log_to(parent, metrics=metrics, figures=figures, dicts=dicts, step=len(study.trials))
    if parent != mlflow_io.active_run_id():
        mlflow_io.finish_if_ended(parent)  # a parent whose first worker died: finished as of now
