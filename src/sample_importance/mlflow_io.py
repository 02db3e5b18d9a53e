"""The one module that talks to MLflow: runs, lookups, logging, artifacts.

The tracking store is MLflow's default (SQLite `mlflow.db` in the working directory, artifacts in
`./mlruns`) unless MLFLOW_TRACKING_URI says otherwise.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator
from urllib.parse import unquote, urlparse

import mlflow
import numpy as np
from mlflow.entities import Metric, Param, Run, RunStatus, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from . import dynamics as dyn
from . import liveness
from .liveness import RunBusyError, owner, user
from .errors import Stopped, UserError

os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # no progress bars in logs

TAG_ENTRY_POINT = "sample_importance.entry_point"
TAG_FINGERPRINT = "sample_importance.config_fingerprint"
TAG_FAILURE = "sample_importance.failure"
TAG_MODEL_URI = "sample_importance.model_uri"
TAG_STOPPED = "sample_importance.stopped"
TAG_DIVERGED = "sample_importance.diverged"
TAG_RESUMED_IN = "sample_importance.resumed_run_id"
TAG_OWNER = "sample_importance.owner"  # host:pid of the process running the run
TAG_USER = "sample_importance.user"  # user@host that created the run: the one who may resume it unasked
TAG_HEARTBEAT = "sample_importance.heartbeat"  # Unix time of the owner's last sign of life (every HEARTBEAT_S)
TAG_DAMAGED = "sample_importance.damaged"  # why its checkpoint cannot be resumed from (then it never is)
_HEARTBEAT = liveness.Heartbeat(lambda run_id: MlflowClient().set_tag(run_id, TAG_HEARTBEAT, str(int(time.time()))))


def shown(text: object, limit: int = 300) -> str:
    """Text from the tracking store (tags, names, reasons), as printed: control characters (ANSI
    escapes, carriage returns, newlines) written as escapes, at most `limit` characters. Anyone who
    can write to the store wrote it; it never drives the terminal."""
    text = str(text)[:limit]
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def reap_orphans() -> list[str]:
    """Mark FAILED every RUNNING run whose process is gone: on this machine, a process that no
    longer exists (killed with -9); on another machine, one whose heartbeat (TAG_HEARTBEAT, else
    its start) is older than LEASE_S (that machine died, or the run was planted to block its
    configuration). No run stays RUNNING forever, and no claim holds without a live owner."""
    try:
        runs = mlflow.search_runs(search_all_experiments=True, output_format="list",
                                  filter_string=f"attributes.status = 'RUNNING' and tags.`{TAG_OWNER}` LIKE '%:%'")
    except MlflowException:
        return []
    reaped = []
    for run in runs:
        owner_tag = run.data.tags[TAG_OWNER]
        reason = liveness.gone(owner_tag, run.data.tags.get(TAG_HEARTBEAT, "0"), (run.info.start_time or 0) / 1000)
        if reason is not None and _reap(run.info.run_id, owner_tag, shown(reason)):
            reaped.append(run.info.run_id)
    return reaped


def _reap(run_id: str, dead_owner: str, reason: str) -> bool:
    """Fail one run whose owner died, under the run's lock: a process that is resuming it holds the
    lock (and has made itself the owner before the run is RUNNING again), so a live run is never
    failed; two processes reaping the same run at once leave it failed once."""
    try:
        with claim(run_id):
            client = MlflowClient()
            run = client.get_run(run_id)
            if run.info.status != "RUNNING" or run.data.tags.get(TAG_OWNER) != dead_owner:
                return False  # resumed or reaped meanwhile
            client.set_tag(run_id, TAG_FAILURE, reason)
            client.set_terminated(run_id, "FAILED")
            return True
    except UserError:  # busy, or a lock that is no plain file
        return False
    except MlflowException:  # a concurrent write to the same run (e.g. the same tag inserted twice)
        return False


class StoreError(UserError):
    """The tracking store cannot be used (unreachable, unsupported, a driver missing)."""


PROBE_TIMEOUT_S = 10  # how long the first look at a tracking server may take


def check_store() -> None:
    """Look at the tracking store once, before any work, and say in one sentence why it cannot be
    used: an unreachable server (MLflow would retry it for minutes), a scheme MLflow does not
    know, its `file:` store (retired in MLflow 3), a database driver that is not installed. An
    SQLite store is created (MLflow's migrations) under a lock beside the database, so two
    processes that start on an empty store do not both migrate it."""
    uri = mlflow.get_tracking_uri()
    parsed = urlparse(uri)
    if parsed.scheme == "sqlite" and uri.startswith("sqlite:///") and uri != "sqlite:///:memory:":
        database = Path(unquote(uri[len("sqlite:///"):]))
        if database.parent.is_dir():
            with liveness.waiting_lock(Path(f"{database}.lock")):
                _probe(uri)
            return
    _probe(uri)


def _probe(uri: str) -> None:
    saved = {k: os.environ.get(k) for k in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT")}
    os.environ.update(MLFLOW_HTTP_REQUEST_MAX_RETRIES="0", MLFLOW_HTTP_REQUEST_TIMEOUT=str(PROBE_TIMEOUT_S))
    try:
        MlflowClient().search_experiments(max_results=1)
    except ModuleNotFoundError as exc:
        raise StoreError(f"The tracking store {shown(uri)} needs the Python package {exc.name}, which is not "
                         f"installed: pip install it, or set MLFLOW_TRACKING_URI to another store.") from None
    except Exception as exc:  # noqa: BLE001 - every way a store can fail, said in one sentence
        first = next((line for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
        raise StoreError(f"The tracking store {shown(uri)} cannot be used ({shown(first, 240)}): check "
                         "MLFLOW_TRACKING_URI (unset, it is sqlite:///mlflow.db in this folder) and that its server "
                         "is running.") from None
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


class RunLookupError(UserError):
    """A run id does not exist or lacks what was asked of it."""


def _mlflow_pytorch():
    """`mlflow.pytorch`, imported without its Lightning autologging module. Where Lightning is
    installed, MLflow imports that module (and Lightning) with `mlflow.pytorch`, 4 s on the 2-core
    machine, though only `mlflow.pytorch.autolog` needs it, which this project never calls; every
    `train` process that logs its model paid it. A later `autolog` imports it as usual."""
    name = "mlflow.pytorch._lightning_autolog"
    skipped = "mlflow.pytorch" not in sys.modules and name not in sys.modules
    if skipped:
        sys.modules[name] = None  # its import raises ImportError, which mlflow.pytorch passes over
    try:
        import mlflow.pytorch
    finally:
        if skipped and sys.modules.get(name, 0) is None:
            del sys.modules[name]
    return mlflow.pytorch


class OpenRun:
    """A run this process works on, addressed by its id: every call logs to that run whether or not
    it is MLflow's active run, so several runs can be open at once in one thread (many `train` runs
    trained in one loop). `fluent`: the run is also the active run (opened with none active)."""

    def __init__(self, run_id: str, fluent: bool = False):
        self.run_id, self.fluent = run_id, fluent
        self.client = MlflowClient()

    def set_tags(self, tags: dict[str, str]) -> None:
        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_params_once(self, params: dict) -> None:
        """Log parameters not already on the run (`mlflow run` logs the MLproject parameters itself,
        as the strings the user gave; logging them again with another spelling would fail). A block
        of options (a dict) gives one parameter per option, named block.option."""
        existing = self.client.get_run(self.run_id).data.params
        flat = {f"{k}.{kk}" if isinstance(v, dict) else k: vv for k, v in params.items()
                for kk, vv in (v.items() if isinstance(v, dict) else [(None, v)])}
        fresh = {k: v for k, v in flat.items() if k not in existing}
        if fresh:
            self.client.log_batch(self.run_id, params=[Param(k, str(v)) for k, v in fresh.items()])

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        stamp = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), stamp, step) for k, v in metrics.items()])

    def log_metrics_once(self, metrics: dict[str, float], step: int) -> None:
        """Log the metrics not yet logged at `step`."""
        missing = {k: v for k, v in metrics.items()
                   if not any(m.step == step for m in self.client.get_metric_history(self.run_id, k))}
        if missing:
            self.log_metrics(missing, step)

    def log_dict(self, obj, name: str) -> None:
        self.client.log_dict(self.run_id, obj, name)

    def log_figure(self, fig, name: str) -> None:
        import matplotlib.pyplot as plt

        self.client.log_figure(self.run_id, fig, name)
        plt.close(fig)

    def log_torch_model(self, model, input_example) -> None:
        """Log the model with its signature and an input example. MLflow stores it as an exported
        program (`model.pt2`), which loads without this project's code."""
        import torch
        from mlflow.models import infer_signature

        model = model.cpu().eval()
        with torch.no_grad():
            output = model(torch.as_tensor(input_example)).numpy()
        flavor = _mlflow_pytorch()
        info = flavor.log_model(
            model, name="model", signature=infer_signature(np.asarray(input_example), output),
            input_example=np.asarray(input_example), run_id=self.run_id,
            pip_requirements=flavor.get_default_pip_requirements(),
        )
        self.set_tags({TAG_MODEL_URI: info.model_uri})  # models:/<id>: what the registry registers

    def local_artifacts(self) -> bool:
        """Whether the run's artifacts are a local folder (written in place; runs can resume from them)."""
        return _local_path(self.client.get_run(self.run_id).info.artifact_uri) is not None

    @contextlib.contextmanager
    def artifact_folder(self, subdir: str) -> Iterator[Path]:
        """A folder that ends up as artifact `subdir` of the run. With a local artifact store the
        files are written in place (so a crash leaves what was written visible in the run);
        otherwise they go to a temporary folder uploaded on exit, also on failure."""
        local = _local_path(self.client.get_run(self.run_id).info.artifact_uri)
        if local is not None:
            folder = local / subdir
            folder.mkdir(parents=True, exist_ok=True)
            yield folder
            return
        tmp = Path(tempfile.mkdtemp(prefix="si-artifacts-"))
        try:
            yield tmp
        finally:
            self.client.log_artifacts(self.run_id, str(tmp), subdir)
            shutil.rmtree(tmp, ignore_errors=True)

    def end(self, exc: BaseException | None = None) -> None:
        """FINISHED; or, ended by `exc`, the reason in a tag and KILLED (stopped on purpose, e.g.
        pruned: not to be resumed; Ctrl-C: resumable) or FAILED."""
        status = "FINISHED"
        if exc is not None:
            reason = "interrupted" if isinstance(exc, KeyboardInterrupt) else f"{type(exc).__name__}: {exc}"
            with contextlib.suppress(Exception):
                self.set_tags({TAG_STOPPED if isinstance(exc, Stopped) else TAG_FAILURE: reason[:5000]})
            status = "KILLED" if isinstance(exc, (KeyboardInterrupt, Stopped)) else "FAILED"
        _HEARTBEAT.remove(self.run_id)
        if self.fluent:
            mlflow.end_run(status)
        else:
            self.client.set_terminated(self.run_id, status)


def _take_over(run_id: str | None, resume: bool) -> None:
    """Before a run starts: a resumed run is owned by this process before it is RUNNING again (so
    no other process's clean-up, `reap_orphans`, sees it RUNNING under its dead owner and fails
    it), loses its failure tag, and the run `mlflow run` made for this process says where the
    work went."""
    reap_orphans()
    if not resume:
        return
    client = MlflowClient()
    cli_run = os.environ.get("MLFLOW_RUN_ID")  # the run `mlflow run` created for this process
    if cli_run and cli_run != run_id:
        client.set_tag(cli_run, TAG_RESUMED_IN, run_id)
        client.set_tag(cli_run, "mlflow.note.content", f"Resumed the interrupted run {run_id}.")
    client.set_tag(run_id, TAG_OWNER, owner())
    with contextlib.suppress(MlflowException):
        client.delete_tag(run_id, TAG_FAILURE)  # it failed because its process died; now it goes on


def _describe(run: OpenRun, run_name: str, entry_point: str, tags: dict[str, str] | None, description: str | None,
              config: dict | None, resume: bool) -> None:
    """Name, entry point, owner and creator tags, description, and `config` as parameters and `config.json`."""
    run.set_tags({"mlflow.runName": run_name, TAG_ENTRY_POINT: entry_point, TAG_OWNER: owner(),
                  TAG_HEARTBEAT: str(int(time.time())), **({} if resume else {TAG_USER: user()}), **(tags or {})})
    _HEARTBEAT.add(run.run_id)
    if description:
        run.set_tags({"mlflow.note.content": description})
    if config is not None:
        run.log_params_once(config)
        run.log_dict(config, "config.json")


def open_run(run_name: str, entry_point: str, tags: dict[str, str] | None = None, description: str | None = None,
             run_id: str | None = None, config: dict | None = None, resume: bool = False) -> OpenRun:
    """Start (or, under `mlflow run`, continue) a run without a `with` block; end it with `.end()`.

    `run_id`: a run created beforehand (`create_run`, with its parent), or with `resume` an
    interrupted run to continue; else a new run nested under the active run, or, with none active,
    the run `mlflow run` made (or a new one), which then is the active run too."""
    _take_over(run_id, resume)
    active = mlflow.active_run()
    if run_id is None and active is not None:
        run_id = create_run(active.info.run_id, run_name, tags={})
    if active is None:
        run = OpenRun(mlflow.start_run(run_id=run_id).info.run_id, fluent=True)
    else:
        run = OpenRun(run_id)
        run.client.update_run(run_id, status="RUNNING")
    try:
        _describe(run, run_name, entry_point, tags, description, config, resume)
    except BaseException as exc:
        run.end(exc)
        raise
    return run


@contextlib.contextmanager
def start_run(run_name: str, entry_point: str, tags: dict[str, str] | None = None,
              description: str | None = None, run_id: str | None = None,
              config: dict | None = None, resume: bool = False) -> Iterator[mlflow.ActiveRun]:
    """A run for a `with` block, started as `open_run` starts one and the active run inside the block
    (nested under the active run if there is one).
    Any exception marks it FAILED (KILLED when stopped or interrupted) and records why in a tag, so
    no run is ever left RUNNING and the UI says what went wrong."""
    _take_over(run_id, resume)
    with mlflow.start_run(run_id=run_id, nested=mlflow.active_run() is not None) as active:
        run = OpenRun(active.info.run_id, fluent=True)
        try:
            _describe(run, run_name, entry_point, tags, description, config, resume)
            yield active
        except BaseException as exc:
            run.end(exc)
            raise
        finally:
            _HEARTBEAT.remove(run.run_id)


@contextlib.contextmanager
def joined_run(run_id: str, entry_point: str, description: str | None = None,
               config: dict | None = None) -> Iterator[Run]:
    """A run another logger opened and ends — HuggingFace's MLflowCallback (the active run) or
    Lightning's MLFlowLogger (through its client) — for a `with` block that adds this project's
    tags, the description and `config` (parameters it does not have yet, and config.json), through
    the client: the active-run stack stays the logger's. Its name stays the logger's. An exception
    ends it FAILED with the reason, as `start_run` does; otherwise the logger ends it."""
    run = OpenRun(run_id)
    try:
        run.set_tags({TAG_ENTRY_POINT: entry_point, TAG_OWNER: owner(), TAG_USER: user(),
                      TAG_HEARTBEAT: str(int(time.time()))})
        _HEARTBEAT.add(run_id)
        if description:
            run.set_tags({"mlflow.note.content": description})
        if config is not None:
            run.log_params_once(config)
            run.log_dict(config, "config.json")
        yield run.client.get_run(run_id)
    except BaseException as exc:
        run.end(exc)
        raise
    finally:
        _HEARTBEAT.remove(run_id)


def _active() -> OpenRun:
    return OpenRun(mlflow.active_run().info.run_id, fluent=True)


def log_params_once(params: dict) -> None:
    _active().log_params_once(params)


def log_metrics(metrics: dict[str, float], step: int) -> None:
    mlflow.log_metrics(metrics, step=step)


def log_figure(fig, name: str) -> None:
    _active().log_figure(fig, name)


def artifact_folder(subdir: str):
    """`OpenRun.artifact_folder` of the active run."""
    return _active().artifact_folder(subdir)


def _local_path(uri: str) -> Path | None:
    parsed = urlparse(uri)
    if parsed.scheme == "file":
        return Path(unquote(parsed.path))
    if parsed.scheme == "" or (len(parsed.scheme) == 1 and os.name == "nt"):
        return Path(uri)
    return None


def tracking_uri() -> str:
    return mlflow.get_tracking_uri()


def get_run(run_id: str):
    try:
        return MlflowClient().get_run(run_id)
    except MlflowException:
        raise RunLookupError(
            f"Run {run_id!r} does not exist in the tracking store {mlflow.get_tracking_uri()}: check the id "
            f"(the MLflow UI shows it) and MLFLOW_TRACKING_URI."
        ) from None


def load_dynamics(run_id: str, allow_partial: bool = False) -> dyn.Dynamics:
    """Load the `dynamics/` artifacts of a `train` run, validated against its metadata.json."""
    run = get_run(run_id)
    local = _local_path(run.info.artifact_uri)
    if local is not None:
        folder = local / dyn.DIRNAME
    else:
        try:
            folder = Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=dyn.DIRNAME))
        except Exception:
            folder = None
    if folder is None or not folder.is_dir() or not any(folder.iterdir()):
        raise RunLookupError(
            f"Run {run_id} has no {dyn.DIRNAME}/ artifacts: it is not a finished `train` run; pass the id of one."
        )
    try:
        return dyn.load_dir(folder, allow_partial=allow_partial)
    except dyn.DynamicsError as exc:
        raise dyn.DynamicsError(f"Run {run_id}: {exc}") from None


def resumable_run(entry_point: str, fingerprint: str, run_id: str, subdir: str, checkpoint: str) -> str | None:
    """The run to continue: `run_id` if given (it must hold a checkpoint), else the newest unfinished
    run with this configuration whose process is gone, which left a checkpoint, and which this user
    made (its TAG_USER, and the checkpoint file owned by this uid). None: start anew.

    A matching run made by someone else (anyone can create runs in a shared tracking server) is
    never resumed unasked: a line says how to resume it by naming it."""
    reap_orphans()
    if run_id:
        run = get_run(run_id)
        local = _local_path(run.info.artifact_uri)
        if run.info.status == "FINISHED" or local is None or not (local / subdir / checkpoint).is_file():
            raise RunLookupError(f"Run {run_id} cannot be resumed: it is {run.info.status.lower()} and has "
                                 f"{'a' if local and (local / subdir / checkpoint).is_file() else 'no'} checkpoint "
                                 f"in its local artifact folder; start a new run instead.")
        return run_id
    runs = mlflow.search_runs(
        search_all_experiments=True, output_format="list", order_by=["attributes.start_time DESC"],
        filter_string=f"tags.`{TAG_ENTRY_POINT}` = '{entry_point}' and tags.`{TAG_FINGERPRINT}` = '{fingerprint}'"
                      " and attributes.status != 'FINISHED'")
    me = user()
    cli_run = os.environ.get("MLFLOW_RUN_ID")
    for run in runs:
        if run.info.status == "RUNNING" and run.info.run_id != cli_run:
            # Alive (reap_orphans failed the dead ones, and other machines' runs whose lease
            # expired): training it twice at once would only make a duplicate, and two processes
            # resuming it would corrupt it.
            raise RunBusyError(f"Run {run.info.run_id} with this configuration is being trained right now by "
                               f"{shown(run.data.tags.get(TAG_OWNER, 'another process'))}: wait for it to finish "
                               "(its results will be there), or change the configuration.")
    for run in runs:
        tags = run.data.tags
        if run.info.status == "RUNNING" or any(t in tags for t in (TAG_DIVERGED, TAG_STOPPED, TAG_DAMAGED)):
            continue
        local = _local_path(run.info.artifact_uri)
        path = None if local is None else local / subdir / checkpoint
        if path is None or not os.path.lexists(path):
            continue
        if tags.get(TAG_USER) == me and liveness.owned_by_me(local.parent, local, path.parent, path):
            problem = dyn.load_problem(path)
            if problem is None:
                return run.info.run_id
            print(f"note: run {run.info.run_id} (an interrupted {entry_point} run with this configuration) cannot be "
                  f"resumed: {shown(problem)} Training anew in a new run.", file=sys.stderr, flush=True)
            with contextlib.suppress(MlflowException):
                MlflowClient().set_tag(run.info.run_id, TAG_DAMAGED, problem[:5000])
            continue
        print(f"note: run {run.info.run_id} is an interrupted {entry_point} run with this configuration made by "
              f"{shown(tags.get(TAG_USER, 'an unknown user'))}, not by {me}, or with files that are not this "
              f"user's own: it is not resumed unasked; to resume it, pass resume_run_id={run.info.run_id}. "
              "Starting a new run.", file=sys.stderr, flush=True)
    return None


def check_still_resumable(run_id: str, subdir: str, checkpoint: str) -> None:
    """Under the run's lock: raise RunBusyError if another process resumed and ended it meanwhile."""
    run = get_run(run_id)
    local = _local_path(run.info.artifact_uri)
    if run.info.status in ("FINISHED", "RUNNING") or local is None or not (local / subdir / checkpoint).is_file():
        raise RunBusyError(f"Run {run_id} was resumed by another process meanwhile (it is now "
                           f"{run.info.status.lower()}): nothing left to do here; its results are in run {run_id}.")


@contextlib.contextmanager
def claim(run_id: str) -> Iterator[None]:
    """Hold the run's lock (`liveness.lock`, beside its local artifact folder) for as long as this
    process works on it. Runs with a remote artifact store are never resumed, so they need no lock."""
    local = _local_path(get_run(run_id).info.artifact_uri)
    if local is None:
        yield
        return
    with liveness.lock(run_id, local.parent):
        yield


def find_finished_run(entry_point: str, fingerprint: str) -> str | None:
    """The newest FINISHED run of `entry_point` whose configuration has this fingerprint, if any
    (or one of this user's `train` runs that is complete but was failed, `_complete_run`).

    Any user's finished run is reused: sharing results is what a shared store is for, and whoever
    can write to the store can change any run's results anyway. What a reused run is trusted for
    is data, validated as it is loaded (checksums, types); never code (`models.check_named`),
    never a link, never raw text on the terminal (docs: the shared-store threat model)."""
    runs = mlflow.search_runs(
        search_all_experiments=True,
        filter_string=(f"tags.`{TAG_ENTRY_POINT}` = '{entry_point}' and tags.`{TAG_FINGERPRINT}` = '{fingerprint}'"
                       f" and attributes.status = '{RunStatus.to_string(RunStatus.FINISHED)}'"),
        order_by=["attributes.start_time DESC"], max_results=1, output_format="list",
    )
    if runs:
        return runs[0].info.run_id
    return _complete_run(fingerprint) if entry_point == "train" else None


def _complete_run(fingerprint: str) -> str | None:
    """A `train` run of this user, FAILED although everything of it was written and logged (its
    process was killed after its checkpoint was removed and before FINISHED, as earlier versions
    could be): set FINISHED and returned, so it is reused rather than trained again."""
    runs = mlflow.search_runs(
        search_all_experiments=True, output_format="list", order_by=["attributes.start_time DESC"],
        filter_string=(f"tags.`{TAG_ENTRY_POINT}` = 'train' and tags.`{TAG_FINGERPRINT}` = '{fingerprint}'"
                       f" and attributes.status = 'FAILED' and tags.`{TAG_USER}` = '{user()}'"))
    for run in runs:
        local = _local_path(run.info.artifact_uri)
        tags = run.data.tags
        if local is None or TAG_MODEL_URI not in tags or any(t in tags for t in (TAG_DIVERGED, TAG_STOPPED)):
            continue
        folder = local / dyn.DIRNAME
        if os.path.lexists(folder / dyn.CHECKPOINT) or not liveness.owned_by_me(local.parent, local, folder, folder / dyn.METADATA):
            continue
        try:
            dyn.load_dir(folder)  # complete, every checksum right
        except dyn.DynamicsError:
            continue
        client = MlflowClient()
        with contextlib.suppress(MlflowException):
            client.delete_tag(run.info.run_id, TAG_FAILURE)
        client.set_terminated(run.info.run_id, "FINISHED")
        print(f"note: run {run.info.run_id} had written and logged everything before its process ended: it is "
              "finished, not trained again.", file=sys.stderr, flush=True)
        return run.info.run_id
    return None


def wait_for_finished_run(entry_point: str, fingerprint: str, poll_seconds: float = 2.0) -> str | None:
    """Wait while a run of `entry_point` with this fingerprint is RUNNING elsewhere; return the
    finished one, or None if none finished (the other process failed: the caller may train it)."""
    while True:
        done = find_finished_run(entry_point, fingerprint)
        if done is not None:
            return done
        reap_orphans()
        running = mlflow.search_runs(
            search_all_experiments=True, output_format="list", max_results=1,
            filter_string=f"tags.`{TAG_ENTRY_POINT}` = '{entry_point}' and tags.`{TAG_FINGERPRINT}` = '{fingerprint}'"
                          " and attributes.status = 'RUNNING'")
        if not running:
            return find_finished_run(entry_point, fingerprint)
        time.sleep(poll_seconds)


def launch_child(project_dir: str | Path, entry_point: str, parameters: dict, run_name: str) -> str:
    """Run an MLproject entry point (`mlflow.run`, local environment) as a child of the active run;
    raise if it fails. Returns the child's run id."""
    parent = mlflow.active_run()
    client = MlflowClient()
    child = client.create_run(parent.info.experiment_id, run_name=run_name,
                              tags={"mlflow.parentRunId": parent.info.run_id})
    os.environ[liveness.PARENT_PID_VAR] = str(os.getpid())  # inherited by the step, which ends when this process ends
    try:
        mlflow.projects.run(str(project_dir), entry_point=entry_point,
                            parameters={k: str(v) for k, v in parameters.items()},
                            env_manager="local", run_id=child.info.run_id, synchronous=True,
                            experiment_id=parent.info.experiment_id)
    except mlflow.projects.ExecutionException:
        reason = shown(client.get_run(child.info.run_id).data.tags.get(TAG_FAILURE, "see its log above"), 2000)
        raise ChildRunError(f"The {entry_point} step (run {child.info.run_id}) failed: {reason}") from None
    # A step that resumed an interrupted run did its work there.
    return client.get_run(child.info.run_id).data.tags.get(TAG_RESUMED_IN, child.info.run_id)


class ChildRunError(UserError):
    """A step of a multi-step workflow failed; the message names the run and why."""


def set_tags(tags: dict[str, str]) -> None:
    mlflow.set_tags(tags)


def log_table(df, name: str) -> None:
    """A table as a CSV artifact."""
    mlflow.log_text(df.to_csv(index=False), name)


def log_dict(obj, name: str) -> None:
    mlflow.log_dict(obj, name)


def load_dict(run_id: str, name: str):
    try:
        return mlflow.artifacts.load_dict(f"runs:/{run_id}/{name}")
    except Exception:
        raise RunLookupError(f"Run {run_id} has no artifact {name}: it did not finish; re-run it.") from None


def download_bytes(run_id: str, path: str) -> bytes:
    with tempfile.TemporaryDirectory() as tmp:
        local = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=path, dst_path=tmp)
        return Path(local).read_bytes()


def log_text(text: str, name: str) -> None:
    mlflow.log_text(text, name)


def ensure_child(project_dir: str | Path, entry_point: str, config, run_name: str) -> tuple[str, bool]:
    """The finished run of `entry_point` for this config (its fingerprint), or a new child run of
    the active run that makes it. Returns (run id, reused)."""
    existing = find_finished_run(entry_point, config.fingerprint())
    if existing is not None:
        return existing, True
    return launch_child(project_dir, entry_point, config.params(), run_name), False


def list_artifacts(run_id: str, path: str) -> list[str]:
    return [f.path for f in MlflowClient().list_artifacts(run_id, path) if not f.is_dir]


def artifact_uri(name: str) -> str:
    """Where artifact `name` of the active run lives."""
    return mlflow.get_artifact_uri(name)


def metric_series(run_id: str, name: str) -> np.ndarray:
    """A metric's values ordered by step."""
    history = sorted(MlflowClient().get_metric_history(run_id, name), key=lambda m: m.step)
    return np.array([m.value for m in history])


def register_version(name: str, run_id: str, tags: dict, description: str = "") -> str:
    """The registry version of run `run_id`'s model under `name` (registered once, reused after),
    with `tags` set on it. Returns the version."""
    client = MlflowClient()
    existing = client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
    if existing:
        version = existing[0].version
    else:
        source = client.get_run(run_id).data.tags.get(TAG_MODEL_URI, f"runs:/{run_id}/model")
        version = mlflow.register_model(source, name).version
        if description:
            client.update_registered_model(name, description=description)
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, str(value))
    return str(version)


def set_alias(name: str, alias: str, version: str) -> None:
    MlflowClient().set_registered_model_alias(name, alias, version)


def create_run(parent_run_id: str, run_name: str, tags: dict[str, str]) -> str:
    """A new run nested under `parent_run_id` (which need not be active); returns its id."""
    client = MlflowClient()
    parent = client.get_run(parent_run_id)
    run = client.create_run(parent.info.experiment_id, run_name=run_name,
                            tags={"mlflow.parentRunId": parent_run_id, **tags})
    return run.info.run_id


def active_run_id() -> str:
    return mlflow.active_run().info.run_id


def log_to(run_id: str, metrics: dict[str, float] | None = None, figures: dict | None = None,
           dicts: dict | None = None, tags: dict | None = None, step: int = 0) -> None:
    """Log to a run that need not be active (the sweep's parent, from any worker)."""
    import matplotlib.pyplot as plt

    client = MlflowClient()
    for key, value in (metrics or {}).items():
        client.log_metric(run_id, key, float(value), step=step)
    for name, fig in (figures or {}).items():
        client.log_figure(run_id, fig, name)
        plt.close(fig)
    for name, obj in (dicts or {}).items():
        client.log_dict(run_id, obj, name)
    for key, value in (tags or {}).items():
        client.set_tag(run_id, key, str(value))


def fail_run_tree(run_id: str, reason: str) -> None:
    """Mark a run and its still-RUNNING descendants FAILED (after the process that ran them died)."""
    client = MlflowClient()
    run = client.get_run(run_id)
    children = client.search_runs([run.info.experiment_id], f"tags.`mlflow.parentRunId` = '{run_id}'")
    for child in children:
        if child.info.status == "RUNNING":
            fail_run_tree(child.info.run_id, reason)
    if run.info.status == "RUNNING":
        client.set_tag(run_id, TAG_FAILURE, reason)
        client.set_terminated(run_id, "FAILED")


def finish_if_ended(run_id: str) -> None:
    """Set a run that is no longer RUNNING (its process died) back to FINISHED."""
    client = MlflowClient()
    if client.get_run(run_id).info.status != "RUNNING":
        client.set_terminated(run_id, "FINISHED")


def find_cluster_run(train_run_id: str) -> str | None:
    """The newest FINISHED `cluster` run of this train run (its train-run tag), if any."""
    return _newest_finished("cluster", "sample_importance.train_run_ids", train_run_id)


def find_influence_run(train_run_id: str) -> str | None:
    """The newest FINISHED `influence` run of this train run, if any."""
    return _newest_finished("influence", "sample_importance.train_run_id", train_run_id)


def _newest_finished(entry_point: str, tag: str, value: str) -> str | None:
    runs = mlflow.search_runs(
        search_all_experiments=True, output_format="list", max_results=1, order_by=["attributes.start_time DESC"],
        filter_string=(f"tags.`{TAG_ENTRY_POINT}` = '{entry_point}' and tags.`{tag}` = '{value}' and "
                       "attributes.status = 'FINISHED'"))
    return runs[0].info.run_id if runs else None


def load_table(run_id: str, name: str, numeric: tuple[str, ...] = ()):
    """A CSV artifact of a run as a pandas DataFrame, validated like any input: the `numeric`
    columns must be there, numbers, finite (a tracking store holds whatever anyone wrote to it)."""
    import io

    import pandas as pd

    try:
        table = pd.read_csv(io.BytesIO(download_bytes(run_id, name)))
    except Exception:
        raise RunLookupError(f"Run {run_id} has no artifact {name}: pass a finished run of the right entry point.") from None
    for column in numeric:
        values = pd.to_numeric(table[column], errors="coerce") if column in table else None
        if values is None or not np.isfinite(values.to_numpy(np.float64)).all():
            raise RunLookupError(f"Run {run_id}'s {name} is not usable: its column {column!r} is "
                                 f"{'missing' if values is None else 'not all finite numbers'}; re-run that step.")
        table[column] = values
    return table


def tracking_ui_url() -> str:
    """The tracking server's URL when it is one (http/https), else "" (a local store has no UI URL)."""
    uri = mlflow.get_tracking_uri()
    return uri.rstrip("/") if urlparse(uri).scheme in ("http", "https") else ""


def run_link(run_id: str, base_url: str) -> str:
    """The MLflow UI page of a run under `base_url`."""
    return f"{base_url.rstrip('/')}/#/experiments/{get_run(run_id).info.experiment_id}/runs/{run_id}"


def run_tag(run_id: str, key: str, default: str = "") -> str:
    """A tag of a run (the active one or any other)."""
    return get_run(run_id).data.tags.get(key, default)
