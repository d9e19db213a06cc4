"""Pictures of numbers: the learning curves of a run (curves.png) and the learning-rate finder's
loss-versus-lr plot (lr_find.png), drawn with matplotlib's Agg backend (no display needed)."""

from __future__ import annotations

import csv
from pathlib import Path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def read_rows(metrics_csv: Path) -> list[dict]:
    with open(metrics_csv, newline="") as f:
        return list(csv.DictReader(f))


def _column(rows: list[dict], key: str) -> list[float]:
    return [float(r[key]) if r.get(key) not in (None, "") else float("nan") for r in rows]


def plot_curves(metrics_csv: Path, out: Path, title: str = "") -> int:
    """Loss, accuracy (train and val) and learning rate per epoch, the best val epoch marked;
    returns the number of epochs drawn."""
    rows = read_rows(metrics_csv)
    plt = _pyplot()
    epochs = [int(r["epoch"]) for r in rows]
    val_accuracy = _column(rows, "val_accuracy")
    best = max(range(len(rows)), key=lambda i: val_accuracy[i]) if rows else None
    figure, (loss_ax, acc_ax, lr_ax) = plt.subplots(1, 3, figsize=(13, 3.8), constrained_layout=True)
    loss_ax.plot(epochs, _column(rows, "train_loss"), "o-", ms=3, label="train (smoothed targets)")
    loss_ax.plot(epochs, _column(rows, "val_loss"), "o-", ms=3, label="val")
    loss_ax.set(xlabel="epoch", ylabel="cross-entropy loss", title="loss")
    acc_ax.plot(epochs, _column(rows, "train_accuracy"), "o-", ms=3, label="train (augmented)")
    acc_ax.plot(epochs, val_accuracy, "o-", ms=3, label="val")
    acc_ax.set(xlabel="epoch", ylabel="accuracy", title="accuracy")
    if best is not None:
        acc_ax.axvline(epochs[best], color="gray", ls="--", lw=1)
        acc_ax.annotate(f"best {val_accuracy[best]:.3f}\n(epoch {epochs[best]})", (epochs[best], val_accuracy[best]),
                        textcoords="offset points", xytext=(-8, -30), ha="right", fontsize=8)
    lr_ax.plot(epochs, _column(rows, "lr"), "o-", ms=3, color="tab:green")
    lr_ax.set(xlabel="epoch", ylabel="learning rate (epoch start)", title="learning rate")
    lr_ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
    for ax in (loss_ax, acc_ax):
        ax.legend(fontsize=8)
    for ax in (loss_ax, acc_ax, lr_ax):
        ax.grid(alpha=0.3)
        if epochs:
            ax.set_xlim(0.5, max(epochs) + 0.5)
            ax.xaxis.get_major_locator().set_params(integer=True)
    if title:
        figure.suptitle(title, fontsize=10)
    out = Path(out)
    tmp = out.with_name(f".{out.name}.tmp.png")
    figure.savefig(tmp, dpi=110)
    plt.close(figure)
    tmp.replace(out)  # a reader never sees half a picture
    return len(epochs)


def plot_lr_find(lrs: list[float], losses: list[float], smoothed: list[float], suggestion: float | None,
                 out: Path, title: str = "") -> Path:
    plt = _pyplot()
    figure, ax = plt.subplots(figsize=(6.5, 4), constrained_layout=True)
    ax.plot(lrs, losses, color="tab:blue", alpha=0.3, lw=1, label="loss per step")
    ax.plot(lrs, smoothed, color="tab:blue", lw=2, label="smoothed")
    if suggestion is not None:
        ax.axvline(suggestion, color="tab:red", ls="--", lw=1.5, label=f"suggested --lr {suggestion:.2g}")
    ax.set_xscale("log")
    finite = [s for s in smoothed if s == s]
    if finite:
        ax.set_ylim(min(finite) * 0.9, min(max(finite), 4 * min(finite)) * 1.05)
    ax.set(xlabel="learning rate (log scale)", ylabel="training loss", title=title or "learning-rate finder")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    figure.savefig(out, dpi=110)
    plt.close(figure)
    return Path(out)
