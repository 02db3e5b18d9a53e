"""Work shared by several worker processes through an Optuna storage (a journal file on one machine,
a database across machines): the sweep's trials, and the runs of a multi-run stage, each claimed by
one worker. Optuna's storage is the only shared state and its trials the only claims; its heartbeats
(database storages) or the worker's process id (journal files) tell a dead worker's claim.

A job list is a study whose trials are claims: trial t holds `job` = k. A worker enqueues a trial for
every job that has no live one (waiting, running or complete), pops one waiting trial at a time
(`study.optimize(n_trials=1)`: Optuna moves a trial from waiting to running atomically, and keeps its
heartbeat while the job runs), and does the job unless a trial of the same job with a lower number is
live (two workers that enqueued the same job at once: the lower number does it, the other steps
aside). A job whose worker died is enqueued again by the next worker that looks; one that raised an
error is not retried in this invocation (its error is raised once nothing is left to do), but is by
the next invocation of the command."""
from __future__ import annotations

import os
import time
import warnings
from pathlib import Path
from typing import Callable

import optuna

from . import liveness, mlflow_io
from .errors import ConfigError

warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)  # heartbeats, enqueue attrs

ATTR_RUN = "mlflow_run_id"  # the MLflow run a trial writes (failed with the trial when its worker dies)
ATTR_OWNER = "owner"  # host:pid of the worker running the trial
ATTR_JOB = "job"  # the job a trial claims
ATTR_ERROR = "error"  # why a job failed (a dead worker leaves none)
DEFAULT_JOURNAL = "optuna-journal.log"  # in the results folder (`results_folder`)
TrialState = optuna.trial.TrialState
LIVE = (TrialState.WAITING, TrialState.RUNNING, TrialState.COMPLETE)


def results_folder() -> Path:
    """Where this user's results live: the folder of the tracking store when it is a local SQLite
    file (as by default: `mlflow.db` where the command was started, also under `mlflow run`, which
    passes the store on), else a per-user folder ($XDG_DATA_HOME or ~/.local/share/sample-importance)."""
    uri = mlflow_io.tracking_uri()
    if uri.startswith("sqlite:///"):
        return Path(uri.removeprefix("sqlite:///")).expanduser().resolve().parent
    return Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share") / "sample-importance"


def journal_path(storage: str) -> Path:
    """The journal file of a journal storage (empty = the default `optuna-journal.log`): a relative
    path is taken from the results folder, never from the working directory of the entry point (which
    under `mlflow run` is the project checkout, perhaps a temporary one)."""
    path = Path((storage or DEFAULT_JOURNAL).removeprefix("journal:")).expanduser()
    return path if path.is_absolute() else results_folder() / path


def open_storage(url: str | optuna.storages.BaseStorage, heartbeat: int):
    """The Optuna storage at `url` (empty = the default journal file; a storage object as it is);
    one clear error when it cannot be used."""
    if isinstance(url, optuna.storages.BaseStorage):
        return url
    url = url or DEFAULT_JOURNAL
    if url.startswith("journal:") or url.endswith((".log", ".journal")):
        path = journal_path(url)
        path.parent.mkdir(parents=True, exist_ok=True)
        # A journal file is safe for several writers on one machine (file locks).
        return optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(path)))
    if "://" not in url:
        raise ConfigError(f"storage {url!r} is neither a journal file (*.log) nor a database URL "
                          "(e.g. postgresql://user:pass@host/db, sqlite:///optuna.db).")
    from sqlalchemy.exc import IntegrityError, ProgrammingError

    for attempt in range(5):
        try:
            return optuna.storages.RDBStorage(url, heartbeat_interval=heartbeat, grace_period=2 * heartbeat,
                                              heartbeat_stale_trial_callback=mark_failed)
        except (IntegrityError, ProgrammingError):
            # Workers started at once on a fresh database race to create Optuna's tables (PostgreSQL
            # refuses the second CREATE): the schema exists a moment later.
            if attempt == 4:
                raise
            time.sleep(1.0 + attempt)


def open_study(name: str, storage: str, heartbeat: int, **kwargs) -> optuna.Study:
    """Create or load the study `name`; one clear error when the storage cannot be reached."""
    try:
        return optuna.create_study(study_name=name, storage=open_storage(storage, heartbeat), load_if_exists=True,
                                   **kwargs)
    except ConfigError:
        raise
    except Exception as exc:
        raise ConfigError(f"Cannot open the Optuna storage {storage or str(journal_path(''))!r} "
                          f"({type(exc).__name__}: {str(exc).splitlines()[0][:200]}): check the URL, that the "
                          "database server runs, and its credentials.") from None


def mark_failed(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
    """The MLflow side of a trial that failed because its worker died."""
    run_id = trial.user_attrs.get(ATTR_RUN)
    if run_id:
        mlflow_io.fail_run_tree(run_id, f"worker {trial.user_attrs.get(ATTR_OWNER)} died during trial {trial.number}")


def fail_orphaned_trials(study: optuna.Study) -> list[int]:
    """Fail RUNNING trials whose worker process on this machine no longer exists (kill -9, crash).

    Database storages also detect dead workers on any machine by heartbeat; a journal file has no
    heartbeat, and it lives on one machine, where a process id says whether the worker is alive."""
    with warnings.catch_warnings():  # heartbeats are "experimental" in Optuna since 2.9
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)
    failed = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if liveness.died_here(trial.user_attrs.get(ATTR_OWNER, "")):
            try:
                study._storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
            except optuna.exceptions.UpdateFinishedTrialError:
                continue  # another worker got there first
            mark_failed(study, trial)
            failed.append(trial.number)
    return failed


class JobError(RuntimeError):
    """A shared job failed with an error (on this worker or another)."""


def share(name: str, storage: str, heartbeat: int, count: int, work: Callable[[int, Callable[[str], None]], None],
          poll_seconds: float = 2.0, say: Callable[[str], None] = print) -> list[int]:
    """Do jobs 0..count-1 over every worker that shares the study `name` in `storage`, each once;
    return when all are complete, with the jobs this worker did. `work(k, record_run)` does job k
    (`record_run(run_id)` names the MLflow run it writes, failed if this worker dies). Raises the
    first error of a job (this worker's own, else JobError with another worker's message) once no
    job is left to do."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # a line per claim would drown the training's lines
    study = open_study(name, storage, heartbeat)
    done: list[int] = []
    errors: list[BaseException] = []
    first_look = True

    def objective(trial: optuna.Trial) -> float:
        k = trial.user_attrs.get(ATTR_JOB)
        if k is None:  # no waiting trial was left when Optuna asked: it made a fresh one
            raise optuna.TrialPruned()
        for other in study.get_trials(deepcopy=False, states=LIVE):
            if other.user_attrs.get(ATTR_JOB) == k and other.number < trial.number:
                trial.set_user_attr("duplicate_of", other.number)
                raise optuna.TrialPruned()
        trial.set_user_attr(ATTR_OWNER, liveness.owner())
        try:
            work(k, lambda run_id: trial.set_user_attr(ATTR_RUN, run_id))
        except Exception as exc:
            trial.set_user_attr(ATTR_ERROR, f"{type(exc).__name__}: {exc}"[:1000])
            raise
        done.append(k)
        return 0.0

    while True:
        failed = fail_orphaned_trials(study)
        if failed:
            say(f"trials {failed} of {name} were interrupted (their worker died): their jobs are free again")
        trials = study.get_trials(deepcopy=False)
        complete, live, errored = set(), set(), {}
        for t in trials:
            k = t.user_attrs.get(ATTR_JOB)
            if k is None:
                continue
            if t.state == TrialState.COMPLETE:
                complete.add(k)
            elif t.state in LIVE:  # waiting or running
                live.add(k)
            elif t.state == TrialState.FAIL and ATTR_ERROR in t.user_attrs:
                errored[k] = t.user_attrs[ATTR_ERROR]
        if len(complete) == count:
            return done
        errored = {k: m for k, m in errored.items() if k not in complete and k not in live}
        free = [k for k in range(count) if k not in complete and k not in live
                and (first_look or k not in errored)]
        first_look = False
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            for k in free:
                study.enqueue_trial({}, user_attrs={ATTR_JOB: k})
        if not free and not live:
            if errors:
                raise errors[0]
            k, message = next(iter(errored.items()))
            raise JobError(f"Job {k} of {name} failed on a worker: {message}")
        if free or any(t.state == TrialState.WAITING for t in trials):
            try:
                study.optimize(objective, n_trials=1, gc_after_trial=True)
            except Exception as exc:  # noqa: BLE001 - the trial is FAILED with the error; go on with the others
                errors.append(exc)
        else:  # every job left is claimed by another worker: wait for it, or for it to die
            time.sleep(poll_seconds)


def complete_runs(name: str, storage: str, heartbeat: int) -> dict[int, str]:
    """The MLflow run of every complete job of the study `name`."""
    study = open_study(name, storage, heartbeat)
    return {t.user_attrs[ATTR_JOB]: t.user_attrs.get(ATTR_RUN, "")
            for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if ATTR_JOB in t.user_attrs}
