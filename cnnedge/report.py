"""Rich consoles and tables shared by the commands, warnings, and strict JSON (torch-free)."""

from __future__ import annotations

import json
import math
import os
import sys

import numpy as np
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from cnnedge.metrics import per_class_accuracy


class _Console(Console):
    def on_broken_pipe(self) -> None:
        # rich exits with code 1 here, which cnnedge reserves for "some inputs failed": hand the broken pipe
        # to cnnedge.cli.main, which exits 141 without a word. No errno: click would turn it into exit 1 too.
        self.quiet = True
        raise BrokenPipeError("standard output's reader has gone")


# Piped output (CI logs, tests) gets wide tables instead of rich's 80-column default.
_WIDTH = None if (sys.stdout is not None and sys.stdout.isatty()) or os.environ.get("COLUMNS") else 160
console = _Console(highlight=False, width=_WIDTH)
err_console = _Console(stderr=True, highlight=False, width=_WIDTH)


def warn(message: str) -> None:
    """One line on stderr: bad inputs that are skipped while the rest of a batch runs. Control characters
    (in a file name) are escaped: they can neither split the line nor act on the terminal."""
    if not message.isprintable():
        from cnnedge.infer.files import printable

        message = printable(message)
    err_console.print(f"warning: {message}", markup=False, soft_wrap=True)


def to_json(doc, indent: int | None = 2) -> str:
    """A JSON document that any strict parser reads: NaN and infinities (a diverged loss, a metric of an
    empty class) become null, as JSON has no such numbers."""
    try:
        return json.dumps(doc, indent=indent, allow_nan=False)
    except ValueError:  # rare: only then walk the document
        return json.dumps(_finite(doc), indent=indent, allow_nan=False)


def _finite(value):
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    if isinstance(value, np.generic):
        return _finite(value.item())
    return value


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

