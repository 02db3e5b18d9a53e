"""Figures: each function takes data and returns a matplotlib Figure (never shows or saves it)."""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # headless: figures are logged, never shown
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


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
