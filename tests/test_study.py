"""The analysis entry points and `main` (the study with its report), end to end."""
from __future__ import annotations

import dataclasses
import re

import mlflow
import numpy as np
import pytest
import yaml
from mlflow.tracking import MlflowClient

from conftest import REPO, all_runs
from sample_importance import config as C
from sample_importance.data import load_dataset
from sample_importance.stages import STAGES
from test_train_entry import _mlflow_run

pytestmark = pytest.mark.integration  # real processes, stores, servers or trained runs

ENTRY_CONFIGS = {name: stage.config for name, stage in STAGES.items()}  # the registry owns the list


def test_mlproject_parameters_mirror_the_configs():
    spec = yaml.safe_load((REPO / "MLproject").read_text())
    assert set(spec["entry_points"]) == set(ENTRY_CONFIGS)
    for name, cls in ENTRY_CONFIGS.items():
        ep = spec["entry_points"][name]
        fields = {f.name: f.default for f in dataclasses.fields(cls)}
        assert list(ep["parameters"]) == list(fields), name
        for key, default in fields.items():
            declared = ep["parameters"][key]["default"]
            if key == "data_dir":
                assert declared == "~/.cache/sample-importance"
            else:  # a block of options is declared as its key=value text ("" = its defaults)
                assert getattr(cls(**{key: type(cls().params()[key])(declared)}), key) == default, (name, key)
            assert f"--{key} {{{key}}}" in ep["command"], (name, key)
        assert ep["command"].startswith(f"python entry_points/{name}.py ")




def test_analyses_take_their_own_options_and_the_runs_they_read():
    """An analysis entry point takes at most 8 parameters: its own, train_run_ids, and the training
    configuration as one block; its fingerprint is the one of the flat configuration it replaced."""
    spec = yaml.safe_load((REPO / "MLproject").read_text())
    analyses = [name for name, stage in STAGES.items() if issubclass(stage.config, C.AnalysisConfig)]
    assert {"decompose", "nll", "cluster", "scores", "explore", "influence"} <= set(analyses)
    for name in analyses:
        params = spec["entry_points"][name]["parameters"]
        assert len(params) <= 8 and {"train_run_ids", "train"} <= set(params), (name, list(params))
        assert not set(params) & {f.name for f in dataclasses.fields(C.TrainConfig)}, name
    cfg = C.ClusterConfig(train="epochs=3 'data_dir=/a folder/x' lr=0.05", label=2)
    assert cfg.train == C.TrainConfig(epochs=3, data_dir="/a folder/x", lr=0.05)
    assert C.ClusterConfig(train=cfg.params()["train"], label=2) == cfg  # the text a launcher passes on reads back
    with pytest.raises(C.ConfigError, match="'epoch=3' is not one of its options"):
        C.ClusterConfig(train="epoch=3")
    with pytest.raises(C.ConfigError, match="lr must be positive, got -1.0"):
        C.ScoresConfig(train="lr=-1").check()


def test_mlproject_and_entry_point_scripts_are_generated_from_the_stage_registry():
    import importlib.util

    spec = importlib.util.spec_from_file_location("write_mlproject", REPO / "tools" / "write_mlproject.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    assert (REPO / "MLproject").read_text() == tool.render(), "run python tools/write_mlproject.py"
    assert (REPO / "docs" / "parameters.md").read_text() == tool.parameters_page(), "run python tools/write_mlproject.py"
    for name in STAGES:
        assert (REPO / "entry_points" / f"{name}.py").read_text() == tool.script(name), name


@pytest.fixture
def short_train(tracking):
    import train as train_entry

    return train_entry.main(["--subset", "100", "--epochs", "2", "--width", "8", "--batch_size", "50"])


@pytest.mark.parametrize("entry", ["stability", "decompose", "nll", "cluster", "explore"])
def test_analysis_of_a_missing_run_names_it(tracking, capsys, entry):
    from _cli import run_cli

    module = __import__(entry)
    ids = "0123456789abcdef0123456789abcdef" + (",fedcba9876543210fedcba9876543210" if entry == "stability" else "")
    with pytest.raises(SystemExit) as info:
        run_cli(lambda: module.main(["--train_run_ids", ids]))
    assert info.value.code == 2
    err = [l for l in capsys.readouterr().err.splitlines() if l.startswith("error: ")]
    assert len(err) == 1 and "Run '0123456789abcdef0123456789abcdef' does not exist" in err[0], err
    assert all(r.info.status != "RUNNING" for r in all_runs(tracking))


def test_analysis_of_a_run_without_dynamics_names_it(tracking, capsys):
    import nll
    from _cli import run_cli

    with mlflow.start_run() as other:
        mlflow.log_param("x", 1)
    with pytest.raises(SystemExit):
        run_cli(lambda: nll.main(["--train_run_ids", other.info.run_id]))
    err = [l for l in capsys.readouterr().err.splitlines() if l.startswith("error: ")]
    assert len(err) == 1 and f"Run {other.info.run_id} has no dynamics/ artifacts" in err[0], err


def test_runs_of_different_samples_are_refused(tracking, capsys, short_train):
    import stability
    import train as train_entry
    from _cli import run_cli

    other = train_entry.main(["--subset", "150", "--epochs", "2", "--width", "8", "--batch_size", "50"])
    with pytest.raises(SystemExit):
        run_cli(lambda: stability.main(["--train_run_ids", f"{short_train},{other}"]))
    err = [l for l in capsys.readouterr().err.splitlines() if l.startswith("error: ")]
    assert len(err) == 1 and "cannot be compared: n is 100 in one and 150 in the other" in err[0], err


def test_cluster_on_given_run_logs_assignments_and_claim(tracking, short_train):
    import cluster

    run_id = cluster.main(["--train_run_ids", short_train, "--label", "3", "--num_clusters", "3"])
    client = MlflowClient()
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["sample_importance.train_run_ids"] == short_train
    csv = mlflow.artifacts.load_text(f"runs:/{run_id}/clusters.csv").splitlines()
    threes = [int(i) for i in np.flatnonzero(load_dataset("digits", "", 100).y_train == 3)]
    assert csv[0] == "sample_id,cluster,mean_nll"
    assert [int(line.split(",")[0]) for line in csv[1:]] == threes  # every 3, by sample id
    claims = mlflow.artifacts.load_dict(f"runs:/{run_id}/claims.json")
    assert [c["number"] for c in claims] == [5]
    assert len(client.get_metric_history(run_id, "cluster_peak_epoch")) == 3


def test_main_runs_the_study_once_then_reuses_it(tracking):
    params = ["-P", "subset=150", "-P", "epochs=4", "-P", "width=16", "-P", "batch_size=50", "-P", "every=2",
              "-P", "num_clusters=3", "-P", "label=3"]
    first = _mlflow_run(tracking, *params)
    runs = all_runs(tracking)
    kinds = sorted(r.data.tags.get("sample_importance.entry_point") for r in runs)
    assert kinds == ["cluster", "decompose", "main", "nll", "stability", "train", "train", "train"], first.stderr[-3000:]
    assert all(r.info.status == "FINISHED" for r in runs)
    main = next(r for r in runs if r.data.tags["sample_importance.entry_point"] == "main")
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == main.info.run_id]
    assert sorted(r.data.tags["sample_importance.entry_point"] for r in children) == \
        ["cluster", "decompose", "nll", "stability", "train"]
    html = mlflow.artifacts.load_text(f"runs:/{main.info.run_id}/report.html")
    assert html.count('<td class="yes">') + html.count('<td class="no">') == 5
    assert len(re.findall(r'<img src="data:image/png;base64,', html)) >= 10
    assert "does not exist" not in html
    from test_difficulty import explorer_payload  # the explorer: train run, its other seeds, its clusters

    page = explorer_payload(main.info.run_id)
    assert len(page["other_runs"]) == 2 and len(page["cluster_summary"]) == 3
    for n in range(1, 6):
        assert re.search(rf"claim {n}: (holds|does not hold) -- ", first.stdout), n

    second = _mlflow_run(tracking, *params)
    runs_after = all_runs(tracking)
    assert len(runs_after) == len(runs) + 1  # only a new `main` run: every step was reused
    assert second.stdout.count("reusing") == 5
