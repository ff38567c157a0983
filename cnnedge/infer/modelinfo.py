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
from cnnedge.errors import CnnedgeError

METADATA_VERSION = "1"
INPUT_NAME = "input"
LOGITS_NAME = "logits"
EMBEDDING_NAME = "embedding"


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

        def numbers(key: str, n: int) -> list[float]:
            value = get_json(key)
            if (not isinstance(value, list) or len(value) != n
                    or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value)):
                raise bad(key, f"must be a list of {n} finite numbers")
            return [float(v) for v in value]

        if get("cnnedge.metadata_version") != METADATA_VERSION:
            raise bad("cnnedge.metadata_version", f"is not {METADATA_VERSION}")
        names = get_json("class_names")
        if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
            raise bad("class_names", "must be a non-empty list of strings")
        shape = get_json("input_shape")
        if (not isinstance(shape, list) or len(shape) != 3
                or not all(isinstance(d, int) and not isinstance(d, bool) and 0 < d <= 4096 for d in shape)):
            raise bad("input_shape", "must be [channels, height, width]")
        mean, std = numbers("mean", shape[0]), numbers("std", shape[0])
        if any(s <= 0 for s in std):
            raise bad("std", "must be positive")
        preprocess = get("preprocess")
        if preprocess not in PREPROCESS_MODES:
            raise bad("preprocess", f"must be one of {', '.join(PREPROCESS_MODES)}")
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
            class_names=names, input_shape=tuple(shape), mean=mean, std=std, preprocess=preprocess,
            arch=get("arch"), precision=precision, embedding_layer=props.get("embedding_layer") or None,
            test_accuracy=accuracy, dataset=props.get("dataset", ""),
            checkpoint_sha256=props.get("checkpoint_sha256", ""), cnnedge_version=props.get("cnnedge_version", ""),
            export_date=props.get("export_date", ""),
            extra={k: v for k, v in props.items() if k not in known},
        )
