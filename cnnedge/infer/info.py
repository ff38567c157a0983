"""`cnnedge info`: what a deployed model is, read from the model file itself (torch-free), and how its export
verified it in each runtime (from the export report beside it, when that report describes this very file).

    cnnedge info                       # the shipped default model
    cnnedge info export/greek.onnx --format json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from cnnedge.infer.files import shown_path
from cnnedge.infer.modelinfo import EMBEDDING_NAME, ModelInfo, default_model
from cnnedge.infer.runtime import open_runtime

MAX_REPORT_BYTES = 16 << 20


def export_report(path: Path, info: ModelInfo) -> tuple[Path | None, dict | None]:
    """(path, content) of the report `cnnedge export` wrote beside the model (cnn.json for cnn.onnx,
    cnn.fp16.onnx and cnn.int8.onnx) when it is about this file: the same checkpoint, export date and size.
    (None, None) when there is none, or it belongs to another export."""
    stem = path.stem.removesuffix(f".{info.precision}")
    report_path = path.with_name(f"{stem}.json")
    try:
        if not report_path.is_file() or report_path.stat().st_size > MAX_REPORT_BYTES:
            return None, None
        report = json.loads(report_path.read_text(encoding="utf-8"))
        size = report["files"][info.precision]["size_bytes"]
        same = (report["export_date"], report["checkpoint_sha256"]) == (info.export_date, info.checkpoint_sha256)
    except (OSError, ValueError, KeyError, TypeError):
        return None, None
    return (report_path, report) if same and size == path.stat().st_size else (None, None)


def verification(path: Path, info: ModelInfo) -> dict | None:
    """The export's checks of this model in each runtime (rows of the report's `runtimes`), if known."""
    report_path, report = export_report(path, info)
    if report is None:
        return None
    rows = [r for r in report.get("runtimes") or [] if isinstance(r, dict) and r.get("precision") == info.precision]
    return {"report": str(report_path), "runtimes": rows}


def _check_line(r: dict) -> str:
    engine = {"CPUExecutionProvider": "cpu", "CUDAExecutionProvider": "cuda"}.get(r.get("engine"), r.get("engine"))
    what = f"{r.get('runtime')} {r.get('version')} {engine}"
    if not r.get("loaded"):
        return f"{what}: cannot run it ({r.get('error')})"
    verdict = "measured" if r.get("passed") is None else "ok" if r["passed"] else "FAILED"
    return (f"{what} vs {r.get('reference')} on {r.get('images'):,} images: max |diff| logits "
            f"{r.get('max_abs_diff_logits'):.1e}, embedding {r.get('max_abs_diff_embedding'):.1e}, "
            f"top-1 agreement {100 * r.get('top1_agreement'):.2f}%: {verdict}")


def describe(model: str | None = None) -> dict:
    """The model's metadata, identity and location as one JSON-ready dict."""
    rt = open_runtime(model or default_model(), provider="cpu", threads=1)
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
        "read_with": rt.version,
        "verified": verification(rt.path, info),
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
        ("verified in", "\n".join(_check_line(r) for r in doc["verified"]["runtimes"]) or "-"
         if doc["verified"] else "- (no export report beside the model for this file)"),
    ]
    table = Table(title=escape(f"cnnedge info: {Path(doc['path']).name}"), title_justify="left", show_header=False)
    table.add_column(style="bold")
    table.add_column(overflow="fold")
    for key, value in rows:
        table.add_row(key, escape(str(value)))
    console.print(table)
