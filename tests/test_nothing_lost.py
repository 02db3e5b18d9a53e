"""Nothing lost, nobody in: a shared tracking store runs no code, a kill at any instant of a run's
finish is recovered, concurrent reruns claim a run once, damaged files and full disks are named."""
from __future__ import annotations

import contextlib
import dataclasses
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import mlflow
import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from conftest import REPO, all_runs, folded, private_store
from sample_importance import dynamics as dyn
from sample_importance import liveness, load_dynamics, mlflow_io
from sample_importance.stages import train as train_stage
from sample_importance.config import TrainRunConfig
from sample_importance.dynamics import DynamicsError

pytestmark = pytest.mark.integration  # real processes, stores, servers or trained runs

TINY = dict(subset=100, epochs=2, width=8, batch_size=50, device="cpu")
ARRAYS = ("importance", "loss", "p_true", "correct", "error_l2", "batch_order", "param_projection", "final_loss",
          "label", "sample_id", "eval_loss", "eval_p_true", "eval_correct", "eval_error_l2", "eval_grad_norm")


class Payload:
    """What an attacker would plant: unpickling it creates `marker` (any code could run instead)."""

    def __init__(self, marker: pathlib.Path):
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.touch, (self.marker,)


def _plant(cfg: TrainRunConfig, marker: pathlib.Path, user: str, uid: int | None = None) -> str:
    """A FAILED `train` run with `cfg`'s fingerprint whose checkpoint is a pickle payload, as anyone
    who can write to a shared tracking server could create."""
    client = MlflowClient()
    exp = mlflow.get_experiment_by_name("Default").experiment_id
    run = client.create_run(exp, run_name="planted", tags={
        mlflow_io.TAG_ENTRY_POINT: "train", mlflow_io.TAG_FINGERPRINT: cfg.fingerprint(), mlflow_io.TAG_USER: user})
    folder = mlflow_io._local_path(run.info.artifact_uri) / dyn.DIRNAME
    folder.mkdir(parents=True)
    torch.save({"epoch": 1, "model": Payload(marker)}, folder / dyn.CHECKPOINT)
    if uid is not None:
        os.chown(folder / dyn.CHECKPOINT, uid, uid)
    client.set_terminated(run.info.run_id, "FAILED")
    return run.info.run_id


def test_a_planted_checkpoint_is_never_executed_nor_resumed_unasked(tracking, capsys):
    import train as train_entry
    from _cli import run_cli

    marker = tracking / "payload-ran"
    # The payload is real: an unsafe load would run it.
    torch.save({"x": Payload(tracking / "proof")}, tracking / "proof.pt")
    torch.load(tracking / "proof.pt", weights_only=False)
    assert (tracking / "proof").exists()

    cfg = TrainRunConfig(**TINY)
    args = [f"--{k}={v}" for k, v in TINY.items()]
    foreign = _plant(cfg, marker, user="mallory@elsewhere")
    run_id = train_entry.main(args)
    assert run_id != foreign and not marker.exists()
    err = capsys.readouterr().err
    assert f"resume_run_id={foreign}" in err and "not resumed unasked" in err
    assert MlflowClient().get_run(run_id).info.status == "FINISHED"

    # A run tagged with this user's name but whose checkpoint file belongs to another account is
    # not resumed unasked either (tags are writable by anyone who can reach the server).
    if os.getuid() == 0:
        other = _plant(dataclasses.replace(cfg, seed=1), marker, user=liveness.user(), uid=4242)
        second = train_entry.main(args + ["--seed=1"])
        assert second != other and not marker.exists()

    # Named explicitly (or forged to look like one's own), the checkpoint is still only data: refused.
    with pytest.raises(SystemExit) as info:
        run_cli(lambda: train_entry.main(args + [f"--resume_run_id={foreign}"]))
    assert info.value.code == 2 and not marker.exists()
    lines = [l for l in capsys.readouterr().err.splitlines() if l.startswith("error: ")]
    assert len(lines) == 1 and "checkpoint.pt was not loaded" in lines[0], lines
    assert all(r.info.status != "RUNNING" for r in all_runs(tracking))


class Killed(BaseException):
    """Stands for kill -9 at one instant: nothing after it runs in the process."""


def _arrays(run_id: str) -> dict[str, np.ndarray]:
    d = load_dynamics(run_id)
    return {name: np.array(getattr(d, name)) for name in ARRAYS}


def _kill_points(finish_steps: int):
    """Every step of the finish (each file written or renamed into place, metadata.json), then every
    step of the final logging (metrics, each figure, the model). The checkpoint is removed after the
    run is FINISHED: a kill there is test_store_trust's."""
    return [("finish", k) for k in range(finish_steps)] + [("log", name) for name in (
        "metrics", "figure1", "figure2", "figure3", "model")]


def test_a_kill_at_any_step_of_the_finish_is_completed_by_the_rerun(tracking, monkeypatch, capsys):
    cfg = TrainRunConfig(**TINY)
    where = {"point": None, "count": 0, "in_finish": False}

    def kill_at(kind: str, name) -> None:
        if where["point"] == (kind, name):
            where["point"] = None
            raise Killed(f"{kind} {name}")

    real_replace, real_finish = os.replace, dyn.DynamicsWriter.finish

    def replace(src, dst, *a, **kw):
        if where["in_finish"]:
            kill_at("finish", where["count"])
            where["count"] += 1
        return real_replace(src, dst, *a, **kw)

    def finish(self, *a, **kw):
        where["in_finish"], where["count"] = True, 0
        try:
            return real_finish(self, *a, **kw)
        finally:
            where["in_finish"] = False

    figures = {"n": 0}
    run_class = mlflow_io.OpenRun  # what the train run logs through
    real_metrics, real_figure, real_model, real_discard = (run_class.log_metrics_once, run_class.log_figure,
                                                           run_class.log_torch_model, dyn.discard_checkpoint)

    def metrics_once(self, metrics, step=None):
        if "final_train_loss" in metrics:
            kill_at("log", "metrics")
        return real_metrics(self, metrics, step=step)

    def figure(self, fig, name):
        figures["n"] += 1
        kill_at("log", f"figure{figures['n']}")
        return real_figure(self, fig, name)

    monkeypatch.setattr(dyn.os, "replace", replace)
    monkeypatch.setattr(dyn.DynamicsWriter, "finish", finish)
    monkeypatch.setattr(run_class, "log_metrics_once", metrics_once)
    monkeypatch.setattr(run_class, "log_figure", figure)
    monkeypatch.setattr(run_class, "log_torch_model", lambda *a: (kill_at("log", "model"), real_model(*a)))
    monkeypatch.setattr(dyn, "discard_checkpoint", lambda folder: (kill_at("log", "discard"), real_discard(folder)))

    reference_run = train_stage.run_train(cfg, quiet=True, log_model=True)
    reference = _arrays(reference_run)
    finish_steps = where["count"]  # files written or renamed by an uninterrupted finish
    assert finish_steps >= 13
    for point in _kill_points(finish_steps):
        where["point"], figures["n"] = point, 0
        with pytest.raises(Killed):
            train_stage.run_train(cfg, quiet=True, log_model=True)
        assert where["point"] is None, f"{point} was never reached"
        [killed] = [r for r in all_runs(tracking) if r.info.status != "FINISHED"]
        capsys.readouterr()
        figures["n"] = 0
        run_id = train_stage.run_train(cfg, quiet=True, log_model=True)
        out = capsys.readouterr().out
        assert run_id == killed.info.run_id, point  # the same run, not a new one
        assert f"resuming run {run_id} after epoch 2 of 2" in out, point  # no epoch trained again
        run = MlflowClient().get_run(run_id)
        assert run.info.status == "FINISHED" and mlflow_io.TAG_FAILURE not in run.data.tags, point
        got = _arrays(run_id)
        for name in ARRAYS:
            assert np.array_equal(got[name], reference[name], equal_nan=got[name].dtype.kind == "f"), (point, name)
        folder = load_dynamics(run_id).folder
        assert not (folder / dyn.CHECKPOINT).exists() and not list(folder.glob("*.partial.npy")), point
        for key in ("test_error", "final_test_error"):
            rows = MlflowClient().get_metric_history(run_id, key)
            assert sorted(m.step for m in rows) == sorted({m.step for m in rows}), (point, key)  # one row a step
        assert {f.path for f in MlflowClient().list_artifacts(run_id, "figures")} == \
            {f.path.replace(reference_run, run_id) for f in MlflowClient().list_artifacts(reference_run, "figures")}
        assert MlflowClient().get_run(run_id).data.tags.get(mlflow_io.TAG_MODEL_URI), point


def _popen(store, *args):
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{store}/mlflow.db", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, str(REPO / "entry_points" / "train.py"), *args], cwd=store, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def test_two_reruns_of_a_killed_run_at_once_resume_it_once(tmp_path):
    args = ["--epochs", "12", "--width", "128", "--batch_size", "50", "--subset", "1000", "--device", "cpu"]
    first = _popen(tmp_path, *args)
    for line in first.stdout:
        if line.startswith("epoch   3/"):
            os.killpg(first.pid, signal.SIGKILL)
            break
    first.wait()
    a, b = _popen(tmp_path, *args), _popen(tmp_path, *args)
    outs = [p.communicate(timeout=600)[0] for p in (a, b)]
    codes = sorted(p.returncode for p in (a, b))
    assert codes == [0, 2], outs
    loser = outs[[a.returncode, b.returncode].index(2)]
    assert "another process" in loser or "being trained right now" in loser, loser
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    try:
        [run] = all_runs(tmp_path)  # the loser made no run of its own
        assert run.info.status == "FINISHED" and mlflow_io.TAG_FAILURE not in run.data.tags
        assert load_dynamics(run.info.run_id).metadata["complete"]
        rows = MlflowClient().get_metric_history(run.info.run_id, "test_error")
        assert sorted(m.step for m in rows) == list(range(1, 13))
    finally:
        mlflow.set_tracking_uri(None)


@pytest.fixture
def finished(tracking):
    return train_stage.run_train(TrainRunConfig(**TINY), quiet=True, log_model=False)


@pytest.mark.parametrize("damage, message", [
    (lambda f: (f / "loss.npy").write_bytes(b""), r"loss\.npy is damaged: not a readable \.npy file"),
    (lambda f: _edit_metadata(f, lambda m: m.pop("checksums")), r"metadata\.json is damaged: it lacks checksums"),
    (lambda f: (f / "metadata.json").unlink(), r"metadata\.json is missing: the dynamics folder is damaged"),
    (lambda f: (f / "metadata.json").write_text("{"), r"metadata\.json is damaged: not valid JSON"),
    (lambda f: _edit_metadata(f, lambda m: m.update(n="100")), r"metadata\.json is damaged: its n is not"),
    (lambda f: _edit_metadata(f, lambda m: m.update(layer_names=[1, 2])), r"metadata\.json is damaged: its layer_names"),
])
def test_a_damaged_file_gives_one_line_naming_it(finished, capsys, damage, message):
    import decompose as decompose_entry
    from _cli import run_cli

    damage(load_dynamics(finished).folder)
    with pytest.raises(SystemExit) as info:
        run_cli(lambda: decompose_entry.main([f"--train_run_ids={finished}"]))
    assert info.value.code == 2
    lines = [l for l in capsys.readouterr().err.splitlines() if l.startswith("error: ")]
    assert len(lines) == 1
    import re
    assert re.search(message, lines[0]), lines[0]


def _edit_metadata(folder, change):
    import json

    meta = json.loads((folder / "metadata.json").read_text())
    change(meta)
    (folder / "metadata.json").write_text(json.dumps(meta))


@pytest.mark.parametrize("name", [dyn.FINAL_STATE, dyn.INIT_STATE])
def test_a_flipped_bit_in_a_state_file_is_detected(finished, name):
    d = load_dynamics(finished)
    assert set(d.state(name)) == {"layers.L1.weight", "layers.L1.bias", "layers.L2.weight", "layers.L2.bias",
                                  "layers.L3.weight", "layers.L3.bias", "layers.Out.weight", "layers.Out.bias"}
    raw = bytearray((d.folder / name).read_bytes())
    raw[len(raw) // 2] ^= 0x01
    (d.folder / name).write_bytes(bytes(raw))
    with pytest.raises(DynamicsError, match=rf"{name} is damaged: it does not match the checksum"):
        load_dynamics(finished).state(name)


def test_a_full_disk_is_named_before_training(tracking, capsys, monkeypatch):
    import train as train_entry
    from _cli import run_cli

    monkeypatch.setattr(dyn.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10 ** 12, 10 ** 12, 1000))
    with pytest.raises(SystemExit) as info:
        run_cli(lambda: train_entry.main([f"--{k}={v}" for k, v in TINY.items()]))
    assert info.value.code == 2
    [line] = [l for l in capsys.readouterr().err.splitlines() if l.startswith("error: ")]
    assert "This run's dynamics would need" in line and "only 1.0 KB is free" in line
    [run] = all_runs(tracking)
    assert run.info.status == "FAILED"


def test_no_space_while_writing_is_one_line(tracking, capsys, monkeypatch):
    import errno

    import train as train_entry
    from _cli import run_cli

    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(dyn.os, "posix_fallocate", full)
    with pytest.raises(SystemExit) as info:
        run_cli(lambda: train_entry.main([f"--{k}={v}" for k, v in TINY.items()]))
    assert info.value.code == 2
    [line] = [l for l in capsys.readouterr().err.splitlines() if l.startswith("error: ")]
    assert line.startswith("error: No space left on the device holding"), line
    assert all(r.info.status == "FAILED" for r in all_runs(tracking))


REFUSED = [
    ("train", ["--epochs", "1000000000"], "This run's dynamics would need"),
    ("train", ["--width", "100000000"], "more than this machine's"),
    ("train", ["--seed", "-1"], "seed must be an integer between 0 and 2**63 - 1"),
    ("train", ["--seed", str(2 ** 70)], "seed must be an integer between 0 and 2**63 - 1"),
    ("train", ["--dataset", "mnist", "--data_dir", __file__], "is a file, not a folder"),
    ("stability", ["--num_seeds", "100000"], "more than the limit of 1,000"),
    ("stability", ["--train_run_ids", "a,b,a"], "train_run_ids repeats a"),
    ("decompose", ["--train_run_ids", "a,b"], "decompose reads one train run"),
    ("nll", ["--train_run_ids", "a,b"], "nll reads one train run"),
    ("cluster", ["--train_run_ids", "a,b"], "cluster reads one train run"),
    ("main", ["--label", "11"], "label must be a class between 0 and 9"),
    ("main", ["--num_seeds", "1"], "num_seeds must be at least 2"),
    ("main", ["--subset", "40", "--batch_size", "100"], "batch_size=100 is larger than the 40 training samples"),
    ("main", ["--subset", "20", "--batch_size", "10", "--label", "5"], "Class 5 has only"),
    ("sweep", ["--n_trials", "0"], "n_trials=0 with no timeout"),
    ("sweep", ["--seeds", "3,3"], "seeds repeats 3"),
    ("sweep", ["--seeds", "100000"], "more than the limit"),
    ("train", ["--lr", "inf"], "lr must be a finite number, got inf"),
    ("train", ["--weight_decay", "nan"], "weight_decay must be a finite number, got nan"),
    ("learnability", ["--architectures", "cnn,mlp:1x8,cnn"], "architectures names cnn twice"),
    ("main", ["--num_clusters", "100000"], "num_clusters=100000 is more than the"),
]
if not torch.cuda.is_available():
    REFUSED.append(("train", ["--device", "cuda"], "no CUDA device is available"))


@pytest.fixture(scope="module")
def shared_store(tmp_path_factory):
    """One tracking store for the refusals (each case looks only at the runs it made)."""
    with private_store(tmp_path_factory, "refusals") as tmp:
        yield tmp


@pytest.mark.parametrize("entry,args,message", REFUSED, ids=[f"{e} {' '.join(a)[:30]}" for e, a, _ in REFUSED])
def test_bad_input_is_refused_at_once_in_one_line(shared_store, capsys, entry, args, message):
    import importlib

    from _cli import run_cli

    module = importlib.import_module(entry)
    before = {r.info.run_id for r in all_runs(shared_store)}
    start = time.perf_counter()
    with pytest.raises(SystemExit) as info:
        run_cli(lambda: module.main(folded(entry, ["--epochs", "2", "--width", "8", "--subset", "100", "--device", "cpu",
                                                   *args])))
    assert time.perf_counter() - start < 20
    assert info.value.code == 2
    err = capsys.readouterr().err
    lines = [l for l in err.splitlines() if l.startswith("error: ")]
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in err, err
    runs = [r for r in all_runs(shared_store) if r.info.run_id not in before]
    assert all(r.info.status != "RUNNING" for r in runs)
    assert not [r for r in runs if r.data.tags.get(mlflow_io.TAG_ENTRY_POINT) == "train" and entry != "train"]


def _alive(pid: int) -> bool:
    """A process that exists and is not a zombie (an orphan waits for a reaper that a container may lack)."""
    try:
        state = pathlib.Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


def _describe(pid: int, run_id: str, output=None) -> str:
    """What a process still alive is doing (its state, the kernel function it waits in, its threads,
    and, where its stderr is `output`, every thread's Python stack: `_cli` dumps them on SIGUSR1) and
    its run's status: the message of a failure that cannot be reproduced at will."""
    proc = pathlib.Path(f"/proc/{pid}")
    parts = []
    if output is not None:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGUSR1)
            time.sleep(2)
            os.set_blocking(output.fileno(), False)
            parts.append("output: " + (os.read(output.fileno(), 1 << 20) or b"").decode(errors="replace")[-6000:])
    for name in ("stat", "wchan"):
        with contextlib.suppress(OSError):
            parts.append(f"{name}: {(proc / name).read_text().strip()[:200]}")
    with contextlib.suppress(OSError):
        parts.append("threads: " + ", ".join(sorted((t / "comm").read_text().strip() for t in (proc / "task").iterdir())))
    with contextlib.suppress(Exception):
        run = MlflowClient().get_run(run_id)
        parts.append(f"run {run.info.status}, tags {sorted(k for k in run.data.tags if not k.startswith('mlflow.'))}")
    return "; ".join(parts)


def test_killing_main_ends_its_train_child_and_the_rerun_completes(tmp_path):
    args = ["--subset", "1000", "--width", "256", "--epochs", "15", "--batch_size", "50", "--num_seeds", "2",
            "--num_clusters", "5", "--device", "cpu"]
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, str(REPO / "entry_points" / "main.py"), *args]
    main = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    for line in main.stdout:  # the train child prints into the same stream
        if line.startswith("epoch   2/"):
            os.kill(main.pid, signal.SIGKILL)  # main alone, not its process group
            break
    main.wait()
    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    try:
        [train] = [r for r in all_runs(tmp_path) if r.data.tags.get(mlflow_io.TAG_ENTRY_POINT) == "train"]
        pid = int(train.data.tags[mlflow_io.TAG_OWNER].rpartition(":")[2])
        deadline = time.time() + 30
        while _alive(pid):
            assert time.time() < deadline, \
                f"the train child outlived main by 30 s: {_describe(pid, train.info.run_id, main.stdout)}"
            time.sleep(0.2)
        assert MlflowClient().get_run(train.info.run_id).info.status == "KILLED"  # ended, resumable
        again = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
        assert f"resuming run {train.info.run_id}" in again.stdout
        done = MlflowClient().get_run(train.info.run_id)
        assert done.info.status == "FINISHED" and load_dynamics(train.info.run_id).metadata["complete"]
        assert not [r for r in all_runs(tmp_path) if r.info.status == "RUNNING"]
    finally:
        mlflow.set_tracking_uri(None)


# A script run as an entry point (`_cli.run_cli`) that opens a run and logs to it in a loop; the
# first SQL statement starting with WORD that the store executes once it is armed (inside SQLAlchemy,
# a transaction open) sends SIG to the process itself, so the signal's handler runs right there.
_SIGNAL_IN_A_WRITE = """
import os, signal, sys
sys.path.insert(0, {entry_points!r})
import _cli
import sqlalchemy.engine.default
from sample_importance import mlflow_io

execute = sqlalchemy.engine.default.DefaultDialect.do_execute
armed = []

def do_execute(self, cursor, statement, parameters, context=None):
    execute(self, cursor, statement, parameters, context)
    if armed == ["on"] and statement.lstrip().upper().startswith({word!r}):
        armed[0] = "fired"
        os.kill(os.getpid(), signal.{sig})
        armed.append("after")  # the handler has run by here, inside the store call

sqlalchemy.engine.default.DefaultDialect.do_execute = do_execute

def main():
    run = mlflow_io.open_run("logger", "train")
    print(run.run_id, flush=True)
    try:
        armed.append("on")
        for step in range(200):
            run.log_metrics({{"step": float(step)}}, step=step)
            run.set_tags({{"step": str(step)}})
    except BaseException as exc:
        run.end(exc)
        raise
    run.end()

_cli.run_cli(main)
"""


def _sigint_as_in_a_terminal() -> None:
    """A child's SIGINT as a terminal's foreground process has it (a shell's background job, as
    the test suite may be, ignores it, and so would its children)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.parametrize("word, sig", [("SELECT", "SIGTERM"), ("INSERT", "SIGINT")])
def test_an_interrupt_inside_a_store_write_waits_for_it_and_the_run_ends_killed(tmp_path, word, sig):
    """Raised inside the SQL store's call, the interrupt left the SQLite store locked: the run's last
    writes waited 20 s each for the lock, failed, and the run stayed RUNNING. It is now held until the
    store call returns and raised in its caller."""
    script = tmp_path / "logger.py"
    script.write_text(_SIGNAL_IN_A_WRITE.format(entry_points=str(REPO / "entry_points"), word=word, sig=sig))
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db"}
    done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120, preexec_fn=_sigint_as_in_a_terminal)
    run_id = done.stdout.split()[0]
    assert done.returncode == 130 and done.stderr.rstrip().endswith("interrupted"), done.stderr[-3000:]
    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    try:
        run = MlflowClient().get_run(run_id)
        assert run.info.status == "KILLED", (run.info.status, done.stderr[-3000:])
        assert run.data.tags[mlflow_io.TAG_FAILURE] == "interrupted"
        assert run.data.metrics["step"] == 0.0  # the call the signal landed in completed; no other began
    finally:
        mlflow.set_tracking_uri(None)


def _store_call(body: str):
    """A function `call(log)` whose code lies, by its file name, inside SQLAlchemy's package: to
    `_cli`'s interrupt handler it is a call to the SQL store."""
    import sqlalchemy

    source = "import os, signal, time\ndef call(log):\n" + "".join(f"    {line}\n" for line in body.splitlines())
    scope = {}
    exec(compile(source, os.path.join(os.path.dirname(sqlalchemy.__file__), "store_call.py"), "exec"), scope)
    return scope["call"]


@pytest.fixture
def interrupt_on_usr1(monkeypatch):
    """`_cli`'s interrupt handler on SIGUSR1 (holding at most 0.5 s), restored afterwards."""
    import _cli

    monkeypatch.setattr(_cli.HeldInterrupt, "HOLD_S", 0.5)
    previous = signal.signal(signal.SIGUSR1, _cli.HeldInterrupt())
    yield
    signal.signal(signal.SIGUSR1, previous)
    sys.setprofile(None)


def test_an_interrupt_held_for_a_store_call_is_raised_in_its_caller(interrupt_on_usr1):
    call = _store_call("os.kill(os.getpid(), signal.SIGUSR1)\nlog.append('signalled')\n"
                       "for i in range(3): log.append(i)\nreturn 'done'")
    log = []
    with pytest.raises(KeyboardInterrupt) as raised:
        call(log)
    assert log == ["signalled", 0, 1, 2]  # the whole call ran, then the interrupt
    assert raised.traceback[-1].frame.code.name == "_watch"  # raised as the call returned
    assert sys.getprofile() is None
    with pytest.raises(KeyboardInterrupt):  # outside a store call: at once
        os.kill(os.getpid(), signal.SIGUSR1)
        time.sleep(5)
    log.clear()
    profiler = lambda frame, event, arg: None  # noqa: E731
    sys.setprofile(profiler)
    try:
        with pytest.raises(KeyboardInterrupt):  # under a profiler of the user's: at once, left in place
            call(log)
        assert 0 not in log and sys.getprofile() is profiler  # not held to the end of the call
    finally:
        sys.setprofile(None)


def test_a_store_call_that_outlasts_the_hold_is_interrupted_where_it_is(interrupt_on_usr1):
    call = _store_call("os.kill(os.getpid(), signal.SIGUSR1)\nlog.append('signalled')\n"
                       "time.sleep(60)\nlog.append('slept')")
    log, started = [], time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        call(log)
    assert log == ["signalled"] and time.monotonic() - started < 30
    assert sys.getprofile() is None
    again = _store_call("os.kill(os.getpid(), signal.SIGUSR1)\nlog.append('again')")
    with pytest.raises(KeyboardInterrupt):  # the next interrupt in a store call is held again
        again(log)
    assert log == ["signalled", "again"]


@pytest.mark.parametrize("model, depth", [("mlp", 3), ("mlp", 0), ("cnn", 3)])
def test_the_size_check_counts_the_parameters_the_model_has(model, depth):
    """check_model_size refuses by a count made without building the model: it must be the real one."""
    from sample_importance.config import TrainConfig
    from sample_importance.data import training_data
    from sample_importance.models import expected_parameters, model_for

    cfg = TrainConfig(model=model, depth=depth, width=16)
    data = training_data(cfg)
    assert expected_parameters(cfg, data) == sum(p.numel() for p in model_for(cfg, data).parameters())
