"""The runtime interface of cnnedge models (torch-free), and its onnxruntime implementation.

    rt = open_runtime("export/cnn.onnx")                 # onnxruntime where installed, else OpenCV DNN
    rt = Runtime("export/cnn.onnx", provider="auto")     # onnxruntime: CUDA when it really loads, else CPU
    probs = rt.probabilities(x)                          # x: float32 (N, H, W) or (N, C, H, W) in [0, 1]

`cnnedge.infer.backend.BaseRuntime` is what predict, enroll, webcam, bench, info and serve use: the model
file's checks, its metadata, normalisation, logits and embedding. Two implementations: `Runtime` here
(onnxruntime, the default) and `cnnedge.infer.opencv.OpenCVRuntime` (OpenCV DNN, for boards without
onnxruntime wheels such as 32-bit ARM). onnxruntime is imported only when a `Runtime` is created, so this
module loads without it.

onnxruntime falls back to CPU silently when a GPU provider cannot load (missing driver, CUDA or cuDNN
libraries): the provider actually used is read back from `session.get_providers()`, and an explicit
`cuda` or `tensorrt` request that did not load is an error naming the reason.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib.util
import mmap
import os
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from functools import cached_property

import numpy as np

from cnnedge.choices import PROVIDERS, RUNTIMES
from cnnedge.errors import CnnedgeError
from cnnedge.infer.backend import BaseRuntime
from cnnedge.infer.files import captured_output, describe_file
from cnnedge.infer.modelinfo import INPUT_NAME, LOGITS_NAME
from cnnedge.infer.onnxfile import read_header
from cnnedge.threads import thread_count

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
# int8 on the CPU runs a batch as `threads` slices at once, each in one thread, instead of one call across
# `threads` intra-op threads: onnxruntime's integer convolutions gain about 1.45x from a second intra-op
# thread where its float ones gain 1.9-2.1x, so int8 was 1.1-1.5x fp32 on two cores; as two slices it is
# 1.62x at batch 64 and 1.87x at 256 (benchmarks/bench_int8.py). Batches smaller than 2 * SLICE are not
# split (below it the hand-off to the other thread costs more than the second core gives).
SLICE = 8
# One batch of a small CNN takes milliseconds, seconds on the slowest device; a graph still running after this
# is stopped (a hostile model: a Loop of 10^15 iterations would never return).
RUN_TIME_LIMIT = 60.0


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
        self.running: dict[int, tuple] = {}  # id -> (onnxruntime.RunOptions, deadline)
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def start(self, limit: float):
        options = import_onnxruntime().RunOptions()
        options.log_severity_level = 4  # the "terminate flag" error is reported by us, in one line
        self.running[id(options)] = (options, time.monotonic() + limit)
        if self._thread is None:
            with self._lock:
                if self._thread is None:
                    self._thread = threading.Thread(target=self._watch, name="cnnedge-watchdog", daemon=True)
                    self._thread.start()
        return options

    def done(self, options) -> None:
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


def default_runtime() -> str:
    """onnxruntime where it is installed, else OpenCV DNN (which the base install always has)."""
    return "onnxruntime" if importlib.util.find_spec("onnxruntime") is not None else "opencv"


def import_onnxruntime():
    """The onnxruntime module; a one-line error naming --runtime opencv where it cannot be imported."""
    try:
        import onnxruntime
    except ImportError as e:
        why = ("is not installed (it has no wheels for this platform, e.g. 32-bit ARM)"
               if importlib.util.find_spec("onnxruntime") is None else f"cannot be imported ({e})")
        raise CnnedgeError(f"onnxruntime {why}: use --runtime opencv (OpenCV DNN), "
                           f"or runtime='opencv' in the Python API") from None
    return onnxruntime


def open_runtime(path: str | os.PathLike, runtime: str | None = None, provider: str = "auto",
                 threads: int | None = None) -> "BaseRuntime":
    """The model in `runtime` (onnxruntime or opencv; None: `default_runtime()`)."""
    runtime = default_runtime() if runtime is None else runtime
    if runtime not in RUNTIMES:
        raise CnnedgeError(f"unknown runtime {runtime!r}; choose one of {', '.join(RUNTIMES)}")
    if provider not in PROVIDERS:
        raise CnnedgeError(f"unknown provider {provider!r}; choose one of {', '.join(PROVIDERS)}")
    if runtime == "opencv":
        from cnnedge.infer.opencv import OpenCVRuntime

        return OpenCVRuntime(path, provider, threads)
    return Runtime(path, provider, threads)


class Runtime(BaseRuntime):
    """One onnxruntime session on a cnnedge ONNX model, tuned for throughput, with its metadata."""

    name = "onnxruntime"

    def __init__(self, path: str | os.PathLike, provider: str = "auto", threads: int | None = None):
        if provider not in PROVIDERS:
            raise CnnedgeError(f"unknown provider {provider!r}; choose one of {', '.join(PROVIDERS)}")
        super().__init__(path)  # the file's checks, before onnxruntime loads
        ort = import_onnxruntime()
        self.version = f"onnxruntime {ort.__version__}"
        self.threads = thread_count(threads)
        sliced = self._precision() == "int8"  # see SLICE
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL  # a chain of layers: no branch parallelism
        options.intra_op_num_threads = 1 if sliced else self.threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 3  # errors only; provider load failures are captured and reported by us
        self.session = self._create(options, provider)
        used = self.session.get_providers()[0]
        self.provider = SHORT_NAMES.get(used, used)
        self.slices = self.threads if sliced and self.provider == "cpu" else 1
        self._pool = ThreadPoolExecutor(self.slices - 1, thread_name_prefix="cnnedge-int8") if self.slices > 1 else None
        self._read_info(self.session.get_modelmeta().custom_metadata_map)
        self._check_graph({i.name: (i.shape, "float16" if i.type == "tensor(float16)" else "float32")
                           for i in self.session.get_inputs()}, {o.name for o in self.session.get_outputs()})

    # ------------------------------------------------------------------------------- construction

    def _precision(self) -> str | None:
        """The precision the file's metadata names, read before onnxruntime loads it (the session's
        threads depend on it); None when unreadable (onnxruntime then says why)."""
        try:
            with open(self.path, "rb") as f:
                data = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)  # only the pages read_header reads
            return read_header(data).props.get("precision")  # the map closes with its last reference
        except (OSError, ValueError):
            return None

    def _session(self, options, providers):
        ort = import_onnxruntime()
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
        ort = import_onnxruntime()
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
        ort = import_onnxruntime()
        wanted = ORT_PROVIDERS[provider][0]
        with captured_output() as log:
            if hasattr(ort, "preload_dlls"):  # CUDA/cuDNN from the nvidia-* wheels when the system has none
                with contextlib.suppress(Exception):
                    ort.preload_dlls()
            session = self._session(options, ORT_PROVIDERS[provider])
        if wanted in session.get_providers():
            return session, None
        return None, _load_failure_reason(log(), provider)

    # ------------------------------------------------------------------------------------ running

    @cached_property
    def output_shapes(self) -> dict[str, list]:
        return {o.name: list(o.shape) for o in self.session.get_outputs()}

    def forward(self, x: np.ndarray, outputs: tuple[str, ...] = (LOGITS_NAME,)) -> list[np.ndarray]:
        slices = min(self.slices, len(x) // SLICE)
        if slices < 2:
            return self._run(x, outputs)
        # onnxruntime's run may be called from several threads at once; it releases the GIL while it runs.
        bounds = np.linspace(0, len(x), slices + 1).astype(int)
        parts = [x[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
        others = [self._pool.submit(self._run, part, outputs) for part in parts[1:]]
        results = [self._run(parts[0], outputs)] + [f.result() for f in others]
        return [np.concatenate([r[i] for r in results]) for i in range(len(outputs))]

    def _run(self, x: np.ndarray, outputs: tuple[str, ...]) -> list[np.ndarray]:
        """One session.run, stopped if it outlives RUN_TIME_LIMIT."""
        options = _WATCHDOG.start(RUN_TIME_LIMIT)
        try:
            return self.session.run(list(outputs), {INPUT_NAME: x}, options)
        except Exception as e:
            if options.terminate:
                raise CnnedgeError(f"{self.path}: stopped after {RUN_TIME_LIMIT:g} s on a batch of {len(x)} "
                                   f"image(s): the model does not finish (a broken or hostile graph)") from None
            raise CnnedgeError(f"{self.path}: the model failed to run ({_ort_message(e)})") from None
        finally:
            _WATCHDOG.done(options)
