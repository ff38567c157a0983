"""Rich tables shared by the commands (torch-free)."""

from __future__ import annotations

import math
import os
import sys

import numpy as np
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from cnnedge.metrics import per_class_accuracy

# Piped output (CI logs, tests) gets wide tables instead of rich's 80-column default.
_WIDTH = None if sys.stdout.isatty() or os.environ.get("COLUMNS") else 160
console = Console(highlight=False, width=_WIDTH)
err_console = Console(stderr=True, highlight=False, width=_WIDTH)


def warn(message: str) -> None:
    """One line on stderr: bad inputs that are skipped while the rest of a batch runs."""
    err_console.print(f"warning: {message}", markup=False, soft_wrap=True)


def fmt_shape(shape) -> str:
    return "?" if shape is None else "(" + ", ".join(str(d) for d in shape) + ")"


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def layer_table(rows, title: str, onnx: bool = False) -> Table:
    """Documented vs measured, one row per layer; mismatching rows in red with the reason."""
    table = Table(title=escape(title), title_justify="left")
    table.add_column("layer")
    table.add_column("documented")
    table.add_column("torch")
    if onnx:
        table.add_column("onnx")
    table.add_column("parameters", justify="right")
    table.add_column("activations", justify="right")
    table.add_column("MACs", justify="right")
    table.add_column("ok")
    for row in rows:
        doc, got = row.documented, row.measured
        problems = row.problems()
        activations = fmt_bytes(4 * math.prod(got.shape)) if got else "-"
        cells = [row.name, fmt_shape(doc.shape) if doc else "-", fmt_shape(got.shape) if got else "-"]
        if onnx:
            cells.append(fmt_shape(row.onnx_shape) if row.onnx_checked else "-")
        cells += [
            f"{got.params:,}" if got else "-",
            activations,
            f"{got.macs:,}" if got and got.macs else "",
            "[green]ok[/]" if not problems else "[red]" + escape("; ".join(problems)) + "[/]",
        ]
        table.add_row(*cells, style=None if not problems else "bold red")
    return table


def per_class_table(cm: np.ndarray, class_names: list[str], title: str = "per-class accuracy") -> Table:
    table = Table(title=title, title_justify="left")
    table.add_column("class")
    table.add_column("accuracy", justify="right")
    table.add_column("correct", justify="right")
    table.add_column("total", justify="right")
    for i, (name, acc) in enumerate(zip(class_names, per_class_accuracy(cm))):
        total = int(cm[i].sum())
        table.add_row(name, "-" if total == 0 else f"{100 * acc:.2f}%", f"{int(cm[i, i]):,}", f"{total:,}")
    return table


def confusion_table(cm: np.ndarray, class_names: list[str], title: str = "confusion matrix (rows: true, columns: predicted)") -> Table:
    table = Table(title=title, title_justify="left")
    table.add_column("true \\ pred")
    for name in class_names:
        table.add_column(name[:8], justify="right")
    for i, name in enumerate(class_names):
        cells = []
        for j in range(len(class_names)):
            n = int(cm[i, j])
            cells.append("[dim]·[/]" if n == 0 else f"[green]{n}[/]" if i == j else f"[red]{n}[/]")
        table.add_row(name[:12], *cells)
    return table

