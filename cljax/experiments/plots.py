"""PNG plots of an experiment: accuracy-matrix heatmaps, per-task accuracy over steps, ACC vs memory.

matplotlib is imported only when a plot is drawn (it is an optional dependency: the
``experiments`` extra), with the non-interactive Agg back end.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

__all__ = ["plot_acc_vs_memory", "plot_accuracy_matrix", "plot_curves"]


def _pyplot():
    try:
        import matplotlib
    except ImportError as err:
        raise ImportError(
            "cljax.experiments.plots needs matplotlib: pip install 'cljax[experiments]'."
        ) from err
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def plot_accuracy_matrix(R: Any, path: str | os.PathLike, *, title: str = "") -> None:
    """Saves a heatmap of ``R[i, j]`` (accuracy on task j after training task i) with values.

    Example:
        >>> import importlib.util, os, tempfile
        >>> from cljax.experiments.plots import plot_accuracy_matrix
        >>> path = os.path.join(tempfile.mkdtemp(), "r.png")
        >>> if importlib.util.find_spec("matplotlib"):  # an optional dependency
        ...     plot_accuracy_matrix([[1.0, 0.1], [0.5, 0.9]], path)
    """
    plt = _pyplot()
    R = np.asarray(R, np.float64)
    T = R.shape[0]
    fig, ax = plt.subplots(figsize=(max(4.5, 1.5 + 0.6 * T), max(3.8, 1.0 + 0.6 * T)))
    im = ax.imshow(100 * R, vmin=0, vmax=100, cmap="viridis")
    if T <= 12:
        for i in range(T):
            for j in range(T):
                ax.text(
                    j,
                    i,
                    f"{100 * R[i, j]:.0f}",
                    ha="center",
                    va="center",
                    fontsize=8,
                    color="white" if R[i, j] < 0.6 else "black",
                )
    ax.set_xlabel("evaluated task j")
    ax.set_ylabel("after training task i")
    ax.set_title(title, fontsize=8, wrap=True)
    ax.set_xticks(range(T))
    ax.set_yticks(range(T))
    fig.colorbar(im, ax=ax, label="accuracy (%)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_curves(
    steps: Sequence[int],
    accs: Any,
    task_ends: Sequence[int],
    path: str | os.PathLike,
    *,
    title: str = "",
) -> None:
    """Saves per-task accuracy over training steps, with the task boundaries marked.

    Example:
        >>> import importlib.util, os, tempfile
        >>> from cljax.experiments.plots import plot_curves
        >>> path = os.path.join(tempfile.mkdtemp(), "c.png")
        >>> if importlib.util.find_spec("matplotlib"):
        ...     plot_curves([0, 1, 2], [[0.1, 0.1], [0.9, 0.1], [0.5, 0.8]], [1, 2], path)

    Args:
        steps: ``(E,)`` evaluation steps.
        accs: ``(E, T)`` accuracies.
        task_ends: ``(T,)`` last step of each task.
        path: Output PNG.
        title: Figure title.
    """
    plt = _pyplot()
    steps = np.asarray(steps)
    accs = np.asarray(accs, np.float64)
    fig, ax = plt.subplots(figsize=(7, 3.5))
    for t in range(accs.shape[1]):
        start = task_ends[t - 1] if t > 0 else 0
        seen = steps >= start
        ax.plot(steps[seen], 100 * accs[seen, t], label=f"task {t}", lw=1.2)
    for end in task_ends[:-1]:
        ax.axvline(end, color="grey", lw=0.6, ls="--")
    ax.set_xlabel("training step")
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title(title, fontsize=9)
    if accs.shape[1] <= 10:
        ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_acc_vs_memory(
    summary: Mapping[str, Any], scenario: str, path: str | os.PathLike, *, title: str = ""
) -> None:
    """Saves a scatter of final ACC (mean ± std over seeds) against total memory, one point per method.

    Args:
        summary: From `results.summarize_runs`.
        scenario: Which scenario's ACC.
        path: Output PNG.
        title: Figure title.

    Example:
        >>> import importlib.util, os, tempfile
        >>> from cljax.experiments.plots import plot_acc_vs_memory
        >>> agg = lambda v: {"mean": v, "std": 0.0, "n": 1}
        >>> summary = {"naive": {"metrics": {"class": {"acc": agg(0.2)}}, "memory": {"total": agg(4096.0)}}}
        >>> if importlib.util.find_spec("matplotlib"):
        ...     plot_acc_vs_memory(summary, "class", os.path.join(tempfile.mkdtemp(), "m.png"))
    """
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for method, e in summary.items():
        acc = e["metrics"].get(scenario, {}).get("acc")
        mem = e["memory"].get("total")
        if not acc or not mem or not acc.get("n"):
            continue
        ax.errorbar(
            mem["mean"] / 1024,
            100 * acc["mean"],
            yerr=100 * (acc.get("std") or 0.0),
            fmt="o",
            capsize=3,
        )
        ax.annotate(
            method,
            (mem["mean"] / 1024, 100 * acc["mean"]),
            textcoords="offset points",
            xytext=(4, 4),
            fontsize=8,
        )
    ax.set_xscale("log")
    ax.set_xlabel("memory: params + optimizer + CL memory + buffer (KiB)")
    ax.set_ylabel(f"final ACC, {scenario}-incremental (%)")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
