"""A tracking store written by a release (tests/data/store-<commit>.tar.gz, made by
tests/data/make_release_store.py with that release's code) still works under today's code: its
finished train run is reused, its interrupted one resumes and finishes in the same run, and its
analyses are found by the configurations that name them today (the composed ones included)."""
from __future__ import annotations

import json
import sqlite3
import tarfile
from pathlib import Path

import numpy as np
import pytest

from conftest import all_runs
from sample_importance import config as C
from sample_importance import liveness, load_dynamics, mlflow_io
from sample_importance.runs import get_or_train, run_train

pytestmark = pytest.mark.integration  # real processes, stores, servers or trained runs

RELEASE = sorted((Path(__file__).parent / "data").glob("store-*.tar.gz"))[-1]


@pytest.fixture
def release(tracking):
    """The release's store, moved into this test's folder (its artifact locations name the folder it
    was written in) and this user's (its runs name the user who made them)."""
    with tarfile.open(RELEASE) as tar:
        tar.extractall(tracking, filter="data")
    info = json.loads((tracking / "release.json").read_text())
    db = sqlite3.connect(tracking / "mlflow.db")
    for table, column in (("experiments", "artifact_location"), ("runs", "artifact_uri")):
        db.execute(f"UPDATE {table} SET {column} = replace({column}, ?, ?)", (info["folder"], str(tracking)))
    db.execute("UPDATE tags SET value = ? WHERE key = ?", (liveness.user(), mlflow_io.TAG_USER))
    db.commit()
    db.close()
    return info


def test_finished_runs_of_a_release_are_reused(release):
    train = C.TrainConfig(**release["train"])
    before = len(all_runs(None))
    assert get_or_train([train]) == [release["finished"]]
    assert len(all_runs(None)) == before  # nothing trained
    assert load_dynamics(release["finished"]).importance.shape == (3, 60, 2)
    # The analyses, written with the flat training fields, are found by today's composed configurations.
    assert mlflow_io.find_finished_run(
        "decompose", C.DecomposeConfig(train=train, train_run_ids=release["finished"]).fingerprint()) == release["decompose"]
    assert mlflow_io.find_finished_run("scores", C.ScoresConfig(train=train).fingerprint()) == release["scores"]


def test_an_interrupted_run_of_a_release_resumes_in_the_same_run(release):
    cfg = C.TrainConfig(**release["train"], seed=1)
    (interrupted,) = [r.info.run_id for r in all_runs(None) if r.info.status != "FINISHED"]
    assert run_train(cfg, log_model=False, quiet=True) == interrupted
    d = load_dynamics(interrupted)
    assert d.importance.shape == (3, 60, 2) and np.isfinite(d.importance).all()
    assert mlflow_io.get_run(interrupted).info.status == "FINISHED"
