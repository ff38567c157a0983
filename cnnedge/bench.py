"""`cnnedge bench`: PyTorch eager vs onnxruntime and OpenCV DNN, fp32, fp16 and int8, on this machine, in one run.

    cnnedge bench                                   # export/cnn.onnx, its variants, models/cnn.pt
    cnnedge bench --providers cpu,cuda --format json
    cnnedge bench --runtimes opencv                 # a board without onnxruntime

Every row is one engine (a runtime, a provider, a precision) at one batch size:

- latency: one call, numpy batch in, logits out (normalization excluded, same images for every row),
  after warm-up calls; p50 and p99 over at least --repeat calls and --min-time seconds, the engines
  taking turns so that a machine whose load changes during the run hurts them alike;
- throughput: batch / p50 latency, so the ratios between rows are ratios of measured medians;
- accuracy: the test set (MNIST-style idx files under the data folder) run through THAT engine;
- achieved GFLOP/s: 2 x the model's MACs per image x images/s, next to a measured matrix-multiply peak;
- ratios: vs PyTorch, vs the same runtime's fp32 row, and (OpenCV rows) vs onnxruntime at that precision.

Then preprocessing throughput (28x28 crops and 640x480 photos, one thread and predict's thread pool) and
end-to-end `Predictor` throughput on a generated folder of image files, per runtime.

Torch-free unless a checkpoint is benchmarked: the PyTorch rows import torch, and are skipped (speed-ups
null) where it is not installed. MACs need the `onnx` package; without it they are reported as unknown.
Without onnxruntime (32-bit ARM boards) the OpenCV rows run alone.
"""

from __future__ import annotations

import contextlib
import math
import os
import platform
import shlex
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from cnnedge.errors import CnnedgeError
from cnnedge.infer.modelinfo import INPUT_NAME, LOGITS_NAME, ModelInfo, default_model, file_sha256
from cnnedge.threads import free_cores, thread_count

DEFAULT_CHECKPOINT = "models/cnn.pt"
PROVIDER_NAMES = ("cpu", "cuda", "tensorrt")
RUNTIME_ORDER = ("onnxruntime", "opencv")
PRECISION_ORDER = ("fp32", "fp16", "int8")
ROW_KEYS = ("runtime", "provider", "precision", "batch", "latency_ms_p50", "latency_ms_p99", "images_per_second",
            "accuracy", "size_bytes", "speedup_vs_torch")
ACCURACY_BATCH = 500
MATMUL_SIZE = 512  # fits the caches, like this network's layers: a compute ceiling, not a memory one
PHOTO_SIZE = (640, 480)


@dataclass
class BenchConfig:
    model: str | None = None  # None: the shipped default model
    checkpoint: str | None = None  # None: models/cnn.pt when it exists
    batch_sizes: tuple[int, ...] = (1, 64, 256)
    providers: tuple[str, ...] = ("auto",)
    runtimes: tuple[str, ...] | None = None  # None: every installed one (onnxruntime where it is, and OpenCV)
    threads: int | None = None  # None: the free cores (cnnedge.threads), for onnxruntime and torch alike
    warmup: int = 10
    repeat: int = 30
    min_time: float = 1.0
    images: int = 2_000
    photos: int = 100
    test_images: int | None = None
    data_dir: str | None = None


@dataclass
class Engine:
    """Something that turns a normalized float32 batch into logits, and what it really is."""

    runtime: str  # "torch", "onnxruntime" or "opencv"
    provider: str  # what the session or device really uses, not what was asked for
    precision: str
    file: str
    size_bytes: int
    version: str
    session_providers: list[str] | None
    run: Callable[[np.ndarray], np.ndarray]
    info: ModelInfo | None = None  # the ONNX model's metadata (onnxruntime and OpenCV engines)


# ---------------------------------------------------------------------------------------- inputs


def parse_list(text: str, what: str) -> list[str]:
    items = [t.strip() for t in str(text).split(",") if t.strip()]
    if not items:
        raise CnnedgeError(f"{what}: give at least one value")
    return items


def parse_batch_sizes(text: str) -> tuple[int, ...]:
    sizes = []
    for item in parse_list(text, "--batch-sizes"):
        if not item.isdigit() or int(item) < 1:
            raise CnnedgeError(f"--batch-sizes: {item!r} is not a positive whole number")
        sizes.append(int(item))
    return tuple(dict.fromkeys(sizes))


def parse_providers(text: str) -> tuple[str, ...]:
    providers = tuple(dict.fromkeys(p.lower() for p in parse_list(text, "--providers")))
    for p in providers:
        if p not in ("auto", *PROVIDER_NAMES):
            raise CnnedgeError(f"--providers: unknown provider {p!r}; choose from auto, {', '.join(PROVIDER_NAMES)}")
    if "auto" in providers and len(providers) > 1:
        raise CnnedgeError("--providers: auto stands alone (it means cpu, and cuda where it really loads)")
    return providers


def parse_runtimes(text: str) -> tuple[str, ...]:
    runtimes = tuple(dict.fromkeys(r.lower() for r in parse_list(text, "--runtimes")))
    for r in runtimes:
        if r not in RUNTIME_ORDER:
            raise CnnedgeError(f"--runtimes: unknown runtime {r!r}; choose from {', '.join(RUNTIME_ORDER)}")
    return runtimes


def check_config(cfg: BenchConfig) -> None:
    if cfg.threads is not None and cfg.threads < 1:
        raise CnnedgeError("--threads must be at least 1")
    if cfg.warmup < 0 or cfg.repeat < 1 or cfg.min_time < 0:
        raise CnnedgeError("--warmup must be >= 0, --repeat >= 1 and --min-time >= 0")
    if cfg.images < 0 or cfg.photos < 0:
        raise CnnedgeError("--images and --photos must be >= 0")
    if cfg.test_images is not None and cfg.test_images < 1:
        raise CnnedgeError("--test-images must be at least 1")


def variant_paths(model: Path) -> dict[str, Path]:
    """cnn.onnx -> {fp32: cnn.onnx, fp16: cnn.fp16.onnx, int8: cnn.int8.onnx}, as export writes them."""
    return {"fp32": model, **{p: model.with_name(f"{model.stem}.{p}.onnx") for p in PRECISION_ORDER[1:]}}


def load_test_set(dataset: str, input_shape, data_dir: str | None, limit: int | None):
    """(uint8 images (N, H, W), labels, source) of the model's test set, or (None, None, why not)."""
    from cnnedge.infer.files import load_test_set as load

    x, y, source = load(dataset, data_dir, limit)
    if x is None:
        return None, None, f"no accuracy: {source}"
    if (1, *x.shape[1:]) != tuple(input_shape):
        raise CnnedgeError(f"{source}: test images {x.shape} do not fit the model's input {tuple(input_shape)}")
    return x, y, source


def normalize(images: np.ndarray, mean, std) -> np.ndarray:
    """uint8 (N, H, W) -> the network's float32 (N, 1, H, W) input, (x / 255 - mean) / std."""
    x = images.astype(np.float32)[:, None] * np.float32(1 / 255)
    return ((x - np.float32(mean[0])) / np.float32(std[0])).astype(np.float32)


def synthetic_digits(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Seeded MNIST-style 28x28 digits (cnnedge.synth) when no test set is present."""
    from cnnedge.synth import render_digit

    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 10
    return np.stack([render_digit(int(d), "mnist", rng) for d in labels]), labels


def photos(n: int, seed: int = 1) -> tuple[list[np.ndarray], np.ndarray]:
    """Seeded 640x480 phone-photo-like BGR images of pen digits on paper (cnnedge.synth "paper")."""
    import cv2

    from cnnedge.synth import render_digit

    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 10
    return [cv2.resize(render_digit(int(d), "paper", rng), PHOTO_SIZE, interpolation=cv2.INTER_AREA) for d in labels], labels


# --------------------------------------------------------------------------------------- engines


def onnx_engine(path: Path, provider: str, threads: int) -> Engine:
    """An onnxruntime session exactly as predict creates it (cnnedge.runtime.Runtime)."""
    import onnxruntime as ort

    from cnnedge.infer.runtime import Runtime

    rt = Runtime(path, provider, threads)
    dtype = rt.input_dtype

    def run(x: np.ndarray) -> np.ndarray:
        return rt.forward(x.astype(dtype, copy=False))[0]  # as predict runs it (int8: batch slices, see runtime.SLICE)

    return Engine("onnxruntime", rt.provider, rt.info.precision, str(path), path.stat().st_size,
                  f"onnxruntime {ort.__version__}", list(rt.session.get_providers()), run, rt.info)


def opencv_engine(path: Path, threads: int) -> Engine:
    """OpenCV DNN on the CPU exactly as `--runtime opencv` runs it (cnnedge.infer.opencv.OpenCVRuntime)."""
    from cnnedge.infer.opencv import OpenCVRuntime

    rt = OpenCVRuntime(path, "cpu", threads)

    def run(x: np.ndarray) -> np.ndarray:
        return rt.forward(x.astype(rt.input_dtype, copy=False))[0]

    return Engine("opencv", "cpu", rt.info.precision, str(path), path.stat().st_size, rt.version, None, run, rt.info)


def torch_engine(checkpoint: Path, provider: str, threads: int) -> Engine:
    """The checkpoint in PyTorch eager mode (inference_mode), on the CPU or the CUDA device."""
    import torch

    from cnnedge.train.checkpoint import load_checkpoint, model_from_checkpoint

    if provider not in ("cpu", "cuda"):
        raise CnnedgeError(f"PyTorch has no {provider} provider")
    if provider == "cuda" and not torch.cuda.is_available():
        raise CnnedgeError("torch cannot use CUDA here (torch.cuda.is_available() is False)")
    torch.set_num_threads(threads)
    device = torch.device(provider)
    model = model_from_checkpoint(load_checkpoint(checkpoint), checkpoint).to(device).eval()

    @torch.inference_mode()
    def run(x: np.ndarray) -> np.ndarray:
        return model(torch.from_numpy(x).to(device)).cpu().numpy()

    return Engine("torch", provider, "fp32", str(checkpoint), checkpoint.stat().st_size,
                  f"torch {torch.__version__} eager, {_threads(torch.get_num_threads())}", None, run)


def checkpoint_path(cfg: BenchConfig) -> tuple[Path | None, str | None]:
    """(the checkpoint to benchmark in PyTorch, or None with the reason)."""
    if cfg.checkpoint is None and not Path(DEFAULT_CHECKPOINT).is_file():
        return None, f"no PyTorch rows: {DEFAULT_CHECKPOINT} not found (pass --checkpoint)"
    path = Path(cfg.checkpoint or DEFAULT_CHECKPOINT)
    if not path.is_file():
        raise CnnedgeError(f"--checkpoint {path}: no such checkpoint file")
    try:
        import torch  # noqa: F401
    except ImportError:
        return None, "no PyTorch rows: torch is not installed (onnxruntime only), so speed-ups are null"
    return path, None


def selected_runtimes(cfg: BenchConfig, notes: list[str]) -> tuple[str, ...]:
    """--runtimes, or every installed runtime; onnxruntime asked for but missing is the one-line error."""
    from cnnedge.infer.runtime import default_runtime, import_onnxruntime

    if cfg.runtimes is None:
        if default_runtime() == "opencv":
            notes.append("no onnxruntime rows: onnxruntime is not installed")
            return ("opencv",)
        return RUNTIME_ORDER
    if "onnxruntime" in cfg.runtimes:
        import_onnxruntime()
    return tuple(r for r in RUNTIME_ORDER if r in cfg.runtimes)


def runtime_engines(runtime: str, provider: str, variants: dict[str, Path], threads: int, notes: list[str]) -> list[Engine]:
    """The fp32 model and its variants in one runtime; CnnedgeError when the fp32 model does not load
    (a variant that does not is a note)."""
    engines = []
    for precision, path in variants.items():
        try:
            engine = onnx_engine(path, provider, threads) if runtime == "onnxruntime" else opencv_engine(path, threads)
        except CnnedgeError as e:
            if precision == "fp32":
                raise
            notes.append(f"no {runtime} {precision} {provider} rows: {e}")
            continue
        if engine.precision != precision:
            notes.append(f"{path}: its metadata says precision {engine.precision}; its rows are named so")
        engines.append(engine)
    return engines


def make_engines(cfg: BenchConfig, threads: int, notes: list[str]) -> list[Engine]:
    """Every engine that really loads, in table order (per provider: torch, then each runtime's fp32, fp16,
    int8; OpenCV on the CPU only)."""
    model = Path(cfg.model) if cfg.model else default_model()
    if not model.is_file():  # before anything slow
        raise CnnedgeError(f"{model}: no such model file (export one with `cnnedge export`)")
    variants = variant_paths(model)
    for precision, path in list(variants.items())[1:]:
        if not path.is_file():
            notes.append(f"no {precision} rows: {path} not found (cnnedge export --quantize {precision})")
            del variants[precision]
    runtimes = selected_runtimes(cfg, notes)
    checkpoint, why = checkpoint_path(cfg)
    if why:
        notes.append(why)

    auto = cfg.providers == ("auto",)
    engines: list[Engine] = []
    failed = []
    for provider in ("cpu", "cuda") if auto else cfg.providers:
        group, errors = [], {}
        for runtime in runtimes:
            if runtime == "opencv" and provider != "cpu":
                continue
            try:
                group += runtime_engines(runtime, provider, variants, threads, notes)
            except CnnedgeError as e:
                errors[runtime] = e
        if not group and provider == "cpu" and errors:  # the model itself is unusable
            raise next(iter(errors.values()))
        if checkpoint is not None and (group or not auto):  # PyTorch's rows even where onnxruntime has no such provider
            try:
                group.insert(0, torch_engine(checkpoint, provider, threads))
            except CnnedgeError as e:
                errors["PyTorch"] = e
        if not group:
            why = next(iter(errors.values()), "OpenCV DNN runs on the CPU only")
            if errors or not auto:
                failed.append(f"{provider}: {why}")
            continue
        notes += [f"no {runtime} {provider} rows: {e}" for runtime, e in errors.items()]
        engines += group
    if not any(e.info is not None for e in engines):  # PyTorch rows alone: nothing to compare them with
        raise CnnedgeError("no requested provider can run the model in onnxruntime or OpenCV: " + "; ".join(failed))
    notes += [f"no rows for provider {f}" for f in failed]
    info = next(e.info for e in engines if e.info is not None)
    if checkpoint is not None and info.checkpoint_sha256 and info.checkpoint_sha256 != file_sha256(checkpoint):
        notes.append(f"{checkpoint} is not the checkpoint {model} was exported from (sha256 differs): "
                     "the PyTorch rows run a different network")
    return engines


# ----------------------------------------------------------------------------------------- timing


def time_calls(fn: Callable[[], object], warmup: int, repeat: int, min_time: float) -> np.ndarray:
    """Seconds per call: `warmup` untimed calls, then at least `repeat` calls and `min_time` seconds."""
    for _ in range(warmup):
        fn()
    times = []
    start = time.perf_counter()
    while len(times) < repeat or time.perf_counter() - start < min_time:
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return np.asarray(times)


def time_in_turns(fns: list[Callable[[], object]], warmup: int, repeat: int, min_time: float) -> list[np.ndarray]:
    """Seconds per call of each function, timed in rounds that take turns (each function runs for a tenth
    of `min_time`, at least one call, then the next), until every one has at least `repeat` calls and
    `min_time` seconds. A machine that gets busier or quieter during the run then affects all alike, so
    the ratios between them hold even where the absolute figures do not."""
    for fn in fns:
        for _ in range(warmup):
            fn()
    times: list[list[float]] = [[] for _ in fns]
    while any(len(t) < repeat or sum(t) < min_time for t in times):
        for fn, t in zip(fns, times):
            start = time.perf_counter()
            while True:
                t0 = time.perf_counter()
                fn()
                t.append(time.perf_counter() - t0)
                if t0 + t[-1] - start >= min_time / 10:
                    break
    return [np.asarray(t) for t in times]


def make_row(engine: Engine, batch: int, times: np.ndarray) -> dict:
    p50, p99 = np.percentile(times, 50), np.percentile(times, 99)
    return {
        "runtime": engine.runtime, "provider": engine.provider, "precision": engine.precision, "batch": batch,
        "latency_ms_p50": float(1e3 * p50), "latency_ms_p99": float(1e3 * p99),
        "images_per_second": float(batch / p50), "accuracy": None, "size_bytes": engine.size_bytes,
        "speedup_vs_torch": None, "speedup_vs_fp32": None, "speedup_vs_onnxruntime": None, "gflops": None, "calls": len(times),
        "file": engine.file, "engine": engine.version, "session_providers": engine.session_providers,
    }


def accuracy(engine: Engine, x: np.ndarray, y: np.ndarray) -> float:
    """Top-1 accuracy of this engine's own logits on the (normalized) test images."""
    predictions = np.concatenate([engine.run(x[i: i + ACCURACY_BATCH]).argmax(1) for i in range(0, len(x), ACCURACY_BATCH)])
    return float((predictions == y).mean())


def find_row(rows: list[dict], runtime: str, precision: str, provider: str, batch: int) -> dict | None:
    key = (runtime, precision, provider, batch)
    return next((r for r in rows if (r["runtime"], r["precision"], r["provider"], r["batch"]) == key), None)


def add_ratios(rows: list[dict], macs: int | None) -> None:
    """speedup_vs_torch (vs the PyTorch row of the same provider and batch), speedup_vs_fp32 (vs the same
    runtime's fp32 row), speedup_vs_onnxruntime (OpenCV rows: vs onnxruntime at the same precision) and
    achieved GFLOP/s, all from the measured images/s of the rows themselves."""
    for r in rows:
        torch_row = find_row(rows, "torch", "fp32", r["provider"], r["batch"])
        fp32_row = find_row(rows, r["runtime"], "fp32", r["provider"], r["batch"])
        ort_row = find_row(rows, "onnxruntime", r["precision"], r["provider"], r["batch"])
        if torch_row is not None:
            r["speedup_vs_torch"] = r["images_per_second"] / torch_row["images_per_second"]
        if fp32_row is not None and r["runtime"] != "torch":
            r["speedup_vs_fp32"] = r["images_per_second"] / fp32_row["images_per_second"]
        if ort_row is not None and r["runtime"] == "opencv":
            r["speedup_vs_onnxruntime"] = r["images_per_second"] / ort_row["images_per_second"]
        if macs:
            r["gflops"] = 2 * macs * r["images_per_second"] / 1e9


# -------------------------------------------------------------------------------------- the limits


def count_macs(path: Path) -> int | None:
    """Multiply-accumulates per image of the Conv, Gemm and MatMul nodes, from ONNX shape inference.
    None without the `onnx` package or when a shape is not known."""
    try:
        import onnx
    except ImportError:
        return None
    model = onnx.shape_inference.infer_shapes(onnx.load(str(path)))
    g = model.graph
    shapes: dict[str, list] = {t.name: list(t.dims) for t in g.initializer}
    for vi in (*g.input, *g.value_info, *g.output):
        shapes[vi.name] = [d.dim_value if d.HasField("dim_value") else None for d in vi.type.tensor_type.shape.dim]
    macs = 0
    for node in g.node:
        if node.op_type not in ("Conv", "Gemm", "MatMul"):
            continue
        out, w = shapes.get(node.output[0]), shapes.get(node.input[1])
        if not out or not w or None in out[1:] or None in w:
            return None
        if node.op_type == "Conv":
            per_output = math.prod(w[1:])  # (C / group) x kH x kW
        elif node.op_type == "Gemm":
            trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
            per_output = w[1] if trans_b else w[0]
        else:
            per_output = w[-2]
        macs += math.prod(out[1:]) * per_output
    return macs


def matmul_peak(threads: int, n: int = MATMUL_SIZE, runs: int = 20) -> float | None:
    """GFLOP/s of a float32 n x n matrix product in onnxruntime's CPU provider (MLAS, the library the
    onnxruntime rows run on) with the rows' thread count: the practical ceiling for dense float32
    arithmetic here. The best of a few runs: a ceiling, not a typical case. None without `onnx` or
    onnxruntime."""
    try:
        import onnxruntime as ort
        from onnx import TensorProto, helper, numpy_helper
    except ImportError:
        return None

    rng = np.random.default_rng(0)
    b = numpy_helper.from_array(rng.standard_normal((n, n), np.float32), "b")
    graph = helper.make_graph([helper.make_node("MatMul", ["a", "b"], ["y"])], "matmul",
                              [helper.make_tensor_value_info("a", TensorProto.FLOAT, [n, n])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [n, n])], [b])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    a = rng.standard_normal((n, n), np.float32)
    times = time_calls(lambda: session.run(["y"], {"a": a}), 2, runs, 0)
    return 2 * n**3 / float(times.min()) / 1e9


def cuda_matmul_peak(n: int = 8192) -> float | None:
    """The same on the CUDA device through torch (float32, TF32 off), when torch has CUDA."""
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    torch.backends.cuda.matmul.allow_tf32 = False
    a, b = torch.randn(n, n, device="cuda"), torch.randn(n, n, device="cuda")

    def product():
        a @ b
        torch.cuda.synchronize()

    times = time_calls(product, 2, 10, 0)
    return 2 * n**3 / float(times.min()) / 1e9


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    return {"cpu": cpu, "cores": os.cpu_count(), "load_average": load, "free_cores": round(free_cores(), 2),
            "platform": platform.platform(),
            "python": platform.python_version()}


# ---------------------------------------------------------------------------- preprocessing, predict


def _rate(seconds: np.ndarray, n: int) -> float:
    return n / float(np.median(seconds))


def bench_preprocess(predictor, images: list[np.ndarray], what: str, repeat: int) -> list[dict]:
    """images/s of `Predictor.preprocess` on decoded images: in one thread, and over predict's own
    thread pool (chunks of 32, as predict submits them)."""
    from cnnedge.errors import ImageError

    def one(image):
        try:
            predictor.preprocess(image)
        except ImageError:
            pass  # counted all the same: the work was done

    def chunk(items):
        for image in items:
            one(image)

    chunks = [images[i: i + 32] for i in range(0, len(images), 32)]
    list(predictor.pool.map(chunk, [images[:8]] * predictor.workers))  # warm-up: threads and caches
    single = time_calls(lambda: chunk(images), 0, repeat, 0)
    pooled = time_calls(lambda: list(predictor.pool.map(chunk, chunks)), 0, repeat, 0)
    return [{"input": what, "images": len(images), "threads": 1, "images_per_second": _rate(single, len(images))},
            {"input": what, "images": len(images), "threads": predictor.workers, "images_per_second": _rate(pooled, len(images))}]


def write_folder(folder: Path, images: list[np.ndarray], labels, class_names: list[str], ext: str) -> list[str]:
    """Scratch image files, in class folders when the labels are class names (so accuracy is known).
    They live in a temporary folder that is deleted afterwards, so plain writes are enough."""
    import cv2

    paths = []
    for i, (image, label) in enumerate(zip(images, labels)):
        named = str(label) in class_names and "/" not in str(label) and not str(label).startswith(".")
        sub = folder / str(label) if named else folder
        sub.mkdir(parents=True, exist_ok=True)
        ok, data = cv2.imencode(ext, image, [cv2.IMWRITE_JPEG_QUALITY, 90] if ext == ".jpg" else [])
        if not ok:
            raise CnnedgeError(f"OpenCV cannot encode {ext} here")
        path = sub / f"{i:05d}{ext}"
        path.write_bytes(data.tobytes())
        paths.append(str(path))
    return paths


def bench_predict(predictor, paths: list[str], what: str, repeat: int) -> dict:
    """images/s of Predictor.predict_iter on files (read, decode, preprocess, the network, top-k)."""
    list(predictor.predict_iter(paths[:256]))  # warm-up: pool threads, session, page cache
    results = []

    def run():
        results[:] = list(predictor.predict_iter(paths))

    seconds = time_calls(run, 0, repeat, 0)
    labelled = [p for p in results if p.truth is not None]
    acc = float(np.mean([p.label == p.truth for p in labelled])) if labelled else None
    return {"input": what, "images": len(paths), "errors": sum(p.error is not None for p in results),
            "runtime": predictor.runtime.name, "provider": predictor.provider, "batch": predictor.batch_size, "workers": predictor.workers,
            "images_per_second": _rate(seconds, len(paths)), "accuracy": acc}


# ---------------------------------------------------------------------------------------------- run


@dataclass
class Inputs:
    """The images every engine sees, so that rows differ only in the engine."""

    timing: np.ndarray  # normalized (max batch, C, H, W): the latency and throughput batches
    test: np.ndarray | None  # normalized test set, for accuracy
    test_labels: np.ndarray | None
    test_source: str  # what the test set is, or why there is none
    crops: list[np.ndarray]  # uint8 (H, W) images for the preprocessing and end-to-end runs
    crop_labels: list[str | None]  # their class names where known


def make_inputs(info, cfg: BenchConfig, notes: list[str]) -> Inputs:
    """The test set when present (read with numpy), else seeded synthetic MNIST-style digits."""
    test_x, test_y, source = load_test_set(info.dataset, info.input_shape, cfg.data_dir, cfg.test_images)
    if test_x is None:
        notes.append(source)
    channels, height, width = info.input_shape
    need = max(max(cfg.batch_sizes), cfg.images)
    if test_x is not None and len(test_x) >= need:
        images, labels = test_x, [info.class_names[int(y)] for y in test_y[: cfg.images]]
    elif (height, width) == (28, 28):
        images, digits = synthetic_digits(need)
        labels = [str(d) for d in digits[: cfg.images]]  # a class folder only where the classes are digits
    else:  # no images of this size at hand: random pixels still time the network and the pipeline
        images, labels = np.random.default_rng(0).integers(0, 256, (need, height, width), dtype=np.uint8), [None] * cfg.images

    def network_input(x: np.ndarray) -> np.ndarray:
        x = normalize(x, info.mean, info.std)
        return np.repeat(x, channels, axis=1) if channels != 1 else x

    return Inputs(network_input(images[: max(cfg.batch_sizes)]), None if test_x is None else network_input(test_x),
                  test_y, source, list(images[: cfg.images]), labels)


def bench_inference(engines: list[Engine], inputs: Inputs, cfg: BenchConfig, progress) -> list[dict]:
    """One row per engine and batch size, sorted by provider, batch, then engine."""
    accuracies = {}
    for engine in engines:
        if inputs.test is not None:
            progress(f"{engine.runtime} {engine.provider} {engine.precision}: accuracy on {inputs.test_source}")
            accuracies[id(engine)] = accuracy(engine, inputs.test, inputs.test_labels)
    rows = []
    for batch in sorted(cfg.batch_sizes):
        progress(f"batch {batch}: {len(engines)} engines in turns")
        x = inputs.timing[:batch]
        all_times = time_in_turns([lambda e=e, x=x: e.run(x) for e in engines], cfg.warmup, cfg.repeat, cfg.min_time)
        rows += [{**make_row(e, batch, t), "accuracy": accuracies.get(id(e))} for e, t in zip(engines, all_times)]
    order = {(e.runtime, e.provider, e.precision): i for i, e in enumerate(engines)}
    rows.sort(key=lambda r: (r["provider"] != "cpu", r["provider"], r["batch"], order[(r["runtime"], r["provider"], r["precision"])]))
    return rows


def bench_files(model: str, provider: str, threads: int, inputs: Inputs, cfg: BenchConfig, progress,
                runtimes: list[str]) -> tuple[list, list]:
    """Preprocessing rows (the first runtime's Predictor: preprocessing is the same in all), and end-to-end
    predict rows per runtime, on the crops and on generated photos."""
    from cnnedge.infer.predictor import Predictor

    preprocess_rows, predict_rows = [], []
    repeat = max(1, min(3, cfg.repeat))
    with contextlib.ExitStack() as stack:
        predictors = [stack.enter_context(Predictor(model, provider if rt == "onnxruntime" else "cpu", threads=threads,
                                                    runtime=rt)) for rt in runtimes]
        first, names = predictors[0], predictors[0].class_names
        tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="cnnedge-bench-"))
        if inputs.crops:
            progress("preprocessing and predict: crops")
            h, w = inputs.crops[0].shape
            preprocess_rows += bench_preprocess(first, inputs.crops, f"{len(inputs.crops):,} {w}x{h} crops", repeat)
            paths = write_folder(Path(tmp) / "crops", inputs.crops, inputs.crop_labels, names, ".png")
            predict_rows += [bench_predict(p, paths, f"{len(paths):,} {w}x{h} PNG files", repeat) for p in predictors]
        if cfg.photos:
            progress("preprocessing and predict: generating photos")
            images, digits = photos(cfg.photos)
            w, h = PHOTO_SIZE
            preprocess_rows += bench_preprocess(first, images, f"{len(images):,} {w}x{h} photos", repeat)
            paths = write_folder(Path(tmp) / "photos", images, [str(d) for d in digits], names, ".jpg")
            predict_rows += [bench_predict(p, paths, f"{len(paths):,} {w}x{h} JPEG photos", repeat) for p in predictors]
    return preprocess_rows, predict_rows


def run(cfg: BenchConfig, progress: Callable[[str], None] = lambda message: None) -> dict:
    """Measure everything; returns the JSON document (see the README for its fields)."""
    import cv2

    from cnnedge import __version__

    check_config(cfg)
    threads = thread_count(cfg.threads)
    notes: list[str] = []
    host = machine()  # the load average before we add to it
    progress("loading models")
    engines = make_engines(cfg, threads, notes)
    fp32 = next(e for e in engines if e.info is not None)  # the fp32 model in the first runtime
    info = fp32.info
    ort_engine = next((e for e in engines if e.runtime == "onnxruntime"), None)
    inputs = make_inputs(info, cfg, notes)

    rows = bench_inference(engines, inputs, cfg, progress)
    macs = count_macs(Path(fp32.file))
    if macs is None:
        notes.append("MACs unknown (install the onnx package to count them): no GFLOP/s")
    add_ratios(rows, macs)
    progress("matrix-multiply peak")
    peaks = {"cpu": matmul_peak(threads)}
    if any(r["provider"] == "cuda" for r in rows):
        peaks["cuda"] = cuda_matmul_peak()
    for r in rows:
        peak = peaks.get(r["provider"])
        r["peak_fraction"] = r["gflops"] / peak if r["gflops"] is not None and peak else None

    preprocess_rows, predict_rows = [], []
    if inputs.crops or cfg.photos:  # on the first provider: cpu whenever it was asked for
        runtimes = list(dict.fromkeys(e.runtime for e in engines if e.file == fp32.file and e.provider == fp32.provider))
        preprocess_rows, predict_rows = bench_files(fp32.file, fp32.provider, threads, inputs, cfg, progress, runtimes)

    torch_used = next((e for e in engines if e.runtime == "torch"), None)
    return {
        "command": None,  # the CLI fills it in
        "machine": host,
        "versions": {"cnnedge": __version__, "onnxruntime": ort_engine.version.split()[1] if ort_engine else None,
                     "opencv": cv2.__version__, "numpy": np.__version__,
                     "torch": torch_used.version.split()[1] if torch_used else None},
        "threads": {"onnxruntime_intra_op": threads, "onnxruntime_inter_op": 1, "opencv": cv2.getNumThreads(),
                    "onnxruntime_int8_slices": threads,  # int8 on the CPU: slices of 1 thread (runtime.SLICE)
                    "torch": threads if torch_used else None,
                    "preprocess_workers": predict_rows[0]["workers"] if predict_rows else None,
                    # OpenMP's waiting threads spin by default: on a busy machine that can cost torch 100x
                    "environment": {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY")}},
        "timing": {"warmup_calls": cfg.warmup, "min_calls": cfg.repeat, "min_seconds": cfg.min_time,
                   "order": "engines take turns, min_seconds / 10 each, per batch size",
                   "latency": "one call: a normalized float32 numpy batch in, logits out",
                   "images_per_second": "batch / p50 latency"},
        "model": {"path": fp32.file, "arch": info.arch, "dataset": info.dataset, "macs_per_image": macs,
                  "accuracy_on": inputs.test_source if inputs.test is not None else None},
        "peak_gflops": {"cpu": peaks["cpu"], "cpu_method": f"onnxruntime float32 {MATMUL_SIZE}x{MATMUL_SIZE} MatMul, "
                                                          f"{_threads(threads)}, best of 20",
                        **({"cuda": peaks["cuda"], "cuda_method": "torch float32 8192x8192 matmul (TF32 off), best of 10"}
                           if "cuda" in peaks else {})},
        "rows": rows,
        "preprocess": preprocess_rows,
        "predict": predict_rows,
        "notes": notes,
    }


# ------------------------------------------------------------------------------------------ output


def _fmt(value, spec: str, none: str = "-") -> str:
    return none if value is None else format(value, spec)


def _threads(n: int) -> str:
    return f"{n} thread" + ("" if n == 1 else "s")


def _pct(value) -> str:
    return "-" if value is None else f"{100 * value:.2f}%"


def header_lines(doc: dict) -> list[str]:
    m, t, model, peak = doc["machine"], doc["threads"], doc["model"], doc["peak_gflops"]
    load = f", load average {m['load_average'][0]:.2f} at start" if m.get("load_average") else ""
    load += f", {m['free_cores']:.2f} left free by other processes" if m.get("free_cores") is not None else ""
    macs = f"{model['macs_per_image']:,} MACs/image" if model["macs_per_image"] else "MACs unknown"
    env = ", ".join(f"{k}={v}" for k, v in t["environment"].items() if v)
    torch_part = f"torch {doc['versions']['torch']} {_threads(t['torch'])}" if t["torch"] else "no torch"
    torch_part += f" ({env})" if env else ""
    slices = t.get("onnxruntime_int8_slices") or 1
    int8 = f", int8 cpu: {slices} batch slices of 1 thread" if slices > 1 else ""
    ort_part = (f"onnxruntime {doc['versions']['onnxruntime']} intra-op {t['onnxruntime_intra_op']} (inter-op 1, sequential{int8})"
                if doc["versions"]["onnxruntime"] else "no onnxruntime")
    lines = [
        f"model: {model['path']} ({model['arch']}, {macs}); accuracy: {model['accuracy_on'] or 'not measured'}, each row on its own runtime",
        f"machine: {m['cpu']}, {m['cores']} cores{load}",
        f"threads: {ort_part}; OpenCV {doc['versions']['opencv']} {_threads(t['opencv'])}; "
        f"{torch_part}; preprocessing pool {t['preprocess_workers'] or '-'} workers",
        (f"peak: {peak['cpu']:,.1f} GFLOP/s ({peak['cpu_method']})" if peak["cpu"] else "peak: not measured (needs onnx and onnxruntime)")
        + (f"; cuda {peak['cuda']:,.1f} GFLOP/s ({peak['cuda_method']})" if peak.get("cuda") else "")
        + "; GFLOP/s = 2 x MACs x images/s (int8 rows: integer operations, against the same float32 peak)",
        f"timing: {doc['timing']['warmup_calls']} warm-up calls, then >= {doc['timing']['min_calls']} calls and "
        f">= {doc['timing']['min_seconds']:g} s per row, engines taking turns; latency = {doc['timing']['latency']}; "
        "images/s = batch / p50",
    ]
    return lines


ROW_COLUMNS = ("runtime", "provider", "precision", "batch", "p50 ms", "p99 ms", "images/s", "vs torch", "vs fp32",
               "vs onnxruntime", "GFLOP/s", "of peak", "accuracy", "size")


def _ratio(value) -> str:
    return _fmt(value, ".2f") + ("x" if value else "")


def row_cells(r: dict) -> list[str]:
    from cnnedge.report import fmt_bytes

    return [r["runtime"], r["provider"], r["precision"], str(r["batch"]), f"{r['latency_ms_p50']:.3f}",
            f"{r['latency_ms_p99']:.3f}", f"{r['images_per_second']:,.0f}", _ratio(r["speedup_vs_torch"]),
            _ratio(r["speedup_vs_fp32"]), _ratio(r.get("speedup_vs_onnxruntime")), _fmt(r["gflops"], ",.1f"),
            _pct(r["peak_fraction"]) if r.get("peak_fraction") is not None else "-", _pct(r["accuracy"]), fmt_bytes(r["size_bytes"])]


def summary_lines(doc: dict) -> list[str]:
    """The comparisons users choose by, recomputed from the rows."""
    rows = doc["rows"]
    out = []
    for provider in dict.fromkeys(r["provider"] for r in rows):
        batches = sorted({r["batch"] for r in rows if r["provider"] == provider})
        big, small = batches[-1], batches[0]
        t_big, t_small = find_row(rows, "torch", "fp32", provider, big), find_row(rows, "torch", "fp32", provider, small)
        f_big, f_small = find_row(rows, "onnxruntime", "fp32", provider, big), find_row(rows, "onnxruntime", "fp32", provider, small)
        if t_big and f_big:
            out.append(f"{provider}: onnxruntime fp32 vs PyTorch eager: {f_big['images_per_second'] / t_big['images_per_second']:.2f}x "
                       f"throughput at batch {big}, {t_small['latency_ms_p50'] / f_small['latency_ms_p50']:.2f}x lower p50 latency at batch {small}")
        for precision in ("fp16", "int8"):
            v = find_row(rows, "onnxruntime", precision, provider, big)
            if v and f_big:
                delta = "" if v["accuracy"] is None or f_big["accuracy"] is None else f", accuracy {100 * (v['accuracy'] - f_big['accuracy']):+.2f} points"
                out.append(f"{provider}: {precision} vs fp32: {v['images_per_second'] / f_big['images_per_second']:.2f}x throughput at batch {big}{delta}")
        ratios = [f"{p} {r['speedup_vs_onnxruntime']:.2f}x" for p in PRECISION_ORDER
                  if (r := find_row(rows, "opencv", p, provider, big)) and r["speedup_vs_onnxruntime"]]
        o_small = find_row(rows, "opencv", "fp32", provider, small)
        if ratios and o_small and f_small:
            out.append(f"{provider}: OpenCV DNN vs onnxruntime: {', '.join(ratios)} throughput at batch {big}; fp32 p50 "
                       f"latency at batch {small} {o_small['latency_ms_p50']:.3f} ms vs {f_small['latency_ms_p50']:.3f} ms")
    return out


def render_table(doc: dict) -> None:
    from rich.markup import escape
    from rich.table import Table

    from cnnedge.report import console

    for line in header_lines(doc):
        console.print(line, markup=False, soft_wrap=True)
    table = Table(title="inference (network only)", title_justify="left")
    for col in ROW_COLUMNS:
        table.add_column(col, justify="left" if col in ("runtime", "provider", "precision") else "right")
    previous = None
    for r in doc["rows"]:
        if previous is not None and (r["provider"], r["batch"]) != previous:
            table.add_section()
        previous = (r["provider"], r["batch"])
        table.add_row(*(escape(c) for c in row_cells(r)))
    console.print(table)
    if doc["preprocess"]:
        t = Table(title="preprocessing: decoded image -> network input", title_justify="left", min_width=60)
        for col in ("input", "threads", "images/s"):
            t.add_column(col, justify="left" if col == "input" else "right")
        for p in doc["preprocess"]:
            t.add_row(escape(p["input"]), str(p["threads"]), f"{p['images_per_second']:,.0f}")
        console.print(t)
    if doc["predict"]:
        t = Table(title="end to end: Predictor on files (read, decode, preprocess, infer)", title_justify="left", min_width=60)
        for col in ("input", "runtime", "provider", "workers", "batch", "images/s", "accuracy"):
            t.add_column(col, justify="left" if col in ("input", "runtime", "provider") else "right")
        for p in doc["predict"]:
            t.add_row(escape(p["input"]), p["runtime"], p["provider"], str(p["workers"]), str(p["batch"]),
                      f"{p['images_per_second']:,.0f}", _pct(p["accuracy"]))
        console.print(t)
    for line in summary_lines(doc):
        console.print(line, markup=False, soft_wrap=True)


def render_markdown(doc: dict) -> str:
    lines = [f"- {line}" for line in header_lines(doc)] + [""]
    lines += ["| " + " | ".join(ROW_COLUMNS) + " |", "|" + "|".join(" --- " if c in ("runtime", "provider", "precision") else " ---: " for c in ROW_COLUMNS) + "|"]
    lines += ["| " + " | ".join(row_cells(r)) + " |" for r in doc["rows"]]
    if doc["preprocess"]:
        lines += ["", "| preprocessing | threads | images/s |", "| --- | ---: | ---: |"]
        lines += [f"| {p['input']} | {p['threads']} | {p['images_per_second']:,.0f} |" for p in doc["preprocess"]]
    if doc["predict"]:
        lines += ["", "| end to end (`Predictor`) | runtime | provider | workers | images/s | accuracy |",
                  "| --- | --- | --- | ---: | ---: | ---: |"]
        lines += [f"| {p['input']} | {p['runtime']} | {p['provider']} | {p['workers']} | {p['images_per_second']:,.0f} | "
                  f"{_pct(p['accuracy'])} |" for p in doc["predict"]]
    summary = summary_lines(doc)
    if summary:
        lines += [""] + [f"- {line}" for line in summary]
    return "\n".join(lines) + "\n"


def main(cfg: BenchConfig, fmt: str = "table") -> int:
    """The `cnnedge bench` command."""
    from cnnedge.report import err_console, to_json

    if err_console.is_terminal:  # a minute of measuring: say what is running
        with err_console.status("bench") as status:
            doc = run(cfg, lambda message: status.update(f"bench: {message}"))
    else:
        doc = run(cfg)
    doc["command"] = "cnnedge " + shlex.join(sys.argv[1:])
    if fmt == "json":
        sys.stdout.write(to_json(doc) + "\n")
    elif fmt == "markdown":
        sys.stdout.write(render_markdown(doc))
    else:
        render_table(doc)
    sys.stdout.flush()
    for note in doc["notes"]:  # after the results, so they are not lost above a long table
        err_console.print(f"note: {note}", markup=False, soft_wrap=True)
    return 0
