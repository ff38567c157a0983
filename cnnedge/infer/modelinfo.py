"""What a deployed model needs to know about itself, stored as ONNX `metadata_props` (string -> string).

Export writes it; predict, webcam, enroll, serve, info and bench read it, so the .onnx file is all a device needs.
Torch-free and onnx-free: readers get the props from onnxruntime's `get_modelmeta().custom_metadata_map`, or
from the file's bytes (cnnedge.infer.onnxfile) where OpenCV DNN runs the model.
Parsing is strict: a model with missing or malformed metadata is refused with one clear reason.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from cnnedge.choices import PRECISIONS, PREPROCESS_MODES
from cnnedge.errors import CnnedgeError, ExitCode

METADATA_VERSION = "1"
INPUT_NAME = "input"
LOGITS_NAME = "logits"
EMBEDDING_NAME = "embedding"
# Small CNNs on small images: anything larger is refused before a session or a batch is made (a crafted
# [1, 4096, 4096] input shape made predict allocate 64 MB per image, 16 GB per batch).
MAX_INPUT_SIDE = 512
MAX_CHANNELS = 4
MAX_CLASSES = 1_000  # a 10,000-class head gives a 900 MB confusion matrix in the metrics JSON


# The shipped default model: package data in a wheel (pyproject maps export/cnn.onnx there), the repository's
# export/cnn.onnx in an editable install or a source checkout. One copy in git, found from any folder.
PACKAGED_MODEL = Path(__file__).resolve().parent / "model" / "cnn.onnx"
REPO_MODEL = Path(__file__).resolve().parents[2] / "export" / "cnn.onnx"


def default_model() -> Path:
    """Where the shipped default model is (used when no --model is given)."""
    return PACKAGED_MODEL if PACKAGED_MODEL.is_file() else REPO_MODEL


def file_sha256(path: str | os.PathLike) -> str:
    """A file's identity (the checkpoint a model came from, the model a gallery was enrolled with)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_fields(bad, class_names, input_shape, mean, std, preprocess) -> None:
    """The rules every exported model's metadata and every checkpoint follow (predict, export and train share
    them, so that export never writes a model predict would refuse). `bad(key, why)` makes the error."""
    if (not isinstance(class_names, list) or not 2 <= len(class_names) <= MAX_CLASSES
            or not all(isinstance(n, str) and n for n in class_names)):
        raise bad("class_names", f"must be a list of 2 to {MAX_CLASSES:,} non-empty strings")
    if len(set(class_names)) != len(class_names):
        raise bad("class_names", "must be distinct")
    if not all(n.isprintable() for n in class_names):  # they are printed: no ESC sequences, no newlines
        raise bad("class_names", "must be printable text (no control characters)")
    if (not isinstance(input_shape, (list, tuple)) or len(input_shape) != 3
            or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in input_shape)
            or input_shape[0] > MAX_CHANNELS or max(input_shape[1:]) > MAX_INPUT_SIDE):
        raise bad("input_shape", f"must be [channels, height, width] with at most {MAX_CHANNELS} channels and "
                                 f"{MAX_INPUT_SIDE} pixels a side")
    for key, value in (("mean", mean), ("std", std)):
        if (not isinstance(value, (list, tuple)) or len(value) != input_shape[0]
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value)):
            raise bad(key, f"must be a list of {input_shape[0]} finite numbers")
    if any(s <= 0 for s in std):
        raise bad("std", "must be positive")
    if preprocess not in PREPROCESS_MODES:
        raise bad("preprocess", f"must be one of {', '.join(PREPROCESS_MODES)}")


@dataclass
class ModelInfo:
    class_names: list[str]
    input_shape: tuple[int, int, int]  # (C, H, W) of one image
    mean: list[float]
    std: list[float]
    preprocess: str  # "digit" or "fit", see cnnedge.preprocess
    arch: str
    precision: str = "fp32"
    embedding_layer: str | None = None  # the layer behind the `embedding` output, if the graph has one
    test_accuracy: float | None = None
    dataset: str = ""
    checkpoint_sha256: str = ""
    cnnedge_version: str = ""
    export_date: str = ""
    extra: dict[str, str] = field(default_factory=dict)  # any other props, kept as they are

    def to_props(self) -> dict[str, str]:
        props = {
            "cnnedge.metadata_version": METADATA_VERSION,
            "class_names": json.dumps(self.class_names),
            "input_shape": json.dumps(list(self.input_shape)),
            "mean": json.dumps(self.mean),
            "std": json.dumps(self.std),
            "preprocess": self.preprocess,
            "arch": self.arch,
            "precision": self.precision,
            "dataset": self.dataset,
            "checkpoint_sha256": self.checkpoint_sha256,
            "cnnedge_version": self.cnnedge_version,
            "export_date": self.export_date,
        }
        if self.embedding_layer:
            props["embedding_layer"] = self.embedding_layer
        if self.test_accuracy is not None:
            props["test_accuracy"] = repr(float(self.test_accuracy))
        return {**self.extra, **props}

    @classmethod
    def from_props(cls, props: dict[str, str], source: str = "model") -> "ModelInfo":
        def bad(key: str, why: str) -> CnnedgeError:
            return CnnedgeError(f"{source}: metadata {key!r} {why}; export it with `cnnedge export`")

        def get(key: str) -> str:
            value = props.get(key)
            if not isinstance(value, str) or not value:
                raise bad(key, "is missing")
            return value

        def get_json(key: str):
            try:
                return json.loads(get(key))
            except (ValueError, RecursionError):
                raise bad(key, "is not valid JSON") from None

        if get("cnnedge.metadata_version") != METADATA_VERSION:
            raise bad("cnnedge.metadata_version", f"is not {METADATA_VERSION}")
        names, shape, mean, std = (get_json(key) for key in ("class_names", "input_shape", "mean", "std"))
        preprocess = get("preprocess")
        check_fields(bad, names, shape, mean, std, preprocess)
        precision = props.get("precision", "fp32")
        if precision not in PRECISIONS:
            raise bad("precision", f"must be one of {', '.join(PRECISIONS)}")
        accuracy = None
        if props.get("test_accuracy"):
            try:
                accuracy = float(props["test_accuracy"])
            except ValueError:
                accuracy = math.nan
            if not 0.0 <= accuracy <= 1.0:
                raise bad("test_accuracy", "must be a number between 0 and 1")
        known = {"cnnedge.metadata_version", "class_names", "input_shape", "mean", "std", "preprocess", "arch",
                 "precision", "embedding_layer", "test_accuracy", "dataset", "checkpoint_sha256",
                 "cnnedge_version", "export_date"}
        return cls(
            class_names=names, input_shape=tuple(shape), mean=[float(v) for v in mean], std=[float(v) for v in std],
            preprocess=preprocess,
            arch=get("arch"), precision=precision, embedding_layer=props.get("embedding_layer") or None,
            test_accuracy=accuracy, dataset=props.get("dataset", ""),
            checkpoint_sha256=props.get("checkpoint_sha256", ""), cnnedge_version=props.get("cnnedge_version", ""),
            export_date=props.get("export_date", ""),
            extra={k: v for k, v in props.items() if k not in known},
        )


# ------------------------------------------------------------------------------------ export sets


def export_report(model: str | os.PathLike) -> tuple[Path, dict] | None:
    """The report `cnnedge export` wrote beside a model (`cnn.json` for cnn.onnx, cnn.fp16.onnx and
    cnn.int8.onnx), when there is one: (its path, its content). Files that are no export report are ignored."""
    model = Path(model)
    stem = model.name[: -len(".onnx")] if model.name.endswith(".onnx") else model.stem
    base, _, precision = stem.rpartition(".")
    for name in [stem] + ([base] if base and precision in PRECISIONS and precision != "fp32" else []):
        path = model.with_name(f"{name}.json")
        try:
            with open(path, encoding="utf-8") as f:
                doc = json.load(f)
        except (OSError, ValueError, RecursionError):
            continue
        files = doc.get("files") if isinstance(doc, dict) else None
        if isinstance(files, dict) and any(isinstance(f, dict) and Path(str(f.get("path", ""))).name == model.name
                                           for f in files.values()):
            return path, doc
        if isinstance(files, dict) and name == base:  # the variant's own report, which does not list it
            return path, doc
    return None


def check_export_set(model: str | os.PathLike, sha256) -> None:
    """Refuse a model that the export report beside it does not vouch for. Export publishes its files one by
    one and the report last, listing every file's sha256 (cnnedge.train.export.write_outputs): a run killed
    between two renames, or a variant left from an earlier export, is a mixed set, and this is where it is
    caught. `sha256` is a function returning the model file's sha256 (only called when there is a report)."""
    found = export_report(model)
    if found is None:
        return
    report, doc = found
    model = Path(model)
    listed = {Path(str(f.get("path", ""))).name: f for f in doc["files"].values() if isinstance(f, dict)}
    if not any("sha256" in f for f in listed.values()):
        return  # a report from before cnnedge 0.2 listed no sha256: nothing to check against
    again = "export it again (with --force) to rewrite the whole set"
    entry = listed.get(model.name)
    if entry is None:
        raise CnnedgeError(f"{model}: not part of the export {report} describes ({', '.join(listed)}): left from "
                           f"an earlier export, or the set is incomplete; {again}", ExitCode.CHECK_FAILED)
    actual = sha256()
    if entry.get("sha256") != actual:
        raise CnnedgeError(f"{model}: sha256 {actual[:12]} is not the {str(entry.get('sha256'))[:12]} that {report} "
                           f"lists: a partial or mixed export (interrupted?); {again}", ExitCode.CHECK_FAILED)
