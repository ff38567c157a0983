"""`cnnedge predict`: a table, JSON or CSV of predictions for files, folders and globs, with accuracy and
a confusion matrix for inputs in class folders (torch-free: the Predictor, rich, numpy)."""

from __future__ import annotations

import csv
import io
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from cnnedge.atomic import check_writable
from cnnedge.errors import CnnedgeError, ExitCode
from cnnedge.infer.files import collect_inputs, printable, quiet_native_stderr, shown_path
from cnnedge.metrics import classification_report, confusion_matrix

if TYPE_CHECKING:  # the Predictor (preprocessing, the runtime) loads once the inputs are known to exist
    from cnnedge.infer.predictor import Prediction

GRID_MAX = 400  # images in a --grid picture (20 x 20 rows of 28x28 inputs at 3x: about 1 MB)


# ---------------------------------------------------------------------------------------- report


@dataclass
class Summary:
    images: int
    errors: int
    seconds: float
    report: dict | None  # classification_report over the inputs in class folders, else None

    @property
    def images_per_second(self) -> float:
        done = self.images - self.errors
        return done / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict:
        d = {"images": self.images, "errors": self.errors, "seconds": round(self.seconds, 4),
             "images_per_second": round(self.images_per_second, 1),
             "accuracy": self.report["accuracy"] if self.report else None}
        if self.report:
            d["labelled"] = self.report["labelled"]
            d["per_class_accuracy"] = self.report["per_class_accuracy"]
            d["confusion_matrix"] = self.report["confusion_matrix"]
            d["class_names"] = self.report["class_names"]
        return d


def summarise(predictions: list[Prediction], class_names: list[str], seconds: float) -> Summary:
    errors = sum(p.error is not None for p in predictions)
    labelled = [p for p in predictions if p.truth is not None and p.label is not None]
    report = None
    if labelled:
        cm = confusion_matrix([class_names.index(p.truth) for p in labelled], [p.index for p in labelled],
                              len(class_names))
        report = {**classification_report(cm, class_names), "labelled": len(labelled)}
    return Summary(len(predictions), errors, seconds, report)


def _bar(p: float, width: int = 10) -> str:
    full = int(round(p * width))
    return "█" * full + "·" * (width - full)


def render_table(predictions: list[Prediction], summary: Summary, model: str, provider: str, k: int,
                 runtime: str = "onnxruntime", detail: str = "all") -> None:
    """`detail`: all (the per-image table, then the accuracy tables and the summary line), summary (no
    per-image table: what a big folder needs) or line (the summary line alone: --quiet)."""
    if detail == "all":
        _image_table(predictions, model, provider, k, runtime)
    if detail != "line" and summary.report:
        _accuracy_tables(summary.report)
    from cnnedge.report import console

    console.print(summary_line(summary, runtime, provider), markup=False)


def _image_table(predictions: list[Prediction], model: str, provider: str, k: int, runtime: str) -> None:
    from rich.markup import escape
    from rich.table import Table

    from cnnedge.report import console

    show_truth = any(p.truth is not None for p in predictions)
    metric = next((p.metric for p in predictions if p.metric), None)  # a gallery: distances, not probabilities
    table = Table(title=f"{escape(model)} on {runtime} {provider}", title_justify="left")
    table.add_column("file", overflow="fold")
    if show_truth:
        table.add_column("true")
    table.add_column("prediction", justify="center")
    table.add_column("confidence", justify="right")
    table.add_column(f"top {k}" if metric is None else f"nearest {k} ({metric} distance)")
    for p in predictions:
        if p.label is None:
            continue  # failed inputs were reported on stderr
        name = shown_path(p.path) if p.path is not None else "<array>"
        colour = "" if p.truth is None else ("green" if p.truth == p.label else "bold red")
        pred = f"[{colour}]{escape(p.label)}[/]" if colour else escape(p.label)
        if metric is None:
            bars = "  ".join(f"{escape(n)} [cyan]{_bar(v)}[/] {100 * v:3.0f}%" for n, v in p.topk)
        else:
            bars = "  ".join(f"{escape(n)} {p.distances[n]:.4g}" for n, _ in p.topk)
        cells = [escape(name)] + ([escape(p.truth or "")] if show_truth else []) + [pred, f"{p.confidence:.3f}", bars]
        table.add_row(*cells)
    if table.row_count:
        console.print(table)


def _accuracy_tables(report: dict) -> None:
    """Per-class accuracy and the confusion matrix, over the classes that occur."""
    from cnnedge.report import confusion_table, console, per_class_table

    names = report["class_names"]
    cm = np.asarray(report["confusion_matrix"])
    present = [i for i in range(len(names)) if cm[i].sum() or cm[:, i].sum()]
    sub = cm[np.ix_(present, present)]
    sub_names = [names[i] for i in present]
    console.print(per_class_table(sub, sub_names))
    console.print(confusion_table(sub, sub_names))


def summary_line(summary: Summary, runtime: str, provider: str) -> str:
    line = (f"{summary.images} images, {summary.errors} errors, {summary.images_per_second:,.0f} images/s "
            f"({summary.seconds:.2f} s), runtime {runtime}, provider {provider}")
    if summary.report:
        correct = int(round(summary.report["accuracy"] * summary.report["labelled"]))
        line += f", accuracy {100 * summary.report['accuracy']:.2f}% ({correct}/{summary.report['labelled']} in class folders)"
    return line


def render_json(predictions: list[Prediction], summary: Summary, header: dict, results: bool = True) -> str:
    """`header`: Predictor.header() (model, runtime, provider, gallery), as `cnnedge serve` answers too.
    `results=False` (--summary): the header and the summary, without one entry per image.
    Strict JSON (no NaN or Infinity, which a strict parser rejects)."""
    from cnnedge.report import to_json

    doc = {**header, **({"results": [p.to_dict() for p in predictions]} if results else {}),
           "summary": summary.to_dict()}
    return to_json(doc)


def render_csv(predictions: list[Prediction]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["path", "label", "confidence", "topk", "error", "truth"])
    for p in predictions:
        w.writerow([printable(p.path) if p.path is not None else "<array>", p.label or "",
                    "" if p.confidence is None else f"{p.confidence:.6f}",
                    ";".join(f"{n}:{v:.6f}" for n, v in p.topk), p.error or "", p.truth or ""])
    return buf.getvalue()


# -------------------------------------------------------------------------------------------- CLI


def grid_picture(predictions: list[Prediction], title: str):
    """The network inputs of the first GRID_MAX predictions with their labels: red where the class folder
    says the prediction is wrong, green where it is right, grey where there is no class folder."""
    from cnnedge.infer.grid import label_grid

    shown = [p for p in predictions if p.input is not None][:GRID_MAX]
    captions = [[f"{p.label} {100 * p.confidence:.0f}%", *([f"true {p.truth}"] if p.truth not in (None, p.label) else [])]
                for p in shown]
    wrong = [None if p.truth is None else p.truth != p.label for p in shown]
    return label_grid([p.input for p in shown], captions, wrong, cols=min(10, len(shown)), scale=3, title=title)


def run(inputs: list[str], model: str | None = None, provider: str = "auto", recursive: bool = False,
        batch_size: int = 256, topk: int = 3, fmt: str = "table", save_crops: str | None = None,
        workers: int | None = None, gallery: str | None = None, metric: str | None = None,
        runtime: str | None = None, grid: str | None = None, threads: int | None = None,
        summary_only: bool = False, quiet: bool = False) -> int:
    """The `cnnedge predict` command; returns the exit code (0 all fine, 1 some inputs failed).
    `summary_only` (--summary): no line per image (the table's rows, JSON's results; the CLI refuses it with
    csv, which has nothing else).
    `quiet` (--quiet): the table format prints the summary line alone; every format drops the progress bar
    and the "wrote" notes from stderr. Warnings and errors are printed either way."""
    from cnnedge.report import err_console, warn

    if not inputs:
        raise CnnedgeError("no inputs: give image files, folders or glob patterns")
    paths, problems = collect_inputs(inputs, recursive)
    for arg, problem in problems:
        warn(f"{printable(arg)}: {problem}")
    if not paths:
        raise CnnedgeError("no images to predict" + (f" ({len(problems)} input(s) reported above)" if problems else ""))
    if save_crops is not None:
        if os.path.lexists(save_crops) and not os.path.isdir(save_crops):
            raise CnnedgeError(f"--save-crops {save_crops}: exists and is not a folder")
        check_writable(Path(save_crops) / "crop.png")  # before the run, not at its first crop
    if grid is not None and (Path(grid).suffix.lower() != ".png" or Path(grid).is_dir()):
        raise CnnedgeError(f"--grid {grid}: give a .png file to write")

    from cnnedge.infer.predictor import Predictor

    predictor = Predictor(model, provider, batch_size=batch_size, workers=workers, topk=topk, gallery=gallery,
                          metric=metric, runtime=runtime, inputs=grid is not None, threads=threads)
    predictions: list[Prediction] = []
    drawn = 0
    start = time.perf_counter()
    with predictor, quiet_native_stderr(), _progress(0 if quiet else len(paths), err_console) as advance:
        for p in predictor.predict_iter(paths, save_crops=save_crops, on_batch=advance):
            if p.error is not None:
                warn(f"{printable(p.path)}: {p.error}; skipped")
            if p.input is not None:
                drawn += 1
                if drawn > GRID_MAX:
                    p.input = None  # the grid is full: do not hold every input of a big folder
            predictions.append(p)
    seconds = time.perf_counter() - start
    summary = summarise(predictions, predictor.class_names, seconds)
    model = shown_path(predictor.model)
    if grid is not None:
        _write_grid(predictions, grid, model, quiet)
    if fmt == "table":
        title = model if gallery is None else f"{model} + {shown_path(gallery)}"
        render_table(predictions, summary, title, predictor.provider, topk, predictor.runtime.name,
                     detail="line" if quiet else "summary" if summary_only else "all")
    else:
        text = (render_json(predictions, summary, predictor.header(), results=not summary_only) if fmt == "json"
                else render_csv(predictions))
        sys.stdout.write(text if text.endswith("\n") else text + "\n")
        sys.stdout.flush()
    return int(ExitCode.PARTIAL) if summary.errors or problems else int(ExitCode.OK)


def _write_grid(predictions: list[Prediction], grid: str, model: str, quiet: bool = False) -> None:
    from cnnedge.infer.grid import write_png
    from cnnedge.report import err_console, warn

    ran = [p for p in predictions if p.label is not None]
    if not ran:
        warn(f"--grid {grid}: no image was classified; nothing drawn")
        return
    labelled = [p for p in ran if p.truth is not None]
    wrong = sum(p.truth != p.label for p in labelled)
    shown = min(len(ran), GRID_MAX)
    title = f"{model}: {shown} of {len(ran)} inputs"
    if labelled:
        title += f", {wrong} of {len(labelled)} labelled ones wrong (red)"
    picture, _ = grid_picture(predictions, title)
    write_png(grid, picture)
    if len(ran) > GRID_MAX:
        warn(f"--grid {grid}: shows the first {GRID_MAX} of {len(ran)} classified images")
    if not quiet:
        err_console.print(f"wrote {grid}", markup=False, soft_wrap=True)


class _progress:
    """A transient rich progress bar on stderr for long runs on a terminal; a no-op otherwise."""

    def __init__(self, total: int, console):
        self.total, self.console, self.bar = total, console, None

    def __enter__(self):
        if self.total >= 2000 and self.console.is_terminal:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

            self.bar = Progress("predict", BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                                console=self.console, transient=True)
            self.bar.start()
            self.task = self.bar.add_task("predict", total=self.total)
            return lambda n: self.bar.advance(self.task, n)
        return lambda n: None

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.stop()
