"""OpenCV DNN as a cnnedge runtime (`--runtime opencv`): torch-free and onnxruntime-free, for boards where
onnxruntime has no wheels (32-bit ARM) and OpenCV, which the base install always has, does.

    rt = OpenCVRuntime("export/cnn.onnx")     # or open_runtime(path, "opencv"), Predictor(runtime="opencv")
    probs = rt.probabilities(x)               # the same interface as the onnxruntime Runtime

OpenCV 5 has two DNN engines: the new one (the default; fp32, fp16 and int8 QDQ graphs) and the classic
one (OpenCV 4's only engine; fp32 and int8, no fp16 arithmetic on the CPU). A model goes to the first engine
that loads it and runs a probe batch. OpenCV reads neither the ONNX metadata nor the graph's signature:
both come from the file's own bytes (cnnedge.infer.onnxfile). CPU only: OpenCV's pip wheels have no CUDA,
and the new engine runs on the CPU alone.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import cv2
import numpy as np

from cnnedge.errors import CnnedgeError
from cnnedge.infer.files import captured_output
from cnnedge.infer.modelinfo import INPUT_NAME, LOGITS_NAME
from cnnedge.infer.onnxfile import read_header
from cnnedge.infer.backend import BaseRuntime

PROBE_BATCH = 2  # a graph with its batch size baked in fails here, not on the first real batch


def engines() -> dict[str, int | None]:
    """This OpenCV's DNN engines, in the order tried: name -> the engine flag of readNetFromONNX."""
    if hasattr(cv2.dnn, "ENGINE_NEW"):
        return {"new": cv2.dnn.ENGINE_NEW, "classic": cv2.dnn.ENGINE_CLASSIC}
    return {"classic": None}  # OpenCV 4: one engine, no flag


def _reason(error: Exception, log: str) -> str:
    """One line from an OpenCV exception and its log: the node it stopped at, where, and the check that failed."""
    if isinstance(error, cv2.error) and getattr(error, "err", None):
        where = f"{Path(error.file).name}:{error.line}: " if getattr(error, "file", None) else ""
        check = re.sub(r"^\s*>\s*:?", " ", str(error.err), flags=re.MULTILINE)  # CV_Check's "> " lines
        text = where + check
    else:
        text = str(error)
    node = re.search(r"ERROR during processing node[^:]*: \[(\w+)\]:\(onnx_node!([^)]+)\)", log)
    if node:
        text = f"node {node.group(2)} ({node.group(1)}): {text}"
    return " ".join(text.split())[:240]


def load(path: str | os.PathLike, engine: str, input_shape: tuple[int, ...], outputs: list[str],
         dtype=np.float32) -> cv2.dnn.Net:
    """The model in one engine, proven by a forward pass on a probe batch; CnnedgeError(the reason) if not.

    From a file, not from bytes: OpenCV 5.0's in-memory overload ignores the engine flag (it always takes
    the new engine), and given Python bytes instead of a numpy buffer it crashes the process."""
    flag = engines()[engine]
    with captured_output() as log:  # OpenCV logs each failure over several lines on stderr
        try:
            net = cv2.dnn.readNetFromONNX(str(path)) if flag is None else cv2.dnn.readNetFromONNX(str(path), flag)
            if net.empty():
                raise ValueError("readNetFromONNX returned an empty network")
            got = forward(net, np.zeros((PROBE_BATCH, *input_shape), dtype), outputs)
        except Exception as e:  # cv2.error, or a SystemError from the bindings
            error = e
        else:
            error = None
    if error is not None:
        raise CnnedgeError(_reason(error, log()))
    for name, value in zip(outputs, got):
        if value.ndim < 1 or value.shape[0] != PROBE_BATCH:
            raise CnnedgeError(f"output {name!r} has shape {list(value.shape)} for a batch of {PROBE_BATCH}")
    return net


def forward(net: cv2.dnn.Net, x: np.ndarray, outputs: list[str]) -> list[np.ndarray]:
    """Every output named in `outputs`, in that order (the new engine wants all of the graph's outputs asked
    for together). The arrays are the caller's: OpenCV does not reuse them."""
    net.setInput(np.ascontiguousarray(x), INPUT_NAME)
    return list(net.forward(outputs))


class OpenCVRuntime(BaseRuntime):
    """A cnnedge ONNX model in OpenCV DNN on the CPU, with its metadata."""

    name = "opencv"

    def __init__(self, path: str | os.PathLike, provider: str = "auto", threads: int | None = None):
        if provider not in ("auto", "cpu"):
            raise CnnedgeError(f"--runtime opencv runs on the CPU only (OpenCV's pip wheels have no CUDA); "
                               f"use --runtime onnxruntime for provider {provider}")
        super().__init__(path)
        data = self.path.read_bytes()
        try:
            header = read_header(data)
        except ValueError as e:
            raise CnnedgeError(f"{self.path}: not a loadable ONNX model ({e})") from None
        if header.external_data:
            raise CnnedgeError(f"{self.path}: its weights are in external files ({', '.join(header.external_data[:3])}), "
                               "which --runtime opencv does not read; use --runtime onnxruntime")
        self._read_info(header.props)
        self._outputs = list(header.outputs)
        self._shapes = {name: list(v.shape or []) for name, v in header.outputs.items()}
        self._check_graph({name: (v.shape or [], v.elem_type) for name, v in header.inputs.items()}, set(header.outputs))
        if threads:
            cv2.setNumThreads(threads)  # process-wide: OpenCV has one thread pool
        reasons = []
        for engine in engines():
            try:
                self.net = load(self.path, engine, self.info.input_shape, self._outputs, self.input_dtype)
            except CnnedgeError as e:
                reasons.append(f"{engine} engine: {e}")
                continue
            self.engine = engine
            break
        else:
            raise CnnedgeError(f"{self.path}: OpenCV DNN {cv2.__version__} cannot run this model ({'; '.join(reasons)}); "
                               "use --runtime onnxruntime")
        self.version = f"OpenCV {cv2.__version__} ({self.engine} engine)"

    @property
    def output_shapes(self) -> dict[str, list]:
        return self._shapes

    def forward(self, x: np.ndarray, outputs: tuple[str, ...] = (LOGITS_NAME,)) -> list[np.ndarray]:
        missing = [name for name in outputs if name not in self._shapes]
        if missing:
            raise CnnedgeError(f"{self.path}: the model has no output {missing[0]!r}")
        got = dict(zip(self._outputs, forward(self.net, x, self._outputs)))
        return [got[name] for name in outputs]
