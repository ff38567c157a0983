"""Which int8 recipe is fastest in onnxruntime on this CPU, at what accuracy, and why.

    CNNEDGE_DATA=../shared/data uv run python benchmarks/bench_int8.py [--threads 1 2]

Quantizes export/cnn.onnx (the shipped fp32 model) with onnxruntime's static QDQ quantization,
calibrated on the same 1,000 training images as `cnnedge export`, in these recipes:

- s8s8: int8 activations, int8 per-channel weights (what export shipped first);
- u8s8 all layers: uint8 activations, int8 weights (export's second recipe), with and without
  onnxruntime's QDQPropagationTransformer;
- u8s8 first block fp32 (export): the same with conv1, relu1 and pool1 left in fp32 -
  `cnnedge.export.quantize_int8` itself - in a plain session and as cnnedge's Runtime runs it (with
  runtime.DISABLED_OPTIMIZERS, i.e. without the QDQPropagationTransformer).

And fp32 against the exported int8 at each graph optimization level (basic, extended, all).

For each: test accuracy, the operators onnxruntime really runs after its graph optimizations (an fp32
Conv or Gemm left in an int8 model is a fusion that did not happen), throughput at batch 256 (median over
interleaved rounds, so a busy machine hurts all recipes alike), batch-1 p50 latency, and the three
nodes that take the most time in onnxruntime's profiler.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
import tempfile
import time
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cnnedge.train.checkpoint import load_checkpoint  # noqa: E402
from cnnedge.train.export import ExportConfig, _Calibration, load_images, quantize_int8  # noqa: E402
from cnnedge.infer.runtime import DISABLED_OPTIMIZERS  # noqa: E402
from cnnedge.infer.modelinfo import default_model  # noqa: E402

FP32_OPS = ("Conv", "FusedConv", "Gemm", "FusedGemm", "MatMul")
PROPAGATION = "QDQPropagationTransformer"


def quantize(fp32: onnx.ModelProto, calibration: np.ndarray, activations) -> onnx.ModelProto:
    """export.quantize_int8's steps, every layer quantized, with the given activation type."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quant_pre_process, quantize_static

    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        src, pre, out = (Path(tmp) / n for n in ("fp32.onnx", "pre.onnx", "int8.onnx"))
        onnx.save(fp32, src)
        quant_pre_process(src, pre, skip_symbolic_shape=True)
        quantize_static(pre, out, _Calibration(calibration), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=activations, weight_type=QuantType.QInt8,
                        calibrate_method=CalibrationMethod.MinMax)
        return onnx.load(out)


def session(model: bytes, threads: int, disabled=(), optimized: str | None = None, profile: str | None = None,
            level=ort.GraphOptimizationLevel.ORT_ENABLE_ALL):
    options = ort.SessionOptions()
    options.graph_optimization_level = level
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    if optimized:
        options.optimized_model_filepath = optimized
    if profile:
        options.enable_profiling = True
        options.profile_file_prefix = profile
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"], disabled_optimizers=list(disabled))


def run_ops(model: bytes, disabled) -> Counter:
    """Operator types onnxruntime runs after its optimizations (saved at the extended level, where the
    QDQ fusions are already done and no hardware-specific layout is baked in)."""
    with tempfile.TemporaryDirectory() as tmp:
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        options.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        options.log_severity_level = 3
        ort.InferenceSession(model, options, providers=["CPUExecutionProvider"], disabled_optimizers=list(disabled))
        return Counter(n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node)


def top_nodes(model: bytes, threads: int, disabled, x: np.ndarray, n: int = 3) -> list[str]:
    with tempfile.TemporaryDirectory() as tmp:
        s = session(model, threads, disabled, profile=str(Path(tmp) / "profile"))
        for _ in range(30):
            s.run(["logits"], {"input": x})
        events = json.loads(Path(s.end_profiling()).read_text())
    total: Counter = Counter()
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            total[f"{e['args']['op_name']} {e['name'][:-len('_kernel_time')]}"] += e["dur"]
    whole = sum(total.values())
    return [f"{name} {100 * t / whole:.0f}%" for name, t in total.most_common(n)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(default_model()))
    ap.add_argument("--checkpoint", default=str(ROOT / "models/cnn.pt"))
    ap.add_argument("--threads", type=int, nargs="+", default=[1, os.cpu_count() or 1])
    ap.add_argument("--rounds", type=int, default=15)
    args = ap.parse_args()
    from onnxruntime.quantization import QuantType

    checkpoint = load_checkpoint(args.checkpoint)
    test, train, why = load_images(checkpoint, ExportConfig(checkpoint=args.checkpoint), need_train=True)
    if test is None:
        sys.exit(f"needs the test set: {why}")
    fp32 = onnx.load(args.model)
    del fp32.metadata_props[:]
    u8s8_all = quantize(fp32, train.x, QuantType.QUInt8)
    exported = quantize_int8(fp32, train.x)
    recipes = {
        "fp32": (fp32, ()),
        "s8s8": (quantize(fp32, train.x, QuantType.QInt8), ()),
        "u8s8 all layers": (u8s8_all, ()),
        "u8s8 all layers, no propagation": (u8s8_all, (PROPAGATION,)),
        "export, plain session": (exported, ()),
        "export, cnnedge Runtime": (exported, tuple(DISABLED_OPTIMIZERS)),
    }
    print(f"onnxruntime {ort.__version__}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} "
          f"(other processes slow every recipe down alike: rounds are interleaved)")
    x256, x1 = test.x[:256], test.x[:1]
    for name, (proto, disabled) in recipes.items():
        model = proto.SerializeToString()
        s = session(model, 1, disabled)
        logits = np.concatenate([s.run(["logits"], {"input": test.x[i: i + 500]})[0] for i in range(0, len(test.x), 500)])
        ops = run_ops(model, disabled)
        fp32_ops = {k: v for k, v in ops.items() if k in FP32_OPS}
        quant_ops = {k: v for k, v in ops.items() if k.startswith("Q") and k not in ("QuantizeLinear",)}
        print(f"\n{name}: {len(model):,} bytes, accuracy {100 * (logits.argmax(1) == test.y).mean():.2f}% "
              f"on {len(test.y):,} test images\n  runs {dict(quant_ops) or 'no integer ops'}, fp32 {fp32_ops or 'none'}"
              f"\n  slowest nodes (1 thread, batch 256): {', '.join(top_nodes(model, 1, disabled, x256))}")
    levels = {f"{name}, {level.name}": session(recipes[name][0].SerializeToString(), 1, recipes[name][1], level=level)
              for name in ("fp32", "export, cnnedge Runtime")
              for level in (ort.GraphOptimizationLevel.ORT_ENABLE_BASIC, ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
                            ort.GraphOptimizationLevel.ORT_ENABLE_ALL)}
    print("\ngraph optimization levels, 1 thread, batch 256:")
    rates = {name: [] for name in levels}
    for _ in range(args.rounds):
        for name, s in levels.items():
            t = time.perf_counter()
            for _ in range(5):
                s.run(["logits"], {"input": x256})
            rates[name].append(5 * 256 / (time.perf_counter() - t))
    for name in levels:
        print(f"  {name:40s} {np.median(rates[name]):8,.0f} images/s")
    for threads in args.threads:
        sessions = {name: session(proto.SerializeToString(), threads, disabled) for name, (proto, disabled) in recipes.items()}
        rates = {name: [] for name in sessions}
        latency = {name: [] for name in sessions}
        for s in sessions.values():
            for _ in range(10):
                s.run(["logits"], {"input": x256})
        for _ in range(args.rounds):
            for name, s in sessions.items():
                t = time.perf_counter()
                for _ in range(5):
                    s.run(["logits"], {"input": x256})
                rates[name].append(5 * 256 / (time.perf_counter() - t))
                calls = []
                for _ in range(100):
                    t = time.perf_counter()
                    s.run(["logits"], {"input": x1})
                    calls.append(time.perf_counter() - t)
                latency[name].append(np.median(calls))
        base = np.median(rates["fp32"])
        print(f"\n{threads} intra-op thread(s), median of {args.rounds} interleaved rounds:")
        for name in sessions:
            r = np.median(rates[name])
            print(f"  {name:34s} batch 256: {r:8,.0f} images/s ({r / base:.2f}x fp32)   batch 1 p50: "
                  f"{1e3 * np.median(latency[name]):.3f} ms")


if __name__ == "__main__":
    main()
