"""onnxruntime sessions for cnnedge models (torch-free): verified provider choice, metadata, batched runs.

    rt = Runtime("export/cnn.onnx", provider="auto")   # CUDA when it really loads, else CPU
    probs = rt.probabilities(x)                          # x: float32 (N, H, W) or (N, C, H, W) in [0, 1]

onnxruntime falls back to CPU silently when a GPU provider cannot load (missing driver, CUDA or cuDNN
libraries): the provider actually used is read back from `session.get_providers()`, and an explicit
`cuda` or `tensorrt` request that did not load is an error naming the reason.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import threading
import time
from functools import cached_property
from pathlib import Path

import numpy as np
import onnxruntime as ort

from cnnedge.choices import PROVIDERS
from cnnedge.errors import CnnedgeError
from cnnedge.infer.files import captured_output, describe_file
from cnnedge.infer.modelinfo import INPUT_NAME, LOGITS_NAME, ModelInfo, check_export_set, file_sha256

ORT_PROVIDERS = {
    "cpu": ["CPUExecutionProvider"],
    "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
    "tensorrt": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
}
SHORT_NAMES = {"CPUExecutionProvider": "cpu", "CUDAExecutionProvider": "cuda", "TensorrtExecutionProvider": "tensorrt"}
# Our int8 models keep the first block (one input channel: too thin for integer kernels) in fp32. This
# pass would move its QuantizeLinear above pool1, leaving a slow uint8 MaxPool outside onnxruntime's NCHWc
# path: 0.8x fp32 with it, 1.8x without (benchmarks/bench_int8.py). Graphs without QDQ nodes are unaffected.
DISABLED_OPTIMIZERS = ["QDQPropagationTransformer"]
MAX_MODEL_BYTES = 1 << 30  # larger files are refused before parsing (onnx's protobuf limit is 2 GiB)
# One batch of a small CNN takes milliseconds, seconds on the slowest device; a graph still running after this
# is stopped (a hostile model: a Loop of 10^15 iterations would never return).
RUN_TIME_LIMIT = 60.0


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


def _load_failure_reason(log: str, provider: str) -> str:
    """The useful part of onnxruntime's log about a provider that did not load."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", log)
    m = re.search(r"with error: ([^\n]+)", text)
    if m:
        return m.group(1).strip()
    m = re.search(r"Failed to (?:create|load) [^\n]*", text)
    if m:
        return m.group(0).strip()
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1][-200:] if lines else f"onnxruntime fell back to CPU without saying why ({provider})"


def _gpu_driver_problem() -> str | None:
    """Why no NVIDIA GPU can be used on this machine, or None when the driver library loads."""
    name = "nvcuda.dll" if os.name == "nt" else "libcuda.so.1"
    try:
        ctypes.CDLL(name)
    except OSError as e:
        return f"no NVIDIA driver ({name} cannot be loaded: {str(e).split(':')[-1].strip() or e})"
    return None


class _Watchdog:
    """Stops session.run calls that outlive their deadline: onnxruntime checks RunOptions.terminate between
    nodes, loop iterations included. One daemon thread per process, started by the first run; a run costs a
    RunOptions and two dict operations (under a microsecond)."""

    def __init__(self):
        self.running: dict[int, tuple[ort.RunOptions, float]] = {}
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def start(self, limit: float) -> ort.RunOptions:
        options = ort.RunOptions()
        options.log_severity_level = 4  # the "terminate flag" error is reported by us, in one line
        self.running[id(options)] = (options, time.monotonic() + limit)
        if self._thread is None:
            with self._lock:
                if self._thread is None:
                    self._thread = threading.Thread(target=self._watch, name="cnnedge-watchdog", daemon=True)
                    self._thread.start()
        return options

    def done(self, options: ort.RunOptions) -> None:
        self.running.pop(id(options), None)

    def _watch(self) -> None:
        while True:
            time.sleep(min(1.0, RUN_TIME_LIMIT / 4))
            now = time.monotonic()
            for options, deadline in list(self.running.values()):
                if now > deadline:
                    options.terminate = True


_WATCHDOG = _Watchdog()


def _ort_message(e: Exception, limit: int | None = 200) -> str:
    """onnxruntime's message on one line, without its "[ONNXRuntimeError] : 1 : FAIL : " prefix."""
    first = " ".join(str(e).split())
    return re.sub(r"^\[ONNXRuntimeError\] : \d+ : \w+ : ", "", first)[:limit]


class Runtime:
    """One onnxruntime session on a cnnedge ONNX model, tuned for throughput, with its metadata."""

    def __init__(self, path: str | os.PathLike, provider: str = "auto", threads: int | None = None):
        self.path = Path(path)
        if provider not in PROVIDERS:
            raise CnnedgeError(f"unknown provider {provider!r}; choose one of {', '.join(PROVIDERS)}")
        self._check_file()
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL  # a chain of layers: no branch parallelism
        options.intra_op_num_threads = threads or (os.cpu_count() or 1)
        options.inter_op_num_threads = 1
        options.log_severity_level = 3  # errors only; provider load failures are captured and reported by us
        self.session = self._create(options, provider)
        used = self.session.get_providers()[0]
        self.provider = SHORT_NAMES.get(used, used)
        meta = self.session.get_modelmeta().custom_metadata_map
        self.info = ModelInfo.from_props(meta, source=str(self.path))
        self._check_graph()
        c = self.info.input_shape[0]
        self._mean = np.asarray(self.info.mean, np.float32).reshape(1, c, 1, 1)
        self._inv_std = (1.0 / np.asarray(self.info.std, np.float32)).reshape(1, c, 1, 1)

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

    def _session(self, options, providers):
        try:
            return ort.InferenceSession(str(self.path), sess_options=options, providers=providers,
                                        disabled_optimizers=DISABLED_OPTIMIZERS)
        except Exception as e:  # onnxruntime raises its own exception types for malformed files
            first = _ort_message(e, limit=None)
            kind = describe_file(self.path)
            if kind == "a PyTorch checkpoint":
                raise CnnedgeError(f"{self.path}: a PyTorch checkpoint, not an ONNX model; export it first: "
                                   f"cnnedge export {self.path}") from None
            if kind not in (None, "an ONNX model"):
                raise CnnedgeError(f"{self.path}: not a loadable ONNX model ({kind}; export one with `cnnedge export`)") from None
            if re.search(r"escapes model directory|absolute path", first, re.IGNORECASE):
                # onnxruntime >= 1.24 checks where external weights live before opening anything:
                # only inside the model's folder (no absolute paths, no "..", no symlinks leading out).
                detail = re.sub(r"^.*?Error: (\S+\.cc:\d+ \w+ )?", "", first)
                raise CnnedgeError(f"{self.path}: refused: its weights point at a file outside the model's folder "
                                   f"({detail[:200]})") from None
            raise CnnedgeError(f"{self.path}: not a loadable ONNX model ({first[:200]})") from None

    def _create(self, options, provider: str):
        available = ort.get_available_providers()
        if provider == "cpu":
            return self._session(options, ORT_PROVIDERS["cpu"])
        if provider == "auto":
            if "CUDAExecutionProvider" in available and _gpu_driver_problem() is None:
                session, _ = self._try_gpu(options, "cuda")
                if session is not None:
                    return session
            return self._session(options, ORT_PROVIDERS["cpu"])
        wanted = ORT_PROVIDERS[provider][0]
        if wanted not in available:
            raise CnnedgeError(f"provider {provider} is not available: this onnxruntime build has only "
                               f"{', '.join(available)} (install onnxruntime-gpu for cuda and tensorrt)")
        problem = _gpu_driver_problem()
        if problem:
            raise CnnedgeError(f"provider {provider} cannot be used: {problem}")
        session, reason = self._try_gpu(options, provider)
        if session is None:
            raise CnnedgeError(f"provider {provider} failed to load and onnxruntime would fall back to CPU: {reason}")
        return session

    def _try_gpu(self, options, provider: str):
        """(session, None) when `provider` really runs the model, else (None, the reason)."""
        wanted = ORT_PROVIDERS[provider][0]
        with captured_output() as log:
            if hasattr(ort, "preload_dlls"):  # CUDA/cuDNN from the nvidia-* wheels when the system has none
                with contextlib.suppress(Exception):
                    ort.preload_dlls()
            session = self._session(options, ORT_PROVIDERS[provider])
        if wanted in session.get_providers():
            return session, None
        return None, _load_failure_reason(log(), provider)

    def _check_graph(self) -> None:
        inputs = {i.name: i for i in self.session.get_inputs()}
        outputs = {o.name for o in self.session.get_outputs()}
        if INPUT_NAME not in inputs or LOGITS_NAME not in outputs:
            raise CnnedgeError(f"{self.path}: expected input {INPUT_NAME!r} and output {LOGITS_NAME!r}, found "
                               f"{', '.join(inputs)} -> {', '.join(sorted(outputs))}; export it with `cnnedge export`")
        shape = inputs[INPUT_NAME].shape
        if len(shape) != 4 or any(isinstance(d, int) and d != e for d, e in zip(shape[1:], self.info.input_shape)):
            raise CnnedgeError(f"{self.path}: graph input {shape} disagrees with the metadata's input_shape "
                               f"{list(self.info.input_shape)}")
        logits = self.output_shapes[LOGITS_NAME]
        if len(logits) != 2 or (isinstance(logits[1], int) and logits[1] != len(self.class_names)):
            raise CnnedgeError(f"{self.path}: graph output {LOGITS_NAME} {logits} disagrees with the "
                               f"{len(self.class_names)} class names of its metadata")
        self.input_dtype = np.float16 if inputs[INPUT_NAME].type == "tensor(float16)" else np.float32

    # ------------------------------------------------------------------------------------ running

    @property
    def class_names(self) -> list[str]:
        return self.info.class_names

    @cached_property
    def output_shapes(self) -> dict[str, list]:
        """Each graph output's shape (symbolic axes as names): `logits`, and `embedding` where exported."""
        return {o.name: list(o.shape) for o in self.session.get_outputs()}

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

    def run(self, x: np.ndarray, outputs: tuple[str, ...] = (LOGITS_NAME,)) -> list[np.ndarray]:
        """The named outputs for a batch. A model that fails, runs past RUN_TIME_LIMIT, gives another number
        of rows or classes than it should, or NaN/infinity, is a one-line CnnedgeError: an untrusted model
        gets no further than this."""
        if len(x) == 0:
            return [np.zeros((0, 0), np.float32) for _ in outputs]
        feed = {INPUT_NAME: self.normalise(x)}
        options = _WATCHDOG.start(RUN_TIME_LIMIT)
        try:
            results = self.session.run(list(outputs), feed, options)
        except Exception as e:
            if options.terminate:
                raise CnnedgeError(f"{self.path}: stopped after {RUN_TIME_LIMIT:g} s on a batch of {len(x)} "
                                   f"image(s): the model does not finish (a broken or hostile graph)") from None
            raise CnnedgeError(f"{self.path}: the model failed to run ({_ort_message(e)})") from None
        finally:
            _WATCHDOG.done(options)
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
