"""The runtime interface every backend implements (torch-free, and free of any runtime library): the model
file's checks, its metadata, normalisation, and batched logits and embeddings.

Two implementations: `cnnedge.infer.runtime.Runtime` (onnxruntime, the default) and
`cnnedge.infer.opencv.OpenCVRuntime` (OpenCV DNN, for boards without onnxruntime wheels such as 32-bit ARM);
`cnnedge.infer.runtime.open_runtime` picks one.
"""

from __future__ import annotations

import os
from functools import cached_property
from pathlib import Path

import numpy as np

from cnnedge.errors import CnnedgeError
from cnnedge.infer.modelinfo import INPUT_NAME, LOGITS_NAME, ModelInfo, check_export_set, file_sha256

MAX_MODEL_BYTES = 1 << 30  # larger files are refused before parsing (onnx's protobuf limit is 2 GiB)


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    np.exp(z, out=z)
    z /= z.sum(axis=1, keepdims=True)
    return z


def topk(probs: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(indices, probabilities) of the k most probable classes per row, most probable first."""
    k = max(1, min(k, probs.shape[1]))
    idx = np.argpartition(-probs, k - 1, axis=1)[:, :k]
    part = np.take_along_axis(probs, idx, axis=1)
    order = np.argsort(-part, axis=1, kind="stable")
    return np.take_along_axis(idx, order, axis=1), np.take_along_axis(part, order, axis=1)


class BaseRuntime:
    """A cnnedge ONNX model loaded in some runtime: its metadata, and batched logits and embeddings.

    A subclass loads the network, then calls `_check_graph` with the graph's signature and `_read_info`
    with the metadata, and implements `forward` (normalised input -> the named outputs) and `output_shapes`."""

    name = ""  # "onnxruntime" or "opencv"
    provider = "cpu"  # what really runs the network
    version = ""  # "onnxruntime 1.31.1", "OpenCV 5.0.0 (new engine)"
    input_dtype = np.float32

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._check_file()

    # ------------------------------------------------------------------------------- construction

    def _check_file(self) -> None:
        p = self.path
        if not p.exists():
            raise CnnedgeError(f"{p}: no such model file (export one with `cnnedge export`)")
        if not p.is_file():
            raise CnnedgeError(f"{p}: not a file")
        size = p.stat().st_size
        if size == 0:
            raise CnnedgeError(f"{p}: empty model file")
        if size > MAX_MODEL_BYTES:
            raise CnnedgeError(f"{p}: {size:,} bytes is over the {MAX_MODEL_BYTES:,}-byte model limit")
        check_export_set(p, lambda: self.sha256)  # a model its export report beside it does not list: refused

    def _read_info(self, props: dict[str, str]) -> None:
        self.info = ModelInfo.from_props(props, source=str(self.path))
        c = self.info.input_shape[0]
        self._mean = np.asarray(self.info.mean, np.float32).reshape(1, c, 1, 1)
        self._inv_std = (1.0 / np.asarray(self.info.std, np.float32)).reshape(1, c, 1, 1)

    def _check_graph(self, inputs: dict[str, tuple[list, str]], outputs: set[str]) -> None:
        """The graph's inputs (name -> (shape, numpy dtype name)) and output names against the contract
        and the metadata."""
        if INPUT_NAME not in inputs or LOGITS_NAME not in outputs:
            raise CnnedgeError(f"{self.path}: expected input {INPUT_NAME!r} and output {LOGITS_NAME!r}, found "
                               f"{', '.join(inputs)} -> {', '.join(sorted(outputs))}; export it with `cnnedge export`")
        shape, dtype = inputs[INPUT_NAME]
        if len(shape) != 4 or any(isinstance(d, int) and d != e for d, e in zip(shape[1:], self.info.input_shape)):
            raise CnnedgeError(f"{self.path}: graph input {shape} disagrees with the metadata's input_shape "
                               f"{list(self.info.input_shape)}")
        logits = self.output_shapes[LOGITS_NAME]
        if len(logits) != 2 or (isinstance(logits[1], int) and logits[1] != len(self.class_names)):
            raise CnnedgeError(f"{self.path}: graph output {LOGITS_NAME} {logits} disagrees with the "
                               f"{len(self.class_names)} class names of its metadata")
        self.input_dtype = np.float16 if dtype == "float16" else np.float32

    # ------------------------------------------------------------------------------------ running

    @property
    def class_names(self) -> list[str]:
        return self.info.class_names

    @property
    def output_shapes(self) -> dict[str, list]:
        """Each graph output's shape (symbolic axes as names): `logits`, and `embedding` where exported."""
        raise NotImplementedError

    @cached_property
    def sha256(self) -> str:
        """The model file's identity (what a gallery is bound to)."""
        return file_sha256(self.path)

    def normalise(self, x: np.ndarray) -> np.ndarray:
        """[0, 1] images (N, H, W) or (N, C, H, W) -> the network's normalised input tensor."""
        x = np.asarray(x, dtype=np.float32)
        if x.ndim == 3:
            x = x[:, None]
        if tuple(x.shape[1:]) != tuple(self.info.input_shape):
            raise CnnedgeError(f"input batch of shape {tuple(x.shape[1:])} does not match the model's "
                               f"{tuple(self.info.input_shape)}")
        return ((x - self._mean) * self._inv_std).astype(self.input_dtype, copy=False)

    def forward(self, x: np.ndarray, outputs: tuple[str, ...] = (LOGITS_NAME,)) -> list[np.ndarray]:
        """The named outputs for an already normalised batch."""
        raise NotImplementedError

    def run(self, x: np.ndarray, outputs: tuple[str, ...] = (LOGITS_NAME,)) -> list[np.ndarray]:
        """The named outputs for a batch. A model that fails, gives another number of rows or classes than it
        should, or NaN/infinity, is a one-line CnnedgeError: an untrusted model gets no further than this."""
        if len(x) == 0:
            return [np.zeros((0, 0), np.float32) for _ in outputs]
        results = self.forward(self.normalise(x), outputs)
        for name, value in zip(outputs, results):
            if len(value) != len(x) or (name == LOGITS_NAME and (value.ndim != 2 or value.shape[1] != len(self.class_names))):
                raise CnnedgeError(f"{self.path}: output {name} has shape {list(value.shape)} for {len(x)} image(s) and "
                                   f"{len(self.class_names)} classes: the graph disagrees with its metadata")
            if not np.isfinite(value).all():
                raise CnnedgeError(f"{self.path}: output {name} holds NaN or infinite values: a broken or hostile model")
        return results

    def logits(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(self.run(x)[0], dtype=np.float32)

    def probabilities(self, x: np.ndarray) -> np.ndarray:
        return softmax(self.logits(x))
