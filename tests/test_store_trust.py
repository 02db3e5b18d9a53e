"""What anyone who can write to a shared tracking store controls (runs, tags, artifacts, states) and
what this project never does with it: import code it names, follow a link it planted, wait on a
claim that never expires, print it raw. Each test plants what such a store-writer could, and
fails on the code before these defences."""
from __future__ import annotations

import json
import shutil

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from conftest import all_runs, folded
from sample_importance import dynamics as dyn
from sample_importance import liveness, load_dynamics, mlflow_io
from sample_importance.config import TrainRunConfig
from sample_importance.stages import train as train_stage

pytestmark = pytest.mark.integration  # real processes, stores, servers or trained runs

TINY = dict(subset=100, epochs=2, width=8, batch_size=50, device="cpu")
ARGS = [f"--{k}={v}" for k, v in TINY.items()]


def _one_error_line(capsys) -> str:
    lines = [l for l in capsys.readouterr().err.splitlines() if l.startswith("error: ")]
    assert len(lines) == 1, lines
    return lines[0]


def _cli(entry: str, args: list[str]) -> int:
    import importlib

    from _cli import run_cli

    module = importlib.import_module(entry)
    with pytest.raises(SystemExit) as info:
        run_cli(lambda: module.main(args))
    return info.value.code


def _planted_copy(source_run: str, fingerprint: str, status: str = "FINISHED", tags: dict | None = None,
                  start_time: int | None = None) -> tuple[str, object]:
    """A run a store-writer made: `source_run`'s dynamics copied into it, tagged as a `train` run with
    `fingerprint`; returns (its id, its dynamics folder)."""
    client = MlflowClient()
    exp = mlflow.get_experiment_by_name("Default").experiment_id
    run = client.create_run(exp, run_name="planted", start_time=start_time, tags={
        mlflow_io.TAG_ENTRY_POINT: "train", mlflow_io.TAG_FINGERPRINT: fingerprint,
        mlflow_io.TAG_USER: "mallory@elsewhere", **(tags or {})})
    folder = mlflow_io._local_path(run.info.artifact_uri) / dyn.DIRNAME
    shutil.copytree(load_dynamics(source_run).folder, folder)
    if status != "RUNNING":
        client.set_terminated(run.info.run_id, status)
    return run.info.run_id, folder


def test_a_factory_named_by_a_planted_run_is_never_imported(tracking, capsys):
    """A FINISHED run with the fingerprint of the victim's configuration, whose metadata.json names a
    factory in its own artifacts: the victim's ordinary `explore` reuses the run but imports nothing."""
    source = train_stage.run_train(TrainRunConfig(**{**TINY, "seed": 1}), quiet=True, log_model=False)
    victim = TrainRunConfig(**TINY)
    planted, folder = _planted_copy(source, victim.fingerprint())
    marker = tracking / "factory-ran"
    (folder / "evil.py").write_text(f"import pathlib\npathlib.Path({str(marker)!r}).touch()\n"
                                    "def f(shape, classes):\n    raise SystemExit\n")
    spec = f"mlruns.{folder.parent.parent.parent.name}.{planted}.artifacts.{dyn.DIRNAME}.evil:f"
    meta = json.loads((folder / dyn.METADATA).read_text())
    meta["config"]["model"] = spec
    (folder / dyn.METADATA).write_text(json.dumps(meta))

    assert _cli("explore", folded("explore", ARGS)) == 2
    line = _one_error_line(capsys)
    assert "never imported" in line and spec in line, line
    assert not marker.exists()
    # Named on the command line, a module inside a run's artifacts is still not imported.
    assert _cli("explore", folded("explore", ARGS + [f"--model={spec}"])) == 2
    line = _one_error_line(capsys)
    assert "inside a tracking store's run folder" in line, line
    assert not marker.exists()
    assert all(r.info.status != "RUNNING" for r in all_runs(tracking))


def _checkpointed(tracking, monkeypatch) -> tuple[str, object]:
    """A TINY train run killed after its first epoch's checkpoint: (run id, its dynamics folder)."""
    class Killed(BaseException):
        pass

    real = dyn.save_checkpoint

    def kill_after(state, folder):
        real(state, folder)
        raise Killed

    monkeypatch.setattr(dyn, "save_checkpoint", kill_after)
    with pytest.raises(Killed):
        train_stage.run_train(TrainRunConfig(**TINY), quiet=True, log_model=False)
    monkeypatch.setattr(dyn, "save_checkpoint", real)
    [run] = all_runs(tracking)
    return run.info.run_id, load_dynamics(run.info.run_id, allow_partial=True).folder


@pytest.mark.parametrize("damage", ["flipped bit", "truncated"])
def test_a_damaged_checkpoint_falls_back_to_a_new_run_and_never_blocks(tracking, monkeypatch, capsys, damage):
    killed, folder = _checkpointed(tracking, monkeypatch)
    raw = bytearray((folder / dyn.CHECKPOINT).read_bytes())
    if damage == "flipped bit":
        raw[len(raw) // 3] ^= 0x04  # inside a tensor's bytes: torch.load alone would not notice
    else:
        raw = raw[: len(raw) // 2]
    (folder / dyn.CHECKPOINT).write_bytes(bytes(raw))
    capsys.readouterr()
    fresh = train_stage.run_train(TrainRunConfig(**TINY), quiet=True, log_model=False)
    err = capsys.readouterr().err
    assert fresh != killed and f"note: run {killed}" in err and "cannot be resumed" in err, err
    assert MlflowClient().get_run(fresh).info.status == "FINISHED"
    reference = train_stage.run_train(TrainRunConfig(**TINY), quiet=True, log_model=False)  # an uninterrupted run
    a, b = load_dynamics(fresh), load_dynamics(reference)
    assert (a.importance == b.importance).all() and (a.loss == b.loss).all()
    # Marked once: the next rerun neither resumes nor mentions it.
    assert mlflow_io.TAG_DAMAGED in MlflowClient().get_run(killed).data.tags
    train_stage.run_train(TrainRunConfig(**TINY), quiet=True, log_model=False)
    assert killed not in capsys.readouterr().err


def test_a_symlinked_checkpoint_or_lock_is_never_followed(tracking, monkeypatch, capsys):
    killed, folder = _checkpointed(tracking, monkeypatch)
    mine = tracking / "victims-own.pt"
    (folder / dyn.CHECKPOINT).rename(mine)
    (folder / dyn.CHECKPOINT).symlink_to(mine)  # passes an owner check that follows links
    fresh = train_stage.run_train(TrainRunConfig(**TINY), quiet=True, log_model=False)
    assert fresh != killed and "not resumed unasked" in capsys.readouterr().err
    assert MlflowClient().get_run(killed).info.status == "FAILED"  # not taken over
    # Named explicitly, the link is still not followed: one line.
    assert _cli("train", ARGS + [f"--resume_run_id={killed}"]) == 2
    assert "symbolic link" in _one_error_line(capsys)

    # A planted lock file that links elsewhere: nothing is created where it points.
    target = tracking / "attacker-chosen"
    lock = folder.parent.parent / liveness.LOCK_FILE
    lock.unlink(missing_ok=True)
    lock.symlink_to(target)
    with pytest.raises(liveness.RunLockError, match="symbolic link is never followed"):
        with mlflow_io.claim(killed):
            pass
    assert not target.exists()


@pytest.mark.parametrize("where", ["checkpoint", "model"])
def test_no_space_while_saving_a_state_is_one_line_and_the_rerun_resumes(tracking, monkeypatch, capsys, where):
    import errno

    import torch

    real_save = torch.save

    def full(obj, f, *a, **kw):
        f.write(b"half a file")
        raise OSError(errno.ENOSPC, "No space left on device")

    if where == "checkpoint":
        monkeypatch.setattr(torch, "save", lambda obj, f, *a, **kw: full(obj, f) if "epoch" in obj else
                            real_save(obj, f, *a, **kw))
    else:
        def no_room(*a, **kw):
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")
        monkeypatch.setattr(mlflow.pytorch, "log_model", no_room)
        monkeypatch.setattr(dyn, "_nearly_full", lambda path, margin=0: True)  # the disk that broke the write
    assert _cli("train", ARGS) == 2
    line = _one_error_line(capsys)
    assert line.startswith("error: No space left on the device holding"), line
    [run] = all_runs(tracking)
    assert run.info.status == "FAILED" and "No space left" in run.data.tags[mlflow_io.TAG_FAILURE]
    folder = mlflow_io._local_path(run.info.artifact_uri) / dyn.DIRNAME
    assert not list(folder.glob("*.tmp")), list(folder.iterdir())
    monkeypatch.undo()
    mlflow.set_tracking_uri(f"sqlite:///{tracking}/mlflow.db")
    resumed = train_stage.run_train(TrainRunConfig(**TINY), quiet=True)
    assert (resumed == run.info.run_id) == (where == "model")  # a first epoch without its checkpoint starts anew
    assert MlflowClient().get_run(resumed).info.status == "FINISHED"


def test_a_kill_after_finished_leaves_a_finished_run_and_a_complete_failed_run_is_not_retrained(tracking, monkeypatch):
    class Killed(BaseException):
        pass

    def killed(folder):
        raise Killed

    monkeypatch.setattr(dyn, "discard_checkpoint", killed)
    cfg = TrainRunConfig(**TINY)
    with pytest.raises(Killed):
        train_stage.run_train(cfg, quiet=True)
    [run] = all_runs(tracking)
    assert run.info.status == "FINISHED"
    assert mlflow_io.find_finished_run("train", cfg.fingerprint()) == run.info.run_id
    # The state an earlier version left with a kill between the checkpoint's removal and FINISHED
    # (reaped FAILED afterwards): complete, model logged, no checkpoint.
    (load_dynamics(run.info.run_id).folder / dyn.CHECKPOINT).unlink()
    MlflowClient().set_tag(run.info.run_id, mlflow_io.TAG_FAILURE, "its process (host:1) died")
    MlflowClient().set_terminated(run.info.run_id, "FAILED")
    assert mlflow_io.find_finished_run("train", cfg.fingerprint()) == run.info.run_id
    after = MlflowClient().get_run(run.info.run_id)
    assert after.info.status == "FINISHED" and mlflow_io.TAG_FAILURE not in after.data.tags
    assert len(all_runs(tracking)) == 1


def test_a_planted_running_run_of_another_machine_loses_its_claim(tracking, capsys):
    import time

    cfg = TrainRunConfig(**TINY)
    client = MlflowClient()
    exp = mlflow.get_experiment_by_name("Default").experiment_id
    stale = int((time.time() - 2 * liveness.LEASE_S) * 1000)
    blocker = client.create_run(exp, run_name="planted", start_time=stale, tags={
        mlflow_io.TAG_ENTRY_POINT: "train", mlflow_io.TAG_FINGERPRINT: cfg.fingerprint(),
        mlflow_io.TAG_OWNER: "elsewhere:1", mlflow_io.TAG_USER: "mallory@elsewhere\x1b[2J"}).info.run_id
    fresh = client.create_run(exp, run_name="alive", tags={  # alive on another machine: its lease holds
        mlflow_io.TAG_ENTRY_POINT: "train", mlflow_io.TAG_FINGERPRINT: "other", mlflow_io.TAG_OWNER: "elsewhere:2",
        mlflow_io.TAG_HEARTBEAT: str(int(time.time()))}).info.run_id
    run_id = train_stage.run_train(cfg, quiet=True, log_model=False)
    assert run_id != blocker and client.get_run(run_id).info.status == "FINISHED"
    planted = client.get_run(blocker)
    assert planted.info.status == "FAILED" and "sent no heartbeat" in planted.data.tags[mlflow_io.TAG_FAILURE]
    assert client.get_run(fresh).info.status == "RUNNING"


def test_text_from_the_store_is_printed_escaped():
    assert mlflow_io.shown("bob\x1b[31m\r\nrm") == "bob\\x1b[31m\\r\\nrm"
    assert mlflow_io.shown("plain text: é") == "plain text: é"


def test_markup_in_store_text_cannot_break_the_explorer_page():
    from sample_importance.explorer.html import render

    nasty = 'run <!--<script> x </script><script>alert(1)</script> "q" & é'
    payload = {"title": nasty, "runs": [{"run_id": "a", "role": nasty, "url": None}], "dataset": nasty}
    page = render(payload)
    start = page.index('<script type="application/json" id="si-data">') + len('<script type="application/json" id="si-data">')
    data = page[start:page.index("</script>", start)]
    assert "<" not in data and json.loads(data) == payload
    assert "alert(1)</script>" not in page


def test_a_planted_influence_table_without_sample_id_is_left_out(tracking, capsys):
    source = train_stage.run_train(TrainRunConfig(**TINY), quiet=True, log_model=False)
    client = MlflowClient()
    exp = mlflow.get_experiment_by_name("Default").experiment_id
    planted = client.create_run(exp, run_name="planted", tags={
        mlflow_io.TAG_ENTRY_POINT: "influence", "sample_importance.train_run_id": source}).info.run_id
    client.log_text(planted, "guid,influence_test_loss\n1,oops\n", "influence.csv")
    client.set_terminated(planted, "FINISHED")
    import explore

    explore.main(folded("explore", ARGS + [f"--train_run_ids={source}"]))
    out = capsys.readouterr()
    assert "influence scores are left out" in out.out and "'sample_id' is missing" in out.out, out
    assert "Traceback" not in out.err
    [explore] = [r for r in all_runs(tracking) if r.data.tags.get(mlflow_io.TAG_ENTRY_POINT) == "explore"]
    assert explore.info.status == "FINISHED"


def _entry(store, entry: str, *args: str, uri: str | None = None):
    import os
    import subprocess
    import sys

    from conftest import REPO

    env = {**os.environ, "MLFLOW_TRACKING_URI": uri or f"sqlite:///{store}/mlflow.db", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, str(REPO / "entry_points" / f"{entry}.py"), *args], cwd=store, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_two_processes_starting_on_an_empty_sqlite_store(tmp_path):
    procs = [_entry(tmp_path, "decompose", "--train_run_ids=0123456789abcdef0123456789abcdef") for _ in range(2)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 2 and "does not exist in the tracking store" in out, out[-3000:]
        assert "Traceback" not in out, out[-3000:]


@pytest.mark.parametrize("uri, message", [
    ("http://127.0.0.1:9", "cannot be used"),
    ("file:///{tmp}/store", "cannot be used"),
    ("nosuchscheme://somewhere", "cannot be used"),
    ("postgresql+pg8000://someone@127.0.0.1:9/db", "needs the Python package pg8000"),
])
def test_a_tracking_uri_that_cannot_work_is_one_line_at_once(tmp_path, uri, message):
    import importlib.util
    import time

    if "pg8000" in uri and importlib.util.find_spec("pg8000") is not None:
        pytest.skip("pg8000 is installed here: the case needs a database driver that is missing")

    start = time.monotonic()
    proc = _entry(tmp_path, "train", *ARGS, uri=uri.format(tmp=tmp_path))
    out = proc.communicate(timeout=120)[0]
    took = time.monotonic() - start
    lines = [l for l in out.splitlines() if l.strip() and "Warning" not in l and not l.startswith(" ")]
    assert proc.returncode == 2 and lines and lines[-1].startswith("error: The tracking store") and message in lines[-1], out
    assert "Traceback" not in out and took < 15, (took, out)


def test_a_run_config_of_the_wrong_type_is_one_sentence():
    from sample_importance.config import trained_config
    from sample_importance.dynamics import DynamicsError

    with pytest.raises(DynamicsError, match=r"config\.'lr' is str, not float"):
        trained_config({"run_id": "r", "config": {"lr": "0.1"}})
    with pytest.raises(DynamicsError, match=r"config\.'evil' is not a training option"):
        trained_config({"run_id": "r", "config": {"evil": 1}})
    assert trained_config({"config": {"lr": 1, "seed": 3}}, device="cpu").lr == 1
