"""PNG plots, written atomically: charts with matplotlib (headless), image grids with OpenCV
(cnnedge.infer.grid, which predict uses too)."""

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


def plot_samples(images: np.ndarray, labels: np.ndarray, class_names: list[str], augmented: bool, path: Path) -> Path:
    """Training images as the network sees them (after augmentation), with their labels."""
    from cnnedge.infer.grid import label_grid, write_png

    what = "after augmentation" if augmented else "(no augmentation)"
    picture, _ = label_grid(images, [[class_names[int(k)]] for k in labels], cols=5,
                            title=f"{len(images)} random training images {what}")
    write_png(path, picture)
    return path


def plot_predictions(images: np.ndarray, preds: np.ndarray, truth: np.ndarray, confidence: np.ndarray,
                     class_names: list[str], mistakes: int, split: str, path: Path) -> Path:
    """Evaluated images with predicted and true labels; wrong ones in red (they come first)."""
    from cnnedge.infer.grid import label_grid, write_png

    captions = [[f"{class_names[int(p)]} {100 * c:.0f}%"] + ([f"true {class_names[int(t)]}"] if p != t else [])
                for p, t, c in zip(preds, truth, confidence)]
    wrong = [bool(p != t) for p, t in zip(preds, truth)]
    shown = sum(wrong)
    title = (f"{split} predictions: the {shown} most confident of {mistakes} mistakes (red), "
             f"then {len(wrong) - shown} right (green)")
    picture, _ = label_grid(images, captions, wrong, cols=8, title=title)
    write_png(path, picture)
    return path


# ------------------------------------------------------------------------------- cnnedge sweep
# Each takes the plot's data as cnnedge.train.sweep computes it (and records it in sweep.json).


def _x_axis(axes, spec: dict, values: list):
    """Set up the x axes for these option values; return the function that places a value on them: the
    value itself (log scale for wide ranges, ticks at the values when there are few), or 0..n-1 with
    labels for categories."""
    distinct = sorted(set(values), key=lambda v: (str(type(v)), v)) if not spec["categorical"] else None
    order = [str(v) for v in (spec.get("x_values") or sorted(set(map(str, values))))]
    for ax in axes:
        if spec["categorical"]:
            crowded = sum(map(len, order)) > 60
            ax.set_xticks(range(len(order)), order, rotation=30 if crowded else 0, ha="right" if crowded else "center")
            ax.set_xlim(-0.4, len(order) - 0.6)
        elif spec.get("log_x"):
            ax.set_xscale("log")
        elif spec["kind"] == "lines" and len(distinct) <= 12:  # a few grid values: tick exactly those (no 1.5 epochs)
            ax.set_xticks(distinct)
    return (lambda xs: [order.index(str(x)) for x in xs]) if spec["categorical"] else (lambda xs: list(xs))


def plot_sweep_lines(spec: dict, path: Path) -> Path:
    """Test accuracy and loss against one swept option; one line per value of the others, with the
    spread over seeds as error bars."""
    fig = _figure(figsize=(11, 4.2))
    ax_acc, ax_loss = fig.subplots(1, 2)
    place = _x_axis((ax_acc, ax_loss), spec, [x for line in spec["lines"] for x in line["x"]])
    for line in spec["lines"]:
        acc, acc_std = (np.array(line[k]) * 100 for k in ("accuracy", "accuracy_std"))
        spread = max(line["seeds"]) > 1
        ax_acc.errorbar(place(line["x"]), acc, yerr=acc_std if spread else None, marker="o", capsize=3,
                        label=line["label"])
        ax_loss.errorbar(place(line["x"]), line["loss"], yerr=line["loss_std"] if spread else None, marker="o",
                         capsize=3, label=line["label"])
    ax_acc.set(xlabel=spec["x_label"], ylabel="test accuracy (%)", title=f"test accuracy vs {spec['x_label']}")
    ax_loss.set(xlabel=spec["x_label"], ylabel="test loss", title=f"test loss vs {spec['x_label']}")
    for ax in (ax_acc, ax_loss):
        ax.grid(alpha=0.3)
    fig.tight_layout()  # room for the tick labels inside the figure: the legend goes below them
    if len(spec["lines"]) > 1 or spec["lines"][0]["label"] != "all trials":  # below both plots, off the lines
        fig.legend(*ax_acc.get_legend_handles_labels(), loc="upper center", bbox_to_anchor=(0.5, 0.0),
                   ncol=min(3, len(spec["lines"])), fontsize=8, frameon=False)
    return _save(fig, path)


def plot_sweep_heatmap(spec: dict, path: Path) -> Path:
    """Mean test accuracy over two swept options, each cell written in."""
    acc = np.array([[np.nan if v is None else 100 * v for v in row] for row in spec["accuracy"]], dtype=float)
    rows, cols = acc.shape
    fig = _figure(figsize=(1.6 + 0.75 * cols, 1.2 + 0.5 * rows))
    ax = fig.subplots()
    image = ax.imshow(acc, cmap="viridis", aspect="auto")
    middle = np.nanmean(acc) if np.isfinite(acc).any() else 0
    for i in range(rows):
        for j in range(cols):
            if np.isfinite(acc[i, j]):
                ax.text(j, i, f"{acc[i, j]:.2f}", ha="center", va="center", fontsize=8,
                        color="black" if acc[i, j] > middle else "white")
    ax.set_xticks(range(cols), [str(v) for v in spec["x_values"]], rotation=45 if cols > 8 else 0)
    ax.set_yticks(range(rows), [str(v) for v in spec["y_values"]])
    ax.set(xlabel=spec["x_label"], ylabel=spec["y_label"], title="test accuracy (%)")
    fig.colorbar(image, ax=ax)
    return _save(fig, path)


def plot_search_history(spec: dict, path: Path) -> Path:
    """A search's objective per trial, pruned trials marked, and the best so far."""
    fig = _figure(figsize=(8, 4))
    ax = fig.subplots()
    trials, values = spec["trials"], [100 * v if v is not None else np.nan for v in spec["objective"]]
    pruned = np.array(spec["pruned"], dtype=bool)
    t, v = np.array(trials), np.array(values, dtype=float)
    ax.scatter(t[~pruned], v[~pruned], label="finished", zorder=3)
    ax.scatter(t[pruned], v[pruned], marker="x", color="grey", label="pruned (last validation)", zorder=3)
    if len(v):  # a step per new best, drawn on to half a trial past the last one
        best = np.fmax.accumulate(np.where(~pruned, v, -np.inf))
        best = np.where(np.isfinite(best), best, np.nan)
        ax.step(np.append(t, t[-1] + 0.5), np.append(best, best[-1]), where="post", color="tab:green",
                label="best so far")
    ax.set(xlabel="trial", ylabel="validation accuracy (%)", title="search history")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_sweep_points(spec: dict, path: Path) -> Path:
    """A searched option's sampled values against the test accuracy and loss of the finished trials."""
    fig = _figure(figsize=(11, 4.2))
    ax_acc, ax_loss = fig.subplots(1, 2)
    xs = _x_axis((ax_acc, ax_loss), spec, spec["values"])(spec["values"])
    ax_acc.scatter(xs, 100 * np.array(spec["accuracy"], dtype=float))
    ax_loss.scatter(xs, spec["loss"])
    ax_acc.set(xlabel=spec["x_label"], ylabel="test accuracy (%)", title=f"test accuracy vs {spec['x_label']}")
    ax_loss.set(xlabel=spec["x_label"], ylabel="test loss", title=f"test loss vs {spec['x_label']}")
    for ax in (ax_acc, ax_loss):
        ax.grid(alpha=0.3)
    return _save(fig, path)
