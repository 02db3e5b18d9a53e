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

from conftest import all_runs
from sample_importance import dynamics as dyn
from sample_importance import load_dynamics, mlflow_io
from sample_importance.config import TrainRunConfig
from sample_importance.stages import train as train_stage

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

    assert _cli("explore", ARGS) == 2
    line = _one_error_line(capsys)
    assert "never imported" in line and spec in line, line
    assert not marker.exists()
    # Named on the command line, a module inside a run's artifacts is still not imported.
    assert _cli("explore", ARGS + [f"--model={spec}"]) == 2
    line = _one_error_line(capsys)
    assert "inside a tracking store's run folder" in line, line
    assert not marker.exists()
    assert all(r.info.status != "RUNNING" for r in all_runs(tracking))
