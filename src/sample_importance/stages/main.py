"""The `main` stage: the study as one parent run (train, stability, decompose, nll, cluster as child
runs launched with `mlflow run`, finished ones reused) and its `report.html`."""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from .. import mlflow_io
from ..config import ClusterConfig, DecomposeConfig, NllConfig, StabilityConfig, StudyConfig
from ..data import training_data
from ..report import render_report
from ..training import check_batching
from ..runs import get_or_train
from .cluster import check_class_size
from .common import CLAIMS, TAG_TRAIN_RUNS
from .explore import log_explorer


STEPS = ("stability", "decompose", "nll", "cluster")


def _step_configs(cfg: StudyConfig, train_run_id: str) -> dict:
    """The configuration of every analysis step of the study, reading the train run `train_run_id`."""
    train = cfg.train_config()
    return {
        "stability": StabilityConfig(**train.to_dict(), num_seeds=cfg.num_seeds, every=cfg.every),
        "decompose": DecomposeConfig(train=train, train_run_ids=train_run_id),
        "nll": NllConfig(train=train, train_run_ids=train_run_id),
        "cluster": ClusterConfig(train=train, train_run_ids=train_run_id, label=cfg.label, num_clusters=cfg.num_clusters),
    }


def _check_against_data(cfg: StudyConfig) -> None:
    """What the data alone decides: the batch must fit the training set, and the class to cluster
    must have enough training samples."""
    data = training_data(cfg)
    check_batching(cfg, data.n_train)
    check_class_size(cfg.label, int((data.y_train == cfg.label).sum()), cfg.num_clusters)


def run(cfg: StudyConfig, project_dir: str | Path) -> str:
    """The study as one parent run: train, then stability, decompose, nll and cluster as child runs
    (each reused when a finished run with the same configuration exists), then `report.html`."""
    cfg.check()
    tcfg = cfg.train_config()
    # Every step's configuration is checked before the first step runs (a bad label or num_seeds
    # must not cost a training run first); the train run's id is filled in once it exists.
    for scfg in _step_configs(cfg, "").values():
        scfg.check()
    _check_against_data(cfg)
    with mlflow_io.start_run(f"main {cfg.dataset}", "main",
                             description=f"The sample-importance study on {cfg.dataset}: training, stability, "
                                         "decomposition, NLL correlation, clustering; see report.html.",
                             config=cfg.to_dict()) as run:
        runs = {}
        runs["train"] = get_or_train([tcfg], launch_from=project_dir)[0]
        configs = _step_configs(cfg, runs["train"])
        for step, scfg in configs.items():
            runs[step], reused = mlflow_io.ensure_child(project_dir, step, scfg, f"{step} {cfg.dataset}")
            print(f"{'reusing' if reused else 'finished'} {step} run {runs[step]}", flush=True)
        mlflow_io.set_tags({f"sample_importance.{step}_run_id": rid for step, rid in runs.items()})

        claims, figures, sections = [], {}, {}
        for step in ("train", *STEPS):
            names = mlflow_io.list_artifacts(runs[step], "figures")
            sections[step] = [f"{step}/{name}" for name in names]
            for name in names:
                figures[f"{step}/{name}"] = mlflow_io.download_bytes(runs[step], name)
            if step != "train":
                claims += [{**c, "run": step} for c in mlflow_io.load_dict(runs[step], CLAIMS)]
        html = render_report(f"Sample importance on {cfg.dataset}", claims, figures, cfg.to_dict(), runs, sections)
        mlflow_io.log_text(html, "report.html")
        mlflow_io.log_table(pd.DataFrame(claims), "claims.csv")
        mlflow_io.log_metrics({"claims_holding": sum(c["holds"] for c in claims), "claims_total": len(claims)},
                              step=0)
        for c in claims:
            print(f"claim {c['number']}: {'holds' if c['holds'] else 'does not hold'} -- {c['measured']}")
        # The explorer of the train run, its other seeds and its clusters.
        seeds = [s for s in mlflow_io.run_tag(runs["stability"], TAG_TRAIN_RUNS).split(",") if s and s != runs["train"]]
        log_explorer([runs["train"], *seeds], cfg.data_dir, min(2, cfg.epochs), runs["cluster"])
        print(f"report: {mlflow_io.artifact_uri('report.html')}", flush=True)
        return run.info.run_id
