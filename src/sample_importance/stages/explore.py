"""The `explore` stage, and the hook `main`, `scores` and `learnability` call at their end:
one self-contained `explorer.html` for a train run (or several runs of the same samples: other
seeds or architectures add their curves), with the clusters of a `cluster` run when there is one.
MLflow is reached only through `mlflow_io`; the page's data comes from `explorer.data`."""
from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from .. import mlflow_io
from ..analysis import scores as S
from ..config import ConfigError, ExploreConfig, architecture_of, trained_config
from ..data import load_dataset, training_data
from ..dynamics import FINAL_STATE, Dynamics, check_aligned
from ..models import model_of_run
from .common import TAG_TRAIN_RUNS, start_analysis, train_runs
from ..explorer import data as X
from ..explorer.html import render

ARTIFACT = "explorer.html"


def final_predictions(d: Dynamics, data, model: str = "") -> np.ndarray:
    """(n,) the class each training sample gets under the run's final parameters (dynamics/final_state.pt,
    checked against its checksum). `model`: the factory the user named, if the run's model is one."""
    net = model_of_run(trained_config(d.metadata, device="cpu"), data, model)
    net.load_state_dict(d.state(FINAL_STATE))
    net.eval()
    x = torch.as_tensor(data.x_train[np.asarray(d.sample_id)])
    with torch.no_grad():
        return torch.cat([net(x[i:i + 8192]).argmax(1) for i in range(0, len(x), 8192)]).numpy()


CLUSTER_SUMMARY = ("cluster", "size", "difficulty", "peak_epoch")  # the columns cluster_payload reads


def cluster_payload(n_ids: np.ndarray, clusters: pd.DataFrame, summary: pd.DataFrame) -> tuple[np.ndarray, list[dict]]:
    """A cluster run's clusters.csv and cluster_summary.csv -> (n,) cluster per sample (-1 = not
    clustered) and one dict per cluster, easiest first (the cluster step numbers them by rank)."""
    position = {int(s): k for k, s in enumerate(n_ids)}
    assign = np.full(len(n_ids), -1, dtype=np.int32)
    for s, c in zip(clusters["sample_id"], clusters["cluster"]):
        if int(s) in position:
            assign[position[int(s)]] = int(c)
    rows = [{"cluster": int(r.cluster), "rank": k, "size": int(r.size), "difficulty": float(r.difficulty),
             "peak_epoch": int(r.peak_epoch)} for k, r in enumerate(summary.sort_values("difficulty").itertuples())]
    return assign, rows


def curve_runs(runs: dict[str, Dynamics], limit: int) -> list[Dynamics]:
    """The runs whose curves the page carries: the first, its other seeds, then the first run of each
    other architecture, at most `limit` in all (each adds as much to the file as the first)."""
    first, *rest = runs.values()
    rest = [r for r in rest if r.has_importance]  # a track=outputs run has no importance curve
    chosen = [first] + [r for r in rest if same_architecture(r, first)]
    for r in rest:
        if not any(same_architecture(r, c) for c in chosen):
            chosen.append(r)
    return chosen[:max(1, limit)]


# Columns of an influence run's influence.csv shown as scores: dT/dv_i of the whole model (fixed point,
# and unrolled through the SGD run), for each target; "harder" ranks first: the sample whose up-weighting
# raises the test loss (or the class probability) most, and for `self` the most negative (the sample
# that most lowers its own loss: the memorised, atypical ones).
INFLUENCE_SCORES = {"influence_test_loss": True, "influence_class_prob": True, "influence_self": False,
                    "unrolled_test_loss": True, "unrolled_class_prob": True}


def influence_scores(n_ids: np.ndarray, table: pd.DataFrame) -> dict[str, np.ndarray]:
    """An influence run's influence.csv -> {column: (n,) values in the order of `n_ids`} for the
    columns of INFLUENCE_SCORES it has; nothing when it does not list every sample."""
    position = pd.Series(np.arange(len(table)), index=table["sample_id"].to_numpy())
    where = position.reindex(np.asarray(n_ids)).to_numpy()
    if np.isnan(where).any():
        return {}
    rows = where.astype(int)
    columns = {col: pd.to_numeric(table[col], errors="coerce").to_numpy(np.float64)[rows]
               for col in INFLUENCE_SCORES if col in table}
    return {col: v for col, v in columns.items() if np.isfinite(v).all()}  # a column of a damaged file is left out


def same_architecture(a: Dynamics, b: Dynamics) -> bool:
    return architecture_of(a.metadata["config"]) == architecture_of(b.metadata["config"])


def explorer_html(runs: dict[str, Dynamics], data_dir: str, early_epoch: int = 2,
                  cluster: tuple[str, pd.DataFrame, pd.DataFrame] | None = None,
                  links: dict[str, str | None] | None = None, max_curve_runs: int = 3,
                  influence: tuple[str, pd.DataFrame] | None = None, model: str = "") -> str:
    """The page for `runs` (run id -> dynamics of the same samples): the first is shown; the curves
    of up to `max_curve_runs` - 1 others (other seeds first, then one run per other architecture)
    are drawn beside its own, and with several runs of its architecture their learnability (Lee et
    al. 2019, eq. 1) is a score. `cluster`: (run id, clusters.csv, cluster_summary.csv) of a cluster
    run of the first run; `influence`: (run id, influence.csv) of an influence run of it, whose
    influence columns become scores. `model`: the factory the user named, when the run's model is
    one (its final predictions rebuild it; a factory named only by the run's files is never imported)."""
    check_aligned(runs)
    run_ids = list(runs)
    d = runs[run_ids[0]]
    meta = d.metadata
    if not d.has_importance:
        raise ConfigError(f"Run {run_ids[0]} was trained with track=outputs: the explorer shows sample importance, "
                          "which it did not record; explore a run trained with track=importance.")
    own = meta.get("source") == "track_run"  # the researcher's model and data: not rebuilt, no images
    if own and d.final_prediction is None:
        raise ConfigError(f"Run {run_ids[0]} was made by track_run without the final logits, and the explorer cannot "
                          "rebuild the researcher's model for its final predictions: record them with "
                          "run.record_final_loss(ids, loss_i, logits), or explore runs of `train`.")
    E = int(meta["epochs_completed"])
    if not 1 <= early_epoch <= E:
        raise ConfigError(f"early_epoch={early_epoch} is outside the run's {E} epochs: choose 1 to {E}.")
    seeds = [r for r in runs.values() if same_architecture(r, d)]
    # The scores as their authors define them (analysis.scores.SCORES): EL2N and GraNd averaged over
    # the seeds given; scores a run cannot give (no end-of-epoch evaluation) are left out.
    table, _missing = S.score_table(seeds, early_epoch)
    harder = dict(S.HARDER_IS_LARGER)
    # An in-batch variant is left out where its author's definition is there (scores.csv keeps both):
    # five fewer columns keep a full-size file under 25 MB.
    scores = {c: table[c].to_numpy() for c in table.columns if c not in ("sample_id", "label")
              and not (c.endswith("_inbatch") and c.removesuffix("_inbatch") in table)}
    if len(seeds) > 1 and all(r.has_eval for r in seeds):  # Lee et al.'s learnability (eq. 1), end-of-epoch p_true
        scores["learnability"] = S.learnability([np.asarray(r.eval_p_true) for r in seeds])
        harder["learnability"] = False
    cfg = None if own else trained_config(meta, data_dir=data_dir, device="cpu")
    data = None if own else training_data(cfg)  # the run's samples, its label noise included
    ids = np.asarray(d.sample_id)
    if influence is not None:
        for col, values in influence_scores(ids, influence[1]).items():
            scores[col], harder[col] = values, INFLUENCE_SCORES[col]
    flipped = None
    if not own and float(meta["config"].get("label_noise", 0.0)) > 0:
        flipped = np.asarray(d.label) != load_dataset(cfg.dataset, data_dir, cfg.subset).y_train[ids]
    assign, summary, cluster_run = None, None, None
    if cluster is not None:
        cluster_run, clusters, csum = cluster
        assign, summary = cluster_payload(ids, clusters, csum)
    def name(r: Dynamics) -> str:  # "seed 1", or "seed 0, cnn" for another architecture
        arch = "" if same_architecture(r, d) else ", " + architecture_of(r.metadata["config"])
        return f"seed {r.metadata['seed']}{arch}"

    others = [{"name": name(r), "layers": r.layer_names, "curves": X.run_curves(r.importance, r.loss, r.p_true)}
              for r in curve_runs(runs, max_curve_runs)[1:]]
    links = links or {}
    run_rows = [{"run_id": rid, "role": "train run" if k == 0 else name(runs[rid]), "url": links.get(rid)}
                for k, rid in enumerate(run_ids)]
    if cluster_run:
        run_rows.append({"run_id": cluster_run, "role": "cluster run", "url": links.get(cluster_run)})
    if influence is not None:
        run_rows.append({"run_id": influence[0], "role": "influence run", "url": links.get(influence[0])})
    title = (f"Sample explorer: {meta['dataset']}, {len(ids):,} training samples, {E} epochs"
             + (f", seed {meta['seed']}" if meta.get("seed") is not None else "")
             + (f", label noise {meta['config']['label_noise']:g}" if flipped is not None else ""))
    payload = X.assemble(
        title=title, dataset=meta["dataset"], layer_names=d.layer_names, sample_id=ids, label=np.asarray(d.label),
        prediction=np.asarray(d.final_prediction) if own else final_predictions(d, data, model), scores=scores,
        harder_is_larger=harder, curves=X.run_curves(d.importance, d.loss, d.p_true),
        images=None if own else X.sprite_sheets(X.to_uint8_images(data.x_train[ids], meta["image_shape"])),
        num_classes=int(meta["num_classes"] if own else meta.get("num_classes", data.num_classes)), runs=run_rows,
        other_curves=others,
        flipped=flipped, cluster=assign, cluster_summary=summary,
        contribution=None if d.contribution is None else np.asarray(d.contribution).transpose(2, 1, 0),
        target=str(meta.get("target", "")),
        # Cartography's axes from the end-of-epoch evaluation; a run without it (schema 2) shows the in-batch ones.
        map_axes=("variability", "confidence") if "variability" in scores else ("variability_inbatch", "confidence_inbatch"))
    if summary is not None:
        payload["cluster_note"] = (f"k-means on the importance profiles of one class (cluster run {cluster_run}); "
                                   "ranked by mean in-batch NLL, easiest first; click a title to filter the table")
    return render(payload)


def log_explorer(train_run_ids: list[str], data_dir: str, early_epoch: int = 2, cluster_run_id: str = "",
                 tracking_url: str = "", model: str = "") -> str:
    """Build the explorer of these train runs and log it as `explorer.html` of the active run.
    `cluster_run_id` empty: the newest finished `cluster` run of the first train run, if any; the
    influence columns of its newest finished `influence` run are shown as scores."""
    runs = {rid: mlflow_io.load_dynamics(rid) for rid in train_run_ids}
    named = bool(cluster_run_id)
    cluster_run_id = cluster_run_id or mlflow_io.find_cluster_run(train_run_ids[0]) or ""
    cluster = None
    try:
        if cluster_run_id:
            cluster = (cluster_run_id, mlflow_io.load_table(cluster_run_id, "clusters.csv", ("sample_id", "cluster")),
                       mlflow_io.load_table(cluster_run_id, "cluster_summary.csv", CLUSTER_SUMMARY))
    except mlflow_io.RunLookupError as exc:
        if named:
            raise
        print(f"note: the clusters are left out: {exc}", flush=True)  # a run found, not asked for
        cluster, cluster_run_id = None, ""
    influence_run_id = mlflow_io.find_influence_run(train_run_ids[0]) or ""
    influence = None
    if influence_run_id:
        try:
            influence = (influence_run_id, mlflow_io.load_table(influence_run_id, "influence.csv", (
                "sample_id",)))
        except mlflow_io.RunLookupError as exc:
            print(f"note: the influence scores are left out: {exc}", flush=True)
            influence_run_id = ""
    base = tracking_url or mlflow_io.tracking_ui_url()
    links = {rid: mlflow_io.run_link(rid, base) for rid in [*train_run_ids, cluster_run_id, influence_run_id]
             if rid and base}
    html = explorer_html(runs, data_dir, early_epoch, cluster, links, influence=influence, model=model)
    mlflow_io.log_text(html, ARTIFACT)
    print(f"explorer: {mlflow_io.artifact_uri(ARTIFACT)} ({len(html) / 1e6:.1f} MB)", flush=True)
    return html


def log_explorer_of_active_run(data_dir: str, early_epoch: int = 2, cluster_run_id: str = "", model: str = "") -> None:
    """The hook at the end of `scores` and `learnability`: the explorer of the train runs the active
    run analysed (its train-run tag)."""
    ids = [s for s in mlflow_io.run_tag(mlflow_io.active_run_id(), TAG_TRAIN_RUNS).split(",") if s]
    try:
        log_explorer(ids, data_dir, early_epoch, cluster_run_id, model=model)
    except ConfigError as exc:  # the stage's own results stand; say why there is no explorer
        print(f"note: no explorer.html: {exc}", flush=True)
        mlflow_io.set_tags({"sample_importance.explorer": f"not made: {exc}"[:5000]})


def run(cfg: ExploreConfig) -> str:
    """The `explore` entry point: the explorer of the given (or matching) train runs."""
    with start_analysis(cfg, "explore", "Every training sample one click away: explorer.html") as run:
        t = cfg.train
        ids = list(train_runs(cfg, [t.seed]))
        log_explorer(ids, t.data_dir, t.early_epoch, cfg.cluster_run_id, cfg.tracking_url, t.model)
        return run.info.run_id
