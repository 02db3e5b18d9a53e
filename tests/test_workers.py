"""A multi-run stage shared by workers (`workers.share`): each run trained once over all of them,
a dead worker's claim taken over, the comparison done once."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import mlflow
import optuna
import pandas as pd
import pytest
import sqlalchemy.exc
from mlflow.tracking import MlflowClient

from conftest import REPO, start_mlflow_server, stop
from sample_importance import workers
from sample_importance.config import ORDERINGS

pytestmark = pytest.mark.integration  # real processes, stores, servers or trained runs

ARGS = ["--subset", "100", "--epochs", "4", "--width", "8", "--batch_size", "25", "--num_seeds", "1", "--device", "cpu"]


def _worker(tmp_path, uri, *args):
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, str(REPO / "entry_points" / "ordering.py"), *ARGS, *args],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _runs(client):
    return [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id], max_results=1000)]


def _claimed_by(storage: optuna.storages.BaseStorage, pid: int, after: int):
    """A running claim of the process `pid` whose MLflow run exists, once `after` runs of its study
    are complete, if any. One storage object polled again and again: a new one per poll would open
    new database connections faster than they are given back."""
    for summary in optuna.get_all_study_summaries(storage):
        if not summary.study_name.startswith("runs-"):
            continue
        trials = optuna.load_study(study_name=summary.study_name, storage=storage).trials
        if sum(t.state == optuna.trial.TrialState.COMPLETE for t in trials) < after:
            continue
        for t in trials:
            if (t.state == optuna.trial.TrialState.RUNNING and t.user_attrs.get(workers.ATTR_OWNER, "").endswith(f":{pid}")
                    and workers.ATTR_RUN in t.user_attrs):
                return summary.study_name, t
    return None


def test_jobs_are_shared_once_and_a_dead_worker_s_job_is_retried():
    """The claim protocol alone, in one process on an in-memory storage: a job whose worker died
    (a RUNNING trial failed with no error) is enqueued again and done; a job that raised is not
    retried in the same invocation, and its error is raised once nothing else is left."""
    storage = optuna.storages.InMemoryStorage()
    study = optuna.create_study(study_name="jobs", storage=storage)
    study.enqueue_trial({}, user_attrs={workers.ATTR_JOB: 1})
    dead = study.ask()  # a worker claimed job 1 and died
    study._storage.set_trial_state_values(dead._trial_id, optuna.trial.TrialState.FAIL)
    done = []
    assert workers.share("jobs", storage, 60, 3, lambda k, record: done.append(k)) == done
    assert sorted(done) == [0, 1, 2]
    assert workers.share("jobs", storage, 60, 3, lambda k, record: done.append(k)) == []  # all complete already

    def fails_on_2(k, record):
        if k == 2:
            raise ValueError("job 2 is bad")
        done.append(k)

    done.clear()
    with pytest.raises(ValueError, match="job 2 is bad"):
        workers.share("other", storage, 60, 4, fails_on_2)
    assert sorted(done) == [0, 1, 3]
    with pytest.raises(ValueError, match="job 2 is bad"):  # a new invocation tries it again
        workers.share("other", storage, 60, 4, fails_on_2)


def test_two_ordering_workers_on_postgresql_share_the_runs_and_survive_a_killed_worker(tmp_path, postgres, tracking):
    """Two `ordering` workers (1 seed x 8 methods) against one PostgreSQL storage and one `mlflow
    server` on PostgreSQL; one is SIGKILLed while it trains a claimed run. The other takes the claim
    over and finishes: each variant exists once as a finished run, the registry has 8 versions,
    and the comparison (done once) equals a one-worker run's."""
    import ordering

    one_worker = ordering.main(ARGS + ["--storage", str(tracking / "single.log")])  # its own stores
    single = pd.read_csv(mlflow.artifacts.download_artifacts(f"runs:/{one_worker}/final_test_error.csv"))

    name = tmp_path.name.lower().replace("-", "_")[-40:]
    storage = postgres(f"optuna_{name}")
    (tmp_path / "server").mkdir()
    proc, server, log = start_mlflow_server(tmp_path / "server", postgres(f"mlflow_{name}"))
    shared = ["--storage", storage, "--heartbeat", "1"]
    mlflow.set_tracking_uri(server)
    try:
        client = MlflowClient()
        first, second = _worker(tmp_path, server, *shared), _worker(tmp_path, server, *shared)
        deadline, claim, store = time.time() + 240, None, None
        while claim is None:
            assert time.time() < deadline and first.poll() is None, first.stdout.read() if first.poll() else "no claim"
            try:
                store = store or optuna.storages.RDBStorage(storage)  # once the workers made the schema
                claim = _claimed_by(store, first.pid, after=3)  # the workers have shared some runs
            except (KeyError, optuna.exceptions.StorageInternalError, sqlalchemy.exc.SQLAlchemyError):
                pass  # the schema or the study is being created
            time.sleep(0.2)
        store.engine.dispose()
        first.send_signal(signal.SIGKILL)
        first.wait()
        out = second.communicate(timeout=500)[0]
        assert second.returncode == 0, out

        study_name, killed = claim
        trials = optuna.load_study(study_name=study_name, storage=storage).trials
        assert trials[killed.number].state == optuna.trial.TrialState.FAIL
        job = killed.user_attrs[workers.ATTR_JOB]
        retaken = [t for t in trials if t.user_attrs.get(workers.ATTR_JOB) == job
                   and t.state == optuna.trial.TrialState.COMPLETE]
        assert len(retaken) == 1 and retaken[0].user_attrs[workers.ATTR_OWNER].endswith(f":{second.pid}")

        runs = _runs(client)
        finished = [r for r in runs if r.data.tags.get("sample_importance.entry_point") == "train"
                    and r.info.status == "FINISHED"]
        variants = sorted((r.data.params["ordering"], r.data.params["seed"]) for r in finished)
        assert variants == sorted((m, "0") for m in ORDERINGS)  # each once
        assert not [r for r in runs if r.info.status == "RUNNING"]
        assert len(client.search_model_versions("name = 'ordering-digits'")) == len(ORDERINGS)
        parents = [r for r in runs if r.data.tags.get("sample_importance.entry_point") == "ordering"
                   and r.info.status == "FINISHED"]
        assert len(parents) == 1  # the killed worker's run failed; the comparison was made once
        table = pd.read_csv(mlflow.artifacts.download_artifacts(f"runs:/{parents[0].info.run_id}/final_test_error.csv"))
        pd.testing.assert_frame_equal(table, single)
    finally:
        mlflow.set_tracking_uri(None)
        stop(proc, log)


def test_one_stability_worker_with_a_storage_behaves_as_without(tracking):
    """One worker with a journal storage trains the seeds and writes the comparison itself; the same
    command again finds it done and points its run at the one with the results."""
    import stability

    args = ["--subset", "100", "--epochs", "2", "--width", "8", "--batch_size", "50", "--num_seeds", "2",
            "--every", "1", "--storage", str(tracking / "claims.log")]
    first = stability.main(args)
    client = MlflowClient()
    assert client.get_run(first).data.tags["sample_importance.entry_point"] == "stability"
    assert {f.path for f in client.list_artifacts(first)} >= {"stability.csv", "claims.json"}
    again = stability.main(args)
    tags = client.get_run(again).data.tags
    assert tags["sample_importance.entry_point"] == "stability-worker"
    assert tags["sample_importance.aggregated_in"] == first
    trains = [r for r in _runs(client) if r.data.tags.get("sample_importance.entry_point") == "train"]
    assert len(trains) == 2  # trained once
