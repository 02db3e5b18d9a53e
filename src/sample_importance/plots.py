"""Figures: each function takes data and returns a matplotlib Figure (never shows or saves it)."""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # headless: figures are logged, never shown
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402


def error_curves(history: list[dict[str, float]]) -> plt.Figure:
    """Train (in-batch) and test error over epochs (paper fig. 9)."""
    epochs = np.arange(1, len(history) + 1)
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(epochs, [h["train_error"] for h in history], label="train (in-batch)")
    ax.plot(epochs, [h["test_error"] for h in history], label="test")
    ax.set(xlabel="epoch", ylabel="error", title="Error over training")
    ax.legend()
    fig.tight_layout()
    return fig


def layer_importance(importance_per_layer: np.ndarray, layer_names: list[str],
                     param_counts: list[int] | None = None) -> plt.Figure:
    """Overall importance A^t stacked by layer B_d^t over epochs (paper fig. 2); with parameter
    counts, a second panel shows the importance per parameter of each layer.

    Args:
        importance_per_layer: (E, L) B_d^t = sum over samples of beta_{i,d}^t.
    """
    E, L = importance_per_layer.shape
    epochs = np.arange(1, E + 1)
    panels = 2 if param_counts is not None else 1
    fig, axes = plt.subplots(1, panels, figsize=(5 * panels, 3.5), squeeze=False)
    ax = axes[0, 0]
    ax.stackplot(epochs, importance_per_layer.T, labels=layer_names)
    ax.set(xlabel="epoch", ylabel="importance  $B_d^t$", title="Sample importance by layer")
    ax.legend(loc="upper right", fontsize="small")
    if param_counts is not None:
        ax = axes[0, 1]
        for d, name in enumerate(layer_names):
            ax.plot(epochs, importance_per_layer[:, d] / param_counts[d], label=name)
        ax.set(xlabel="epoch", ylabel="importance per parameter", yscale="log", title="Per parameter")
        ax.legend(fontsize="small")
    fig.tight_layout()
    return fig


def total_importance_histogram(total_importance: np.ndarray) -> plt.Figure:
    """Histogram of the samples' total importance tau_i (paper fig. 10), log-spaced bins."""
    tau = np.asarray(total_importance, dtype=np.float64)
    positive = tau[tau > 0]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    if len(positive):
        bins = np.geomspace(positive.min(), positive.max(), 50) if positive.max() > positive.min() else 10
        ax.hist(positive, bins=bins)
        ax.set_xscale("log")
    ax.set(xlabel=r"total importance $\tau_i$", ylabel="samples", title=f"Total importance of {len(tau)} samples")
    fig.tight_layout()
    return fig


def stability_curves(table) -> plt.Figure:
    """Spearman correlation of alpha_i^t between seeds per evaluated epoch, one line per pair
    (paper fig. 1), and the Jaccard overlap of their top samples."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    for (sa, sb), g in table.groupby(["seed_a", "seed_b"]):
        axes[0].plot(g["epoch"], g["spearman"], marker="o", label=f"seed {sa} vs {sb}")
        axes[1].plot(g["epoch"], g["jaccard_top"], marker="o", label=f"seed {sa} vs {sb}")
    axes[0].set(xlabel="epoch", ylabel="Spearman", title="Importance rank correlation across initialisations")
    axes[1].set(xlabel="epoch", ylabel="Jaccard", title="Overlap of the top 10% most important samples")
    axes[0].legend(fontsize="small")
    fig.tight_layout()
    return fig


def class_contribution(per_class: np.ndarray, layer_names: list[str]) -> plt.Figure:
    """Importance contributed by each class to each layer over epochs (paper fig. 2, per class).
    per_class: (E, C, L)."""
    E, C, L = per_class.shape
    fig, axes = plt.subplots(1, L, figsize=(3.2 * L, 3.2), squeeze=False)
    epochs = np.arange(1, E + 1)
    for d, name in enumerate(layer_names):
        ax = axes[0, d]
        ax.stackplot(epochs, per_class[:, :, d].T, labels=[str(c) for c in range(C)])
        ax.set(xlabel="epoch", title=name)
    axes[0, 0].set_ylabel("importance by class")
    axes[0, -1].legend(title="class", fontsize="x-small", loc="upper right", ncol=2)
    fig.tight_layout()
    return fig


def group_shares(shares: np.ndarray, layer_names: list[str],
                 groups: tuple[str, ...] = ("top 10%", "top 10-20%", "other 80%")) -> plt.Figure:
    """Share of each layer's importance carried by samples grouped by total importance (paper fig. 3).
    shares: (E, L, G)."""
    E, L, G = shares.shape
    fig, axes = plt.subplots(1, L, figsize=(3.2 * L, 3.2), squeeze=False, sharey=True)
    epochs = np.arange(1, E + 1)
    for d, name in enumerate(layer_names):
        axes[0, d].stackplot(epochs, shares[:, d, :].T, labels=groups)
        axes[0, d].set(xlabel="epoch", title=name, ylim=(0, 1))
    axes[0, 0].set_ylabel("share of the layer's importance")
    axes[0, -1].legend(fontsize="x-small", loc="lower right")
    fig.tight_layout()
    return fig


def nll_correlation(spearman: np.ndarray, pearson: np.ndarray, last_nll: np.ndarray,
                    total_importance: np.ndarray) -> plt.Figure:
    """Correlation of in-epoch NLL with importance over epochs, and last-epoch NLL against total
    importance tau per sample (paper fig. 4)."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    epochs = np.arange(1, len(spearman) + 1)
    axes[0].plot(epochs, spearman, label="Spearman")
    axes[0].plot(epochs, pearson, label="Pearson")
    axes[0].set(xlabel="epoch", ylabel="correlation", title="NLL vs importance, per epoch")
    axes[0].legend()
    axes[1].scatter(np.maximum(last_nll, 1e-12), np.maximum(total_importance, 1e-30), s=3, alpha=0.4)
    axes[1].set(xscale="log", yscale="log", xlabel="NLL at the last epoch", ylabel=r"total importance $\tau_i$",
                title="Per sample")
    fig.tight_layout()
    return fig


def clusters(profiles: list[np.ndarray], losses: list[np.ndarray], images: list[np.ndarray],
             titles: list[str], layer_names: list[str]) -> plt.Figure:
    """For a few clusters (rows): example images, mean per-layer importance stacked over epochs, and
    box plots of the members' NLL per epoch (paper figs. 5, 6).

    Args:
        profiles: per cluster (E, L) mean beta; losses: per cluster (E, m) members' in-epoch NLL;
        images: per cluster (k, H, W) example images.
    """
    rows = len(profiles)
    fig, axes = plt.subplots(rows, 3, figsize=(13, 3.2 * rows), squeeze=False,
                             gridspec_kw={"width_ratios": [1.2, 1.5, 1.5]})
    for r, (profile, loss, imgs, title) in enumerate(zip(profiles, losses, images, titles)):
        k = len(imgs)
        cols = int(np.ceil(np.sqrt(k)))
        h, w = imgs.shape[1:3]
        montage = np.zeros(((h + 1) * cols, (w + 1) * cols, *imgs.shape[3:]))  # 0 = white in gray_r
        if imgs.ndim == 4:  # colour: white background
            montage[:] = 1.0
        for j, img in enumerate(imgs):
            y0, x0 = (j // cols) * (h + 1), (j % cols) * (w + 1)
            montage[y0:y0 + h, x0:x0 + w] = img
        axes[r, 0].imshow(montage, cmap="gray_r")
        axes[r, 0].set_axis_off()
        axes[r, 0].set_title(title, fontsize="small")
        epochs = np.arange(1, profile.shape[0] + 1)
        axes[r, 1].stackplot(epochs, profile.T, labels=layer_names)
        axes[r, 1].set(xlabel="epoch", ylabel="mean importance")
        axes[r, 2].boxplot(list(loss), showfliers=False)  # one box per epoch
        axes[r, 2].set(xlabel="epoch", ylabel="NLL")
        step = max(1, len(epochs) // 10)
        axes[r, 2].set_xticks(epochs[::step], [str(e) for e in epochs[::step]])
    axes[0, 1].legend(fontsize="x-small", loc="upper right")
    fig.tight_layout()
    return fig


def cluster_summary(difficulty: np.ndarray, peak_epoch: np.ndarray, lower_share: np.ndarray,
                    out_share: np.ndarray, names: tuple[str, str] = ("first layer", "last layer")) -> plt.Figure:
    """Per cluster: difficulty (mean NLL) against the epoch of peak importance and the layer shares."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    axes[0].scatter(difficulty, peak_epoch)
    axes[0].set(xlabel="cluster difficulty (mean NLL)", ylabel="peak epoch", title="When a cluster matters")
    axes[1].scatter(difficulty, lower_share, label=names[0])
    axes[1].scatter(difficulty, out_share, label=names[1])
    axes[1].set(xlabel="cluster difficulty (mean NLL)", ylabel="share of importance", title="Where it matters")
    axes[1].legend()
    fig.tight_layout()
    return fig


def ordering_errors(curves: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]]) -> plt.Figure:
    """Train and test error over epochs per batch construction, mean ± standard error over seeds
    (paper fig. 7). curves: method -> {"train_error"|"test_error": (mean (E,), stderr (E,))}."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key, title in zip(axes, ("test_error", "train_error"), ("Test error", "Train error (in-batch)")):
        for method, c in curves.items():
            mean, se = c[key]
            epochs = np.arange(1, len(mean) + 1)
            ax.plot(epochs, mean, label=method)
            ax.fill_between(epochs, mean - se, mean + se, alpha=0.2)
        ax.set(xlabel="epoch", ylabel="error", title=title, yscale="log")
    axes[0].legend(fontsize="small", ncol=2)
    fig.tight_layout()
    return fig


def trajectories(paths: dict[int, dict[str, np.ndarray]], methods: list[str], max_panels: int = 3) -> plt.Figure:
    """PCA of parameter trajectories, one path per method (paper fig. 8), one panel per seed.
    paths: seed -> method -> (T, 2), T = epochs + 1 (the initialisation first, marked by a square)."""
    seeds = sorted(paths)[:max_panels]
    fig, axes = plt.subplots(1, len(seeds), figsize=(5.5 * len(seeds), 4.5), squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, seed in zip(axes[0], seeds):
        for i, method in enumerate(methods):
            p = paths[seed][method]
            c = colours[i % len(colours)]
            ax.plot(p[:, 0], p[:, 1], color=c, lw=1.2, label=method, marker=".", ms=3)
            ax.scatter(p[-1, 0], p[-1, 1], color=c, s=25, zorder=3)
        ax.scatter(p[0, 0], p[0, 1], color="black", marker="s", s=30, zorder=4)
        ax.set(xlabel="PC 1", ylabel="PC 2", title=f"Parameter trajectories, seed {seed}")
    axes[0, 0].legend(fontsize="small")
    fig.tight_layout()
    return fig


def stability_vs_lr(lrs: list[float], rho_seeds: list[float], rho_reference: list[float],
                    reference_lr: float) -> plt.Figure:
    """How stable is the importance ranking across seeds and against the reference learning rate,
    as a function of the learning rate (one point per completed trial)."""
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.scatter(lrs, rho_seeds, label="between the trial's seeds")
    ax.scatter(lrs, rho_reference, marker="x", label=f"against lr={reference_lr:g}")
    ax.axvline(reference_lr, color="grey", lw=0.8, ls="--")
    ax.set(xscale="log", xlabel="learning rate", ylabel=r"Spearman of total importance $\tau$",
           title="Stability of the importance ranking")
    ax.legend(fontsize="small")
    fig.tight_layout()
    return fig


def _montage_axis(ax, img: np.ndarray, title: str) -> None:
    ax.imshow(img, cmap="gray_r" if img.ndim == 2 else None)
    ax.set_axis_off()
    ax.set_title(title, fontsize="x-small")


def influence_images(helpful: np.ndarray, harmful: np.ndarray, helpful_values: np.ndarray,
                     harmful_values: np.ndarray, target: str) -> plt.Figure:
    """The training images whose up-weighting lowers the target most (helpful, top row) and raises
    it most (harmful, bottom row), each titled with its influence dT/dv_i.

    Args:
        helpful, harmful: (k, H, W) or (k, H, W, 3) images; *_values: (k,) influence."""
    k = max(len(helpful), len(harmful))
    fig, axes = plt.subplots(2, k, figsize=(1.4 * k, 3.4), squeeze=False)
    for row, (imgs, vals, kind) in enumerate(((helpful, helpful_values, "helpful"),
                                              (harmful, harmful_values, "harmful"))):
        for j in range(k):
            if j < len(imgs):
                _montage_axis(axes[row, j], imgs[j], f"{kind}\n{vals[j]:+.2e}")
            else:
                axes[row, j].set_axis_off()
    fig.suptitle(f"Most influential training samples on {target}  (dT/dv_i)", fontsize="small")
    fig.tight_layout()
    return fig


def scatter_panels(panels: list[dict]) -> plt.Figure:
    """A row of scatter plots, each {x, y, xlabel, ylabel, title}, with the diagonal y = x."""
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.8), squeeze=False)
    for ax, p in zip(axes[0], panels):
        x, y = np.asarray(p["x"], np.float64), np.asarray(p["y"], np.float64)
        ax.scatter(x, y, s=12)
        if len(x) and p.get("diagonal", True):
            lo, hi = np.nanmin([x.min(), y.min()]), np.nanmax([x.max(), y.max()])
            ax.plot([lo, hi], [lo, hi], color="grey", lw=0.8, ls="--")
        ax.set(xlabel=p["xlabel"], ylabel=p["ylabel"])
        ax.set_title(p["title"], fontsize="small")
        ax.ticklabel_format(style="sci", scilimits=(-2, 3))
    fig.tight_layout()
    return fig


def breakdown_curves(table) -> plt.Figure:
    """Pearson correlation of predicted (unrolled) and replayed change of the target against the
    size of the weight change, one line per (learning rate, epochs)."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for (lr, epochs), g in table.groupby(["lr", "epochs"]):
        g = g.sort_values("change")
        for ax, key in zip(axes, ("pearson", "sign_agreement")):
            ax.plot(g["change"], g[key], marker="o", label=f"lr {lr:g}, {epochs} epochs")
    axes[0].set(xscale="log", xlabel="weight change  1 - v_i  (1 = removal)", ylabel="Pearson (predicted, replayed)",
                title="Where linear response breaks down", ylim=(-0.1, 1.02))
    axes[1].set(xscale="log", xlabel="weight change  1 - v_i", ylabel="sign agreement", ylim=(0, 1.02),
                title="Sign of the change")
    axes[0].legend(fontsize="small")
    fig.tight_layout()
    return fig


def correlation_matrix(matrix, title: str) -> plt.Figure:
    """A labelled heat map of a square correlation table (pandas DataFrame)."""
    names = list(matrix.columns)
    fig, ax = plt.subplots(figsize=(1.0 + 0.6 * len(names), 0.8 + 0.55 * len(names)))
    im = ax.imshow(matrix.to_numpy(), vmin=-1, vmax=1, cmap="RdBu_r")
    ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize="small")
    ax.set_yticks(range(len(names)), list(matrix.index), fontsize="small")
    for i in range(len(names)):
        for j in range(len(names)):
            ax.text(j, i, f"{matrix.iat[i, j]:.2f}", ha="center", va="center", fontsize="x-small")
    fig.colorbar(im, ax=ax, shrink=0.8)
    ax.set_title(title, fontsize="small")
    fig.tight_layout()
    return fig


def data_map(confidence: np.ndarray, variability: np.ndarray, correctness: np.ndarray,
             flipped: np.ndarray | None = None) -> plt.Figure:
    """Dataset cartography (Swayamdipta et al. 2020, fig. 1): confidence against variability, coloured
    by correctness; flipped labels, when known, circled."""
    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    sc = ax.scatter(variability, confidence, c=correctness, s=6, cmap="viridis", vmin=0, vmax=1)
    if flipped is not None and flipped.any():
        ax.scatter(variability[flipped], confidence[flipped], s=22, facecolors="none", edgecolors="red", lw=0.6,
                   label="flipped label")
        ax.legend(fontsize="small", loc="lower right")
    fig.colorbar(sc, ax=ax, label="correctness")
    ax.set(xlabel="variability", ylabel="confidence", title="Data map")
    fig.tight_layout()
    return fig


def learnability_pair(la: np.ndarray, lb: np.ndarray, ra: np.ndarray, rb: np.ndarray, a: str, b: str) -> plt.Figure:
    """2-D histograms of learnability and of learnability rank for two models (Lee et al. fig. 1a, b)."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2))
    for ax, x, y, what in ((axes[0], la, lb, "learnability"), (axes[1], ra, rb, "rank (1 = easiest)")):
        h = ax.hist2d(x, y, bins=40, cmin=1, cmap="viridis", norm=matplotlib.colors.LogNorm())
        fig.colorbar(h[3], ax=ax, label="samples")
        ax.set(xlabel=f"{what}: {a}", ylabel=f"{what}: {b}")
    fig.tight_layout()
    return fig


def extreme_images(images: list[np.ndarray], titles: list[list[str]], rows: list[str]) -> plt.Figure:
    """Rows of images (the easiest and hardest samples), each titled (e.g. with its rank per model)."""
    k = max(len(r) for r in images)
    fig, axes = plt.subplots(len(images), k, figsize=(1.5 * k, 2.0 * len(images)), squeeze=False)
    for r, (imgs, tits) in enumerate(zip(images, titles)):
        for j in range(k):
            if j < len(imgs):
                _montage_axis(axes[r, j], imgs[j], tits[j])
            else:
                axes[r, j].set_axis_off()
        axes[r, 0].text(-0.3, 0.5, rows[r], transform=axes[r, 0].transAxes, rotation=90, va="center",
                        ha="right", fontsize="small")
    fig.tight_layout()
    return fig


def pruning_curves(summary) -> plt.Figure:
    """Test error against the fraction of training samples kept, one panel per score: keeping the
    hardest, the easiest, or a random choice (mean over seeds; the full training set at 1)."""
    scores = [s for s in summary["score"].unique() if s not in ("all", "random")]
    full = summary[summary.score == "all"]
    random = summary[summary.score == "random"]
    cols = min(3, len(scores))
    rows = -(-len(scores) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3.2 * rows), squeeze=False, sharey=True)
    for ax, score in zip(axes.ravel(), scores):
        for keep, style in (("hardest", "o-"), ("easiest", "s-"), ("random", "^--")):
            g = random if keep == "random" else summary[(summary.score == score) & (summary.keep == keep)]
            g = pd.concat([g, full]).sort_values("fraction")
            ax.plot(g["fraction"], g["mean"], style, label=f"keep {keep}", markersize=4)
        ax.set(title=score, xlabel="fraction of training samples kept", ylabel="test error")
        ax.grid(alpha=0.3)
    for ax in axes.ravel()[len(scores):]:
        ax.axis("off")
    axes[0, 0].legend(fontsize="small")
    fig.tight_layout()
    return fig
