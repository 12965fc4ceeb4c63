"""The training curves of self-supervised pretraining (``loss.png``): loss and online k-NN accuracy per epoch, and the
effective rank of the teacher backbone's features against the untrained network's."""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from ssl4sci.io import save_figure


def plot_loss(history: pd.DataFrame, path: Path, method: str, min_rank_ratio: float | None) -> None:
    """Training loss per epoch with the online k-NN accuracy on the validation split (top panel), and the
    effective rank of the teacher backbone's features against the untrained network's (bottom panel), where
    they were measured; ``min_rank_ratio`` draws the guard's threshold."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, rank_ax) = plt.subplots(2, 1, figsize=(5.5, 5.6), sharex=True,
                                      gridspec_kw={"height_ratios": [3, 2]})
    if len(history):
        ax.plot(history["epoch"] + 1, history["train_loss"], marker="o", ms=3, label="training loss")
    ax.set_ylabel("training loss")
    ax.grid(alpha=0.3)
    measured = history.dropna(subset=["knn_val"]) if "knn_val" in history else history.iloc[:0]
    if len(measured):
        knn_ax = ax.twinx()
        knn_ax.plot(measured["epoch"] + 1, measured["knn_val"], color="tab:orange", marker="s", ms=3,
                    label="k-NN val")
        knn_ax.set_ylabel("k-NN top-1 (val)", color="tab:orange")
        knn_ax.set_ylim(0, 1)
    ax.set_title(f"{method}: pretraining loss, online k-NN and effective rank")
    _plot_rank(rank_ax, history, min_rank_ratio)
    rank_ax.set_xlabel("epoch")
    save_figure(path, fig)


def _plot_rank(ax, history: pd.DataFrame, min_rank_ratio: float | None) -> None:
    """Effective rank per monitored epoch, the untrained network's as a reference, PC1's variance share on the right."""
    ax.set_ylabel("effective rank")
    ax.grid(alpha=0.3)
    measured = history.dropna(subset=["effective_rank"]) if "effective_rank" in history else history.iloc[:0]
    if not len(measured):
        ax.text(0.5, 0.5, "effective rank not measured (pretrain.monitor)", ha="center", va="center",
                transform=ax.transAxes, color="grey")
        return
    ax.plot(measured["epoch"] + 1, measured["effective_rank"], color="tab:green", marker="o", ms=3,
            label="effective rank")
    initial = history["effective_rank_init"].dropna() if "effective_rank_init" in history else []
    if len(initial):
        ax.axhline(float(initial.iloc[0]), color="grey", ls="--", lw=1, label="untrained")
        if min_rank_ratio:
            ax.axhline(min_rank_ratio * float(initial.iloc[0]), color="tab:red", ls=":", lw=1,
                       label=f"guard: {min_rank_ratio:g} x untrained")
    highest = max([float(measured["effective_rank"].max())] + [float(v) for v in initial])
    ax.set_ylim(0, 1.15 * highest)
    ax.legend(loc="lower left", fontsize=7)
    if "pc1_share" in measured:
        share_ax = ax.twinx()
        share_ax.plot(measured["epoch"] + 1, measured["pc1_share"], color="tab:purple", marker="^", ms=3)
        share_ax.set_ylabel("PC1 variance share", color="tab:purple")
        share_ax.set_ylim(0, 1)
