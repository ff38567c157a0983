"""`cnnedge info`: what a deployed model is, read from the model file itself (torch-free).

    cnnedge info                       # the shipped default model
    cnnedge info export/greek.onnx --format json
"""

from __future__ import annotations

import sys
from pathlib import Path

from cnnedge.infer.files import shown_path
from cnnedge.infer.modelinfo import EMBEDDING_NAME, default_model
from cnnedge.infer.runtime import Runtime


def describe(model: str | None = None) -> dict:
    """The model's metadata, identity and location as one JSON-ready dict."""
    rt = Runtime(model or default_model(), "cpu", threads=1)
    info = rt.info
    path = rt.path.resolve()
    doc = {
        "path": str(path),
        "size_bytes": path.stat().st_size,
        "sha256": rt.sha256,
        "arch": info.arch,
        "classes": info.class_names,
        "input": {"name": "input", "shape": ["batch", *info.input_shape], "dtype": rt.input_dtype.__name__,
                  "mean": info.mean, "std": info.std},
        "outputs": rt.output_shapes,
        "preprocess": info.preprocess,
        "precision": info.precision,
        "test_accuracy": info.test_accuracy,
        "dataset": info.dataset,
        "embedding_layer": info.embedding_layer if EMBEDDING_NAME in rt.output_shapes else None,
        "checkpoint_sha256": info.checkpoint_sha256,
        "cnnedge_version": info.cnnedge_version,
        "export_date": info.export_date,
        "shipped": model is None,
    }
    if info.extra:
        doc["other_metadata"] = info.extra
    return doc


def run(model: str | None, fmt: str = "table") -> None:
    doc = describe(model)
    if fmt == "json":
        from cnnedge.report import to_json

        sys.stdout.write(to_json(doc) + "\n")
        sys.stdout.flush()
        return
    from rich.markup import escape
    from rich.table import Table

    from cnnedge.report import console

    accuracy = "-" if doc["test_accuracy"] is None else f"{100 * doc['test_accuracy']:.2f}% ({doc['dataset']} test set)"
    names = doc["classes"]
    rows = [
        ("file", shown_path(doc["path"]) + ("  (the shipped default model)" if doc["shipped"] else "")),
        ("size", f"{doc['size_bytes']:,} bytes"),
        ("sha256", doc["sha256"]),
        ("architecture", doc["arch"]),
        ("classes", f"{len(names)}: " + ", ".join(names[:20]) + (", ..." if len(names) > 20 else "")),
        ("input", f"{doc['input']['dtype']} {doc['input']['shape']}, mean {doc['input']['mean']}, std {doc['input']['std']}"),
        ("outputs", ", ".join(f"{k} {v}" for k, v in doc["outputs"].items())),
        ("preprocessing", doc["preprocess"]),
        ("precision", doc["precision"]),
        ("test accuracy", accuracy),
        ("embedding", doc["embedding_layer"] or "-"),
        ("checkpoint sha256", doc["checkpoint_sha256"] or "-"),
        ("exported", f"{doc['export_date'] or '?'} by cnnedge {doc['cnnedge_version'] or '?'}"),
    ]
    table = Table(title=escape(f"cnnedge info: {Path(doc['path']).name}"), title_justify="left", show_header=False)
    table.add_column(style="bold")
    table.add_column(overflow="fold")
    for key, value in rows:
        table.add_row(key, escape(str(value)))
    console.print(table)
