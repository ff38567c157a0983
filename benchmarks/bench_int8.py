"""Which int8 recipe and which thread setting are fastest in onnxruntime on this CPU, at what accuracy, and why.

    CNNEDGE_DATA=../shared/data uv run python benchmarks/bench_int8.py [--model export/cnn.onnx] [--threads 1 2]

Quantizes the fp32 model (--model: a current `cnnedge export`; the shipped one until it is re-exported) with
onnxruntime's static QDQ quantization, calibrated on the same 1,000 training images as `cnnedge export`:

- s8s8: int8 activations, int8 per-channel weights (what export shipped first);
- u8s8 all layers: uint8 activations, int8 weights, with and without onnxruntime's QDQPropagationTransformer;
- u8s8 first block fp32 (export): conv1, relu1 and pool1 left in fp32 - `cnnedge.train.export.quantize_int8`
  itself - in a plain session and as cnnedge's Runtime runs it (runtime.DISABLED_OPTIMIZERS);
- per-tensor weights instead of per-channel; fc2, or fc1 and fc2, left in fp32 as well (tried for batch 1);
- session settings tried on the export recipe: QDQ clean-up, denormals as zero, NhwcTransformer off.

For each: test accuracy, the operators onnxruntime really runs after its graph optimizations (an fp32 Conv
or Gemm left in an int8 model is a fusion that did not happen), the CPU time of one thread per call at
batch 1, 64 and 256 (thread CPU time: what other processes on a busy machine do not change), and the
three nodes that take the most time in onnxruntime's profiler.

Then thread settings, wall time, at each --threads count: fp32 and int8 as cnnedge's Runtime runs them
(int8 on the CPU: a batch as `threads` slices of one thread each, runtime.SLICE) against int8 with
`threads` intra-op threads in one call, interleaved in blocks of a quarter second (a thread pool that
spins after its call would otherwise slow the next engine), with the cores other processes left free
during the rounds (cnnedge.threads): figures taken while they were busy say little.
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
from cnnedge.infer.runtime import DISABLED_OPTIMIZERS, Runtime  # noqa: E402
from cnnedge.infer.modelinfo import default_model  # noqa: E402
from cnnedge.train.export import first_block  # noqa: E402
from cnnedge import threads as free  # noqa: E402

FP32_OPS = ("Conv", "FusedConv", "Gemm", "FusedGemm", "MatMul")
PROPAGATION = "QDQPropagationTransformer"


def quantize(fp32: onnx.ModelProto, calibration: np.ndarray, activations, exclude=lambda proto: [],
             per_channel: bool = True) -> onnx.ModelProto:
    """export.quantize_int8's steps with the given activation type, per-channel or per-tensor weights, and the
    nodes `exclude(pre-processed model)` names left in fp32 (every layer quantized by default)."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quant_pre_process, quantize_static

    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        src, pre, out = (Path(tmp) / n for n in ("fp32.onnx", "pre.onnx", "int8.onnx"))
        onnx.save(fp32, src)
        quant_pre_process(src, pre, skip_symbolic_shape=True)
        quantize_static(pre, out, _Calibration(calibration), quant_format=QuantFormat.QDQ, per_channel=per_channel,
                        activation_type=activations, weight_type=QuantType.QInt8,
                        calibrate_method=CalibrationMethod.MinMax, nodes_to_exclude=exclude(onnx.load(pre)),
                        extra_options={"QuantizeBias": False})
        return onnx.load(out)


def session(model: bytes, threads: int, disabled=(), optimized: str | None = None, profile: str | None = None,
            level=ort.GraphOptimizationLevel.ORT_ENABLE_ALL, config: dict | None = None):
    options = ort.SessionOptions()
    for key, value in (config or {}).items():
        options.add_session_config_entry(key, value)
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


def gemms(proto: onnx.ModelProto) -> list[str]:
    return [n.name for n in proto.graph.node if n.op_type == "Gemm"]


def cpu_times(sessions: dict, x_by_batch: dict, rounds: int) -> dict:
    """Median thread CPU time per call (seconds) of each 1-thread session at each batch, interleaved."""
    out = {name: {} for name in sessions}
    for batch, x in x_by_batch.items():
        samples = {name: [] for name in sessions}
        for s in sessions.values():
            for _ in range(5):
                s.run(["logits"], {"input": x})
        for _ in range(rounds):
            for name, s in sessions.items():
                calls = max(3, 1024 // batch)
                t = time.thread_time()
                for _ in range(calls):
                    s.run(["logits"], {"input": x})
                samples[name].append((time.thread_time() - t) / calls)
        for name in sessions:
            out[name][batch] = float(np.median(samples[name]))
    return out


def with_metadata(proto: onnx.ModelProto, props: dict, precision: str, folder: Path) -> Path:
    """A model file that cnnedge's Runtime accepts: the fp32 model's metadata, this precision."""
    model = onnx.ModelProto()
    model.CopyFrom(proto)
    del model.metadata_props[:]
    onnx.helper.set_model_props(model, {**props, "precision": precision})
    path = folder / f"{precision}.onnx"
    onnx.save(model, path)
    return path


def wall_rounds(engines: dict, x_by_batch: dict, rounds: int, block: float = 0.25) -> tuple[dict, dict]:
    """Median wall seconds per call of each engine at each batch (blocks of `block` s, engines in turns), and
    the cores other processes left free during each batch's rounds."""
    out, idle = {name: {} for name in engines}, {}
    for batch, x in x_by_batch.items():
        samples = {name: [] for name in engines}
        for run in engines.values():
            for _ in range(5):
                run(x)
        free.free_cores()
        for _ in range(rounds):
            for name, run in engines.items():
                t, calls = time.perf_counter(), 0
                while time.perf_counter() - t < block:
                    run(x)
                    calls += 1
                samples[name].append((time.perf_counter() - t) / calls)
        idle[batch] = free.free_cores()
        for name in engines:
            out[name][batch] = float(np.median(samples[name]))
    return out, idle


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(default_model()))
    ap.add_argument("--checkpoint", default=str(ROOT / "models/cnn.pt"))
    ap.add_argument("--threads", type=int, nargs="+", default=[1, os.cpu_count() or 1])
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args()
    from onnxruntime.quantization import QuantType

    checkpoint = load_checkpoint(args.checkpoint)
    test, train, why = load_images(checkpoint, ExportConfig(checkpoint=args.checkpoint), need_train=True)
    if test is None:
        sys.exit(f"needs the test set: {why}")
    original = onnx.load(args.model)
    props = {p.key: p.value for p in original.metadata_props}
    fp32 = onnx.load(args.model)
    del fp32.metadata_props[:]
    u8s8_all = quantize(fp32, train.x, QuantType.QUInt8)
    exported = quantize_int8(fp32, train.x)
    runtime = tuple(DISABLED_OPTIMIZERS)
    recipes = {
        "fp32": (fp32, ()),
        "s8s8": (quantize(fp32, train.x, QuantType.QInt8), ()),
        "u8s8 all layers": (u8s8_all, ()),
        "u8s8 all layers, no propagation": (u8s8_all, (PROPAGATION,)),
        "export, plain session": (exported, ()),
        "export, cnnedge Runtime": (exported, runtime),
        "per-tensor weights": (quantize(fp32, train.x, QuantType.QUInt8, first_block, per_channel=False), runtime),
        "first block + fc2 fp32": (quantize(fp32, train.x, QuantType.QUInt8, lambda p: first_block(p) + gemms(p)[-1:]), runtime),
        "first block + fc1, fc2 fp32": (quantize(fp32, train.x, QuantType.QUInt8, lambda p: first_block(p) + gemms(p)), runtime),
    }
    settings = {
        "export + QDQ clean-up": {"session.enable_quant_qdq_cleanup": "1"},
        "export + denormals as zero": {"session.set_denormal_as_zero": "1"},
    }
    print(f"onnxruntime {ort.__version__}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} "
          f"(CPU times of one thread: what other processes on this machine do not change)")
    x_by_batch = {1: test.x[:1], 64: test.x[:64], 256: test.x[:256]}
    sessions = {}
    for name, (proto, disabled) in recipes.items():
        model = proto.SerializeToString()
        s = session(model, 1, disabled)
        logits = np.concatenate([s.run(["logits"], {"input": test.x[i: i + 500]})[0] for i in range(0, len(test.x), 500)])
        ops = run_ops(model, disabled)
        fp32_ops = {k: v for k, v in ops.items() if k in FP32_OPS}
        quant_ops = {k: v for k, v in ops.items() if k.startswith("Q") and k not in ("QuantizeLinear",)}
        print(f"\n{name}: {len(model):,} bytes, accuracy {100 * (logits.argmax(1) == test.y).mean():.2f}% "
              f"on {len(test.y):,} test images\n  runs {dict(quant_ops) or 'no integer ops'}, fp32 {fp32_ops or 'none'}"
              f"\n  slowest nodes (1 thread, batch 256): {', '.join(top_nodes(model, 1, disabled, x_by_batch[256]))}")
        sessions[name] = s
    for name, config in settings.items():
        sessions[name] = session(exported.SerializeToString(), 1, runtime, config=config)
    sessions["export, NhwcTransformer off"] = session(exported.SerializeToString(), 1, (*runtime, "NhwcTransformer"))
    for level in (ort.GraphOptimizationLevel.ORT_ENABLE_BASIC, ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED):
        for name in ("fp32", "export, cnnedge Runtime"):
            sessions[f"{name}, {level.name}"] = session(recipes[name][0].SerializeToString(), 1, recipes[name][1], level=level)
    times = cpu_times(sessions, x_by_batch, args.rounds)
    print("\nthread CPU time per call, 1 thread (median of interleaved rounds), and speed against fp32:")
    print(f"  {'':44s}" + "".join(f"{'batch ' + str(b):>22s}" for b in x_by_batch))
    for name, by_batch in times.items():
        cells = "".join(f"{1e3 * t:10.4f} ms {times['fp32'][b] / t:5.2f}x  " for b, t in by_batch.items())
        print(f"  {name:44s}{cells}")

    with tempfile.TemporaryDirectory() as tmp:
        fp32_path = with_metadata(fp32, props, "fp32", Path(tmp))
        int8_path = with_metadata(exported, props, "int8", Path(tmp))
        for threads in args.threads:
            engines = {}
            for name, path in (("fp32, cnnedge Runtime", fp32_path), ("int8, cnnedge Runtime", int8_path)):
                rt = Runtime(path, "cpu", threads)
                engines[f"{name} ({f'{rt.slices} slices' if rt.slices > 1 else f'intra-op {threads}'})"] = \
                    lambda x, rt=rt: rt.forward(x)
            plain = session(exported.SerializeToString(), threads, runtime)
            engines[f"int8, one call, intra-op {threads}"] = lambda x, s=plain: s.run(["logits"], {"input": x})
            walls, idle = wall_rounds(engines, x_by_batch, args.rounds)
            base = next(iter(walls.values()))
            print(f"\n{threads} thread(s), wall time per call, median of {args.rounds} interleaved rounds "
                  f"(cores left free by other processes: {', '.join(f'{v:.2f}' for v in idle.values())}):")
            for name, by_batch in walls.items():
                cells = "  ".join(f"batch {b}: {1e3 * t:8.3f} ms {base[b] / t:5.2f}x" for b, t in by_batch.items())
                print(f"  {name:40s} {cells}")


if __name__ == "__main__":
    main()
