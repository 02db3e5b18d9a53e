"""The `sweep` entry point: Optuna trials as nested MLflow runs, resumable, shared by workers."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import mlflow
import optuna
import pytest
from mlflow.tracking import MlflowClient

from conftest import REPO, all_runs, start_mlflow_server, stop

pytestmark = pytest.mark.integration  # real processes, stores, servers or trained runs

TINY = ["--subset", "150", "--epochs", "3", "--width", "8", "--batch_size", "50"]


def _by_kind(runs, kind):
    return [r for r in runs if r.data.tags.get("sample_importance.entry_point") == kind]


def test_sweep_nested_runs_and_resume(tracking):
    import sweep

    parent = sweep.main(TINY + ["--n_trials", "3", "--pruner", "none"])
    study = optuna.load_study(study_name="sweep-digits", storage=optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(tracking / "optuna-journal.log"))))
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.COMPLETE] * 3
    runs = all_runs(tracking)
    trials = _by_kind(runs, "trial")
    assert len(trials) == 3 and all(r.data.tags["mlflow.parentRunId"] == parent for r in trials)
    assert {t.user_attrs["mlflow_run_id"] for t in study.trials} == {r.info.run_id for r in trials}
    for t in study.trials:
        run = next(r for r in trials if r.info.run_id == t.user_attrs["mlflow_run_id"])
        assert run.data.metrics["final_test_error"] == pytest.approx(t.value)
        assert float(run.data.params["lr"]) == pytest.approx(t.params["lr"])
        assert 0.01 <= t.params["lr"] <= 0.5
        seeds = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == run.info.run_id]
        assert sorted(r.data.params["seed"] for r in seeds) == ["0", "1"]  # two seeds per trial, nested
        assert -1 <= run.data.metrics["tau_spearman_seeds"] <= 1 and -1 <= run.data.metrics["tau_spearman_reference"] <= 1
    client = MlflowClient()
    files = {f.path for f in client.list_artifacts(parent, "figures")}
    assert files == {"figures/optimization_history.png", "figures/param_importances.png",
                     "figures/stability_vs_lr.png"}
    best = mlflow.artifacts.load_dict(f"runs:/{parent}/best_params.json")
    assert best["value"] == pytest.approx(min(t.value for t in study.trials))

    # Same command again: the same study and parent run, two more trials.
    assert sweep.main(TINY + ["--n_trials", "2", "--pruner", "none"]) == parent
    study = optuna.load_study(study_name="sweep-digits", storage=study._storage)
    assert len(study.trials) == 5
    assert len(_by_kind(all_runs(tracking), "trial")) == 5
    assert client.get_run(parent).data.metrics["trials_complete"] == 5


def test_pruned_trial_is_pruned_in_both_stores(tracking):
    import sweep

    # The median pruner prunes after two trials when a trial's curve is worse than the median.
    # (A database storage here, with heartbeats, where the other tests use the journal file.)
    storage = f"sqlite:///{tracking}/optuna.db"
    sweep.main(TINY + ["--n_trials", "6", "--lr_min", "0.001", "--lr_max", "1.0", "--seeds", "1",
                       "--storage", storage, "--heartbeat", "1"])
    study = optuna.load_study(study_name="sweep-digits", storage=storage)
    pruned = [t for t in study.trials if t.state == optuna.trial.TrialState.PRUNED]
    assert pruned, [t.state for t in study.trials]
    client = MlflowClient()
    for t in pruned:
        run = client.get_run(t.user_attrs["mlflow_run_id"])
        assert run.info.status == "KILLED" and run.data.tags["sample_importance.trial_state"] == "PRUNED"


def test_a_diverging_trial_fails_and_the_study_goes_on(tracking):
    import sweep

    # Logistic regression whose weight-decay step overshoots at these learning rates (see
    # test_resilience): every trial diverges; each is FAIL in Optuna and FAILED in MLflow.
    args = ["--subset", "300", "--batch_size", "50", "--epochs", "8", "--depth", "0", "--weight_decay", "0.1",
            "--lr_min", "1000", "--lr_max", "2000", "--seeds", "1", "--reference_lr", "0.1", "--n_trials", "2"]
    sweep.main(args)
    study = optuna.load_study(study_name="sweep-digits", storage=optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(tracking / "optuna-journal.log"))))
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.FAIL] * 2
    client = MlflowClient()
    for t in study.trials:
        run = client.get_run(t.user_attrs["mlflow_run_id"])
        assert run.info.status == "FAILED" and "diverged" in run.data.tags["sample_importance.failure"]


BAD = [
    (["--lr_min", "0.5", "--lr_max", "0.1"], "lr_min (0.5) must be smaller than lr_max (0.1)"),
    (["--lr_min", "0", "--lr_max", "0.1"], "must be positive"),
    (["--metric", "accuracy"], "Unknown metric 'accuracy'"),
    (["--pruner", "hyperband"], "Unknown pruner 'hyperband'"),
    (["--storage", "postgresql://nobody:secret@127.0.0.1:9/none"], "Cannot open the Optuna storage"),
]


@pytest.mark.parametrize("args,message", BAD, ids=[a[1] for a, _ in BAD])
def test_bad_sweep_input_fails_before_any_trial(tracking, capsys, args, message):
    import sweep
    from _cli import run_cli

    with pytest.raises(SystemExit) as info:
        run_cli(lambda: sweep.main(TINY + ["--n_trials", "1", *args]))
    assert info.value.code == 2
    err = [l for l in capsys.readouterr().err.splitlines() if l.startswith("error: ")]
    assert len(err) == 1 and message in err[0], err
    assert all_runs(tracking) == []  # nothing started


def _worker(tmp_path, uri, *args):
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, str(REPO / "entry_points" / "sweep.py"), *TINY, *args],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _trial_accounting(study, client):
    """Each Optuna trial has exactly one MLflow trial run, and each MLflow trial run one trial."""
    runs = [r for r in client.search_runs([e.experiment_id for e in client.search_experiments()], max_results=1000)
            if r.data.tags.get("sample_importance.entry_point") == "trial"]
    by_number = {}
    for r in runs:
        by_number.setdefault(int(r.data.tags["optuna.trial"]), []).append(r)
    assert sorted(by_number) == [t.number for t in study.trials]
    assert all(len(v) == 1 for v in by_number.values()), "a trial logged twice"
    for t in study.trials:
        assert by_number[t.number][0].info.run_id == t.user_attrs["mlflow_run_id"]
    return {t.number: (t.state, by_number[t.number][0].info.status) for t in study.trials}


@pytest.fixture(params=["journal+sqlite", "postgresql"])
def shared_stores(request, tmp_path):
    """What workers on several machines share: an Optuna storage and an `mlflow server`. Either a
    journal file and a server on SQLite, or one real PostgreSQL server holding both (the README's
    multi-machine recipe with the host names changed). Yields (storage, tracking URL)."""
    if request.param == "postgresql":
        database = request.getfixturevalue("postgres")
        name = tmp_path.name.lower().replace("-", "_")[-40:]
        storage, backend = database(f"optuna_{name}"), database(f"mlflow_{name}")
    else:
        storage, backend = str(tmp_path / "shared.log"), f"sqlite:///{tmp_path}/server.db"
    proc, url, log = start_mlflow_server(tmp_path, backend)
    yield storage, url
    stop(proc, log)


def _load(name: str, storage: str) -> optuna.Study:
    if storage.endswith(".log"):
        storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(storage))
    return optuna.load_study(study_name=name, storage=storage)


def test_two_workers_share_one_study_through_a_tracking_server(tmp_path, shared_stores):
    storage, server = shared_stores
    args = ["--storage", storage, "--n_trials", "2", "--pruner", "none", "--study_name", "shared"]
    workers = [_worker(tmp_path, server, *args) for _ in range(2)]
    outputs = [w.communicate(timeout=400)[0] for w in workers]
    assert [w.returncode for w in workers] == [0, 0], outputs
    study = _load("shared", storage)
    mlflow.set_tracking_uri(server)
    try:
        states = _trial_accounting(study, MlflowClient())
    finally:
        mlflow.set_tracking_uri(None)
    assert len(states) == 4
    assert set(states.values()) == {(optuna.trial.TrialState.COMPLETE, "FINISHED")}
    lrs = [t.params["lr"] for t in study.trials]
    assert len(set(lrs)) == len(lrs), f"a learning rate was trained twice: {lrs}"  # trial-seeded sampler


def _wait_for_training_trial(worker, client, timeout: float = 120) -> None:
    """Until a trial's `train` run has logged an epoch."""
    deadline = time.time() + timeout
    while True:
        assert time.time() < deadline and worker.poll() is None, "no trial started"
        runs = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]
        trials = {r.info.run_id for r in _by_kind(runs, "trial")}
        if any(r.data.tags.get("mlflow.parentRunId") in trials and r.info.status == "RUNNING"
               and client.get_metric_history(r.info.run_id, "train_loss") for r in _by_kind(runs, "train")):
            return
        time.sleep(0.3)


def test_a_killed_worker_s_trial_is_failed_by_heartbeat_on_postgresql(tmp_path, postgres):
    """PostgreSQL as Optuna's storage and as the tracking server's backend: a worker killed with
    SIGKILL mid-trial stops beating; the next worker finds its trial stale (heartbeat, not the
    process-id check of journal files), fails it in both stores, and completes its own trials."""
    name = tmp_path.name.lower().replace("-", "_")[-40:]
    storage = postgres(f"optuna_{name}")
    proc, server, log = start_mlflow_server(tmp_path, postgres(f"mlflow_{name}"))
    args = ["--storage", storage, "--heartbeat", "1", "--n_trials", "2", "--pruner", "none", "--seeds", "1"]
    mlflow.set_tracking_uri(server)
    try:
        client = MlflowClient()
        first = _worker(tmp_path, server, *args, "--epochs", "40")  # long enough to be killed inside a trial
        _wait_for_training_trial(first, client)
        first.send_signal(signal.SIGKILL)
        first.wait()
        time.sleep(3)  # past the grace period (2 heartbeats)
        second = _worker(tmp_path, server, *args, "--epochs", "40")
        out = second.communicate(timeout=600)[0]
        assert second.returncode == 0, out
        assert "were interrupted" not in out  # found by its heartbeat, before the process-id check
        study = _load("sweep-digits", storage)
        states = _trial_accounting(study, client)
        assert states[0] == (optuna.trial.TrialState.FAIL, "FAILED")
        assert [states[1], states[2]] == [(optuna.trial.TrialState.COMPLETE, "FINISHED")] * 2
        killed = client.get_run(study.trials[0].user_attrs["mlflow_run_id"])
        assert "died" in killed.data.tags["sample_importance.failure"]  # the reason, whichever clean-up came first
        assert not [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])
                    if r.info.status == "RUNNING"]
    finally:
        mlflow.set_tracking_uri(None)
        stop(proc, log)


def test_a_single_worker_is_reproducible_and_workers_draw_apart():
    """Two workers of one study ask for a trial at the same moment: with one TPE seed each (as
    before) they draw the same learning rate; TrialSeededTPE draws from (seed, trial number), so
    they differ, and a single worker is reproducible."""
    from sample_importance.stages.sweep import TrialSeededTPE

    def two_workers(make_sampler):
        storage = optuna.storages.InMemoryStorage()
        a = optuna.create_study(study_name="s", storage=storage, sampler=make_sampler())
        b = optuna.load_study(study_name="s", storage=storage, sampler=make_sampler())
        ta, tb = a.ask(), b.ask()
        return ta.suggest_float("lr", 0.01, 0.5, log=True), tb.suggest_float("lr", 0.01, 0.5, log=True)

    same = two_workers(lambda: optuna.samplers.TPESampler(seed=0))
    assert same[0] == same[1]  # the duplication this sampler removes
    apart = two_workers(lambda: TrialSeededTPE(0))
    assert apart[0] != apart[1]
    assert two_workers(lambda: TrialSeededTPE(0)) == apart  # reproducible


def test_the_study_lives_beside_the_tracking_store_not_in_the_project(tmp_path):
    """`mlflow run <project> -e sweep` twice from another folder: one study with both calls' trials,
    kept beside that folder's mlflow.db; nothing written into the project checkout."""
    before = subprocess.run(["git", "status", "--porcelain", "--ignored"], cwd=REPO, capture_output=True,
                            text=True).stdout
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)  # the default store: mlflow.db where the command runs
    params = [x for a in ("n_trials=1", "pruner=none", "seeds=1", "subset=100", "epochs=2", "width=8",
                          "batch_size=50", "device=cpu") for x in ("-P", a)]
    for _ in range(2):
        proc = subprocess.run([sys.executable, "-m", "mlflow", "run", str(REPO), "-e", "sweep", "--env-manager",
                               "local", *params], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
    study = optuna.load_study(study_name="sweep-digits", storage=optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(tmp_path / "optuna-journal.log"))))
    assert len(study.trials) == 2
    after = subprocess.run(["git", "status", "--porcelain", "--ignored"], cwd=REPO, capture_output=True,
                           text=True).stdout
    new = set(after.splitlines()) - set(before.splitlines())
    assert not [line for line in new if "__pycache__" not in line], new


def test_kill_9_mid_trial_then_restart(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    args = ["--n_trials", "2", "--pruner", "none", "--seeds", "1"]
    slow = ["--epochs", "40"]  # long enough to be killed inside a trial
    worker = _worker(tmp_path, uri, *args, *slow)
    mlflow.set_tracking_uri(uri)
    client = MlflowClient()
    try:
        deadline = time.time() + 120
        while True:  # wait until a trial's training is under way
            assert time.time() < deadline and worker.poll() is None, "no trial started"
            runs = all_runs(tmp_path)
            trials = {r.info.run_id for r in _by_kind(runs, "trial")}
            running = [r for r in _by_kind(runs, "train") if r.data.tags.get("mlflow.parentRunId") in trials
                       and r.info.status == "RUNNING" and client.get_metric_history(r.info.run_id, "train_loss")]
            if running:
                break
            time.sleep(0.3)
        worker.send_signal(signal.SIGKILL)
        worker.wait()
        restarted = _worker(tmp_path, uri, *args, *slow)
        out = restarted.communicate(timeout=600)[0]
        assert restarted.returncode == 0, out
        assert "were interrupted (their worker died) and are marked failed" in out
        study = optuna.load_study(study_name="sweep-digits", storage=optuna.storages.JournalStorage(
            optuna.storages.journal.JournalFileBackend(str(tmp_path / "optuna-journal.log"))))
        states = _trial_accounting(study, client)
        assert states[0] == (optuna.trial.TrialState.FAIL, "FAILED")
        assert [states[1], states[2]] == [(optuna.trial.TrialState.COMPLETE, "FINISHED")] * 2
        runs = all_runs(tmp_path)
        assert not [r for r in runs if r.info.status == "RUNNING"]
        assert [r.info.status for r in _by_kind(runs, "sweep")] == ["FINISHED", "FINISHED"]
    finally:
        mlflow.set_tracking_uri(None)
