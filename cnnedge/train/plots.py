"""PNG plots (matplotlib, headless), written atomically."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from cnnedge.atomic import write_bytes


def _figure(**kwargs):
    # A bare Figure on the Agg canvas: no pyplot (its import and global figure registry cost a few tenths of a
    # second at the end of every training run), no display needed, never a window.
    from matplotlib.figure import Figure

    return Figure(**kwargs)


def _save(fig, path: Path) -> Path:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")  # PNG: matplotlib renders it with Agg
    write_bytes(path, buffer.getvalue())
    return path


def plot_curves(history: list[dict], path: Path) -> Path:
    epochs = [h["epoch"] for h in history]
    fig = _figure(figsize=(10, 4))
    ax_loss, ax_acc = fig.subplots(1, 2)
    for split in ("train", "val"):
        if history and history[0].get(f"{split}_loss") is not None:
            ax_loss.plot(epochs, [h[f"{split}_loss"] for h in history], marker="o", label=split)
            ax_acc.plot(epochs, [100 * h[f"{split}_accuracy"] for h in history], marker="o", label=split)
    ax_loss.set(xlabel="epoch", ylabel="loss", title="loss")
    ax_acc.set(xlabel="epoch", ylabel="accuracy (%)", title="accuracy")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend()
    return _save(fig, path)


def plot_confusion(cm: np.ndarray, class_names: list[str], path: Path) -> Path:
    k = len(class_names)
    fig = _figure(figsize=(1.0 + 0.55 * k, 0.8 + 0.5 * k))
    ax = fig.subplots()
    ax.imshow(np.log1p(cm), cmap="Blues")
    for i in range(k):
        for j in range(k):
            if cm[i, j]:
                ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=8,
                        color="white" if i == j else "black")
    ax.set_xticks(range(k), class_names, rotation=45 if max(map(len, class_names)) > 2 else 0)
    ax.set_yticks(range(k), class_names)
    ax.set(xlabel="predicted", ylabel="true", title="confusion matrix")
    return _save(fig, path)
