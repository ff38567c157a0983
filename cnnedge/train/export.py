"""`cnnedge export`: a checkpoint to a deployable ONNX model, proven right before anything is written.

`run` takes these steps, one function each, in this order (1-4 together are `verify_layers`):

1. `check_layers` (cnnedge.zoo): the network against its documented layer table, in PyTorch;
2. `export_graph`: the dynamo exporter without its fusion rewrites, so every layer keeps its value, and
   with static ops only (`static_flatten`), so that every mainstream runtime loads the graph;
3. `name_layer_values`: each layer's output value is renamed after the layer;
4. `check_onnx_shapes`: every layer again, by ONNX shape inference on those values;
5. `check_parity`: onnxruntime against PyTorch, logits and embedding, on real test images (else generated);
6. `make_variants` (`quantize_fp16`, `quantize_int8`): test accuracy of the model and of its variants;
7. `verify_second_runtime`: every model again in OpenCV DNN, each engine (docs/export.md);
8. `add_metadata`: what a device needs to use the model, so the .onnx file is all it needs;
9. `write_outputs`: models and the JSON report, only after every check has passed, as a set.

A failed check prints the layer table (or the parity figures), writes nothing and exits with code 3.

The files are written as a set: every file is first written to a temp file beside its target (a full disk
fails there, before anything is published), then the models are published one by one and the report last.
The report lists each model's sha256, and `predict`, `info` (any cnnedge Runtime) refuse a model that the
report beside it does not list with that sha256 (cnnedge.infer.modelinfo.check_export_set). So a run killed
between two renames leaves a set that is detectably mixed (new models beside the old report are refused, the
old models still match it), and `export --force` rewrites it whole. Without --force, each name is claimed at
the moment it is published (a hard link): a run that overlaps another is refused, and the other's files kept.
"""

from __future__ import annotations

import ast
import contextlib
import io
import math
import os
import tempfile
import warnings
from collections import OrderedDict
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import cv2
import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnxscript import ir
from rich.table import Table
from torch import nn

from cnnedge import __version__
from cnnedge.atomic import publish, stage
from cnnedge.train.checkpoint import load_checkpoint, model_from_checkpoint
from cnnedge.errors import CnnedgeError, ExitCode
from cnnedge.infer.files import printable
from cnnedge.infer.modelinfo import EMBEDDING_NAME, INPUT_NAME, LOGITS_NAME, ModelInfo, file_sha256
from cnnedge.report import console, fmt_bytes, layer_table, to_json, warn
from cnnedge.threads import thread_count
from cnnedge.infer.runtime import DISABLED_OPTIMIZERS, SHORT_NAMES as SHORT_PROVIDERS
from cnnedge.train.options import NATIVE_OPSET, ExportConfig, check_export
from cnnedge.train.zoo import LayerCheck, check_layers, get_arch

MIN_OPSET = 17
# The opset the graph is exported at (options.NATIVE_OPSET). Any other is converted by onnx's version converter
# once the layers are named (it drops the exporter's node metadata): onnxscript's own converter stops at 25, and
# the C fallback it uses beyond that ran before the naming, so every layer lost its value (opsets 26-28: "16
# layers disagree").
TOLERANCE = 1e-4  # max |runtime - torch| for logits and embedding (fp32), in onnxruntime and OpenCV alike
FP32_LIMIT = f"max |diff| <= {TOLERANCE:g}, top-1 100%"
VARIANT_LIMIT = "top-1 100%"
MIN_REAL_IMAGES = 1_000  # fewer real test images than this: parity runs on generated inputs
GENERATED_IMAGES = 1_000
INT8_GOAL = 0.002  # int8 may lose at most 0.2 points of test accuracy against fp32
BATCH = 500  # images per forward call, onnxruntime and torch alike
SCOPES_KEY = "pkg.torch.onnx.name_scopes"  # node metadata from the exporter: the module stack
IDENTITY_NOTE = "no ONNX node (identity at inference): checked on its input value"
IDENTITY_MODULES = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)
CPU, CUDA = "CPUExecutionProvider", "CUDAExecutionProvider"
INT8_SETTINGS = dict(format="QDQ", activations="QUInt8", weights="QInt8", per_channel=True, calibration="MinMax",
                     bias="float32")


@dataclass
class Images:
    """Normalized images as the network sees them (N, C, H, W) float32, and labels where known."""

    source: str
    x: np.ndarray
    y: np.ndarray | None = None


@dataclass
class Variant:
    precision: str
    path: Path
    proto: onnx.ModelProto
    test_accuracy: float | None = None
    report: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------- outputs and inputs


def max_opset() -> int:
    """The newest opset that onnx defines and the installed onnxruntime runs (onnx 1.23 defines 28,
    onnxruntime 1.31 runs 26): a model is only written at an opset it can be verified at."""
    for opset in range(onnx.defs.onnx_opset_version(), NATIVE_OPSET, -1):
        relu = onnx.helper.make_graph([onnx.helper.make_node("Relu", ["x"], ["y"])], "probe",
                                      [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
                                      [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])])
        probe = onnx.helper.make_model(relu, opset_imports=[onnx.helper.make_opsetid("", opset)], ir_version=10)
        try:
            session(probe)
            return opset
        except Exception:  # "ONNX Runtime only guarantees support for models stamped with opset ..."
            continue
    return NATIVE_OPSET


def load_images(checkpoint: dict, config: ExportConfig, need_train: bool) -> tuple[Images | None, Images | None, str]:
    """(test set, calibration images from the training set, why no test set) from the checkpoint's dataset."""
    from cnnedge.train.data import load_data

    try:
        data = load_data(checkpoint["dataset"], config.data_dir)
    except CnnedgeError as e:
        if need_train:
            raise CnnedgeError(f"--quantize int8 calibrates on training images: {e}") from None
        return None, None, str(e)
    if tuple(data.x_train.shape[1:]) != tuple(checkpoint["input_shape"]):
        raise CnnedgeError(f"{data.name}: images are {tuple(data.x_train.shape[1:])}, "
                           f"the checkpoint expects {tuple(checkpoint['input_shape'])}")
    mean = torch.tensor(checkpoint["mean"]).view(1, -1, 1, 1)
    std = torch.tensor(checkpoint["std"]).view(1, -1, 1, 1)
    normalize = lambda x: ((x - mean) / std).numpy().astype(np.float32)
    test = None if data.x_test is None else Images(f"{data.name} test set", normalize(data.x_test), data.y_test.numpy())
    # A seeded sample of the training set: calibration never sees the test images.
    order = torch.randperm(len(data.x_train), generator=torch.Generator().manual_seed(0))[: config.calibration_images]
    train = Images(f"{data.name} training set", normalize(data.x_train[order.sort().values]))
    return test, train, "" if test is not None else f"{data.name} has no test split"


def parity_inputs(test: Images | None, input_shape, limit: int | None) -> Images:
    """Real test images when there are enough of them, else seeded noise in the normalized domain."""
    if test is not None and len(test.x) >= MIN_REAL_IMAGES:
        n = len(test.x) if limit is None else max(MIN_REAL_IMAGES, min(limit, len(test.x)))
        return Images(test.source, test.x[:n], test.y[:n])
    rng = np.random.default_rng(0)
    return Images("generated (seeded standard normal)", rng.standard_normal((GENERATED_IMAGES, *input_shape), np.float32))


# --------------------------------------------------------------------------------------- the graph


class WithEmbedding(nn.Sequential):
    """The network's own children (same names, same modules), returning (logits, embedding)."""

    def __init__(self, net: nn.Sequential, embedding: str):
        super().__init__(OrderedDict(net.named_children()))
        self.embedding = embedding

    def forward(self, x):
        embedding = None
        for name, layer in self.named_children():
            x = layer(x)
            if name == self.embedding:
                embedding = x
        return x, embedding


def export_graph(model: WithEmbedding, input_shape, opset: int) -> ir.Model:
    """torch's dynamo exporter with a dynamic batch axis, named input and outputs, and no fusion.

    Its default `optimize=True` fuses BatchNorm into Conv, which would leave the bn layers no value to
    check. So only constant folding and unused-node removal here; onnxruntime fuses Conv+BN(+ReLU)
    itself when it loads the model (tests/test_export.py checks the optimized graph), so nothing is lost.
    """
    import onnxscript.optimizer

    # The exporter prints progress on stdout and warns freely; a failed export must stay one line.
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            model.eval(), (torch.zeros(2, *input_shape),), dynamo=True, optimize=False,
            opset_version=NATIVE_OPSET, input_names=[INPUT_NAME], output_names=[LOGITS_NAME, EMBEDDING_NAME],
            dynamic_shapes=({0: torch.export.Dim("batch")},), external_data=False, verbose=False,
        )
        graph = program.model
        onnxscript.optimizer.fold_constants(graph)
        static_flatten(graph)
        onnxscript.optimizer.remove_unused_nodes(graph)
    return graph


def static_flatten(graph: ir.Model) -> int:
    """Each Reshape that flattens (batch, d1, ..., dk) into (batch, d1 * ... * dk) becomes one Flatten(axis=1).

    The exporter writes nn.Flatten as a Reshape to a shape computed at run time (Shape -> Squeeze ->
    Reshape -> Concat), since the batch axis is symbolic. onnxruntime folds that away, but OpenCV DNN
    (both engines) cannot load it; a Flatten needs no shape input, keeps the batch axis dynamic and runs
    everywhere. The node keeps its name and module-stack metadata, so layer naming sees no difference;
    the shape computation, now unused, is removed afterwards. Returns the number of Reshapes replaced."""
    replaced = 0
    for node in list(graph.graph):
        if node.op_type != "Reshape" or node.domain not in ("", "ai.onnx"):
            continue
        data, out = node.inputs[0], node.outputs[0]
        if data is None or data.shape is None or out.shape is None or len(data.shape) < 2 or len(out.shape) != 2:
            continue
        batch, *rest = data.shape.dims
        if out.shape[0] != batch or not all(isinstance(d, int) for d in rest) or out.shape[1] != math.prod(rest):
            continue
        flatten = ir.node("Flatten", [data], {"axis": 1}, name=node.name, metadata_props=dict(node.metadata_props))
        ir.convenience.replace_nodes_and_values(graph.graph, node, [node], [flatten], [out], flatten.outputs)
        replaced += 1
    return replaced


def _layer_of(node: ir.Node) -> str | None:
    """The top-level child that produced a node: the second entry of its module stack."""
    scopes = node.metadata_props.get(SCOPES_KEY)
    try:
        scopes = ast.literal_eval(scopes) if isinstance(scopes, str) else scopes
    except (ValueError, SyntaxError):
        return None
    return scopes[1] if isinstance(scopes, list) and len(scopes) > 2 and scopes[0] == "" else None


def name_layer_values(graph: ir.Model, layers: list[str], identities: set[str]) -> dict[str, tuple[str | None, str]]:
    """Rename the one value each layer hands on to the next after the layer: layer -> (value, note).

    The graph outputs keep their contract names (the last layer is `logits`, the embedding layer
    `embedding`). A dropout (in `identities`) has no node at inference: it maps to its input value, and
    the note says so. Any other layer without its one value gets none, which fails the shape check.
    """
    owner = {node: _layer_of(node) for node in graph.graph}
    values = [v for node in graph.graph for v in node.outputs]
    taken = {v.name for v in values} | {v.name for v in graph.graph.inputs} | set(graph.graph.initializers)
    for value in values:  # free the layer names for the layer values
        if value.name in layers and not value.is_graph_output():
            value.name = _unique(f"{value.name}_", taken)
    found, previous = {}, graph.graph.inputs[0]
    for name in layers:
        nodes = [node for node in graph.graph if owner[node] == name]
        if not nodes:
            found[name] = (previous.name, IDENTITY_NOTE) if name in identities else (None, "no ONNX node")
            continue
        leaving = [v for node in nodes for v in node.outputs
                   if v.is_graph_output() or any(owner[user] != name for user, _ in v.uses())]
        if len(leaving) != 1:
            found[name] = (None, f"{len(leaving)} values leave this layer in the graph; expected one")
            continue
        previous = leaving[0]
        if not previous.is_graph_output():
            previous.name = name
        found[name] = (previous.name, "")
    return found


def _unique(stem: str, taken: set[str]) -> str:
    n = 0
    while f"{stem}{n}" in taken:
        n += 1
    taken.add(f"{stem}{n}")
    return f"{stem}{n}"


def to_proto(graph: ir.Model, opset: int, arch: str) -> onnx.ModelProto:
    graph.graph.name = arch
    proto = ir.to_proto(graph)
    if opset != NATIVE_OPSET:  # after naming: the converter drops the exporter's node metadata
        proto = onnx.version_converter.convert_version(proto, opset)
    return proto


def check_onnx_shapes(proto: onnx.ModelProto, rows: list[LayerCheck], values: dict[str, tuple[str | None, str]]) -> None:
    """Fill each row's ONNX shape from shape inference. A fixed (non-symbolic) batch axis is kept in the
    shape, so it shows up as a mismatch too."""
    try:
        inferred = onnx.shape_inference.infer_shapes(proto, check_type=True, strict_mode=True, data_prop=True)
    except Exception as e:
        raise CnnedgeError(f"ONNX shape inference failed: {str(e).strip()[:300]}", ExitCode.CHECK_FAILED) from None
    g = inferred.graph
    shapes = {vi.name: vi.type.tensor_type.shape for vi in (*g.input, *g.value_info, *g.output)}
    for row in rows:
        if row.documented is None:
            continue
        row.onnx_checked = True
        value = values.get(row.name, (None, ""))[0]
        if value not in shapes:
            row.onnx_shape = None
            continue
        dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in shapes[value].dim]
        row.onnx_shape = tuple(dims[1:] if dims and isinstance(dims[0], str) and dims[0] != "?" else dims)


def check_model(proto: onnx.ModelProto, what: str) -> None:
    try:
        onnx.checker.check_model(proto, full_check=True)
    except Exception as e:
        raise CnnedgeError(f"{what}: onnx.checker rejects the model: {str(e).strip()[:300]}", ExitCode.CHECK_FAILED) from None


# ------------------------------------------------------------------------------------------ parity


def session(model: bytes | onnx.ModelProto, provider: str = CPU) -> ort.InferenceSession:
    data = model.SerializeToString() if isinstance(model, onnx.ModelProto) else model
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = torch.get_num_threads()  # run() sets one count for torch and onnxruntime
    disabled = dict(disabled_optimizers=DISABLED_OPTIMIZERS)  # as cnnedge's Runtime will run it
    if provider == CUDA:  # full fp32 on the GPU: TF32 would not meet the fp32 tolerance
        return ort.InferenceSession(data, options, providers=[(CUDA, {"use_tf32": 0}), CPU], **disabled)
    return ort.InferenceSession(data, options, providers=[provider], **disabled)


def cuda_session(model: bytes) -> ort.InferenceSession | None:
    """A CUDA session only where CUDA really loads; onnxruntime silently falls back to CPU otherwise."""
    if CUDA not in ort.get_available_providers() or not torch.cuda.is_available():
        return None
    ort.set_default_logger_severity(4)  # a failed provider load logs errors; quiet while probing
    try:
        if hasattr(ort, "preload_dlls"):
            with contextlib.redirect_stdout(io.StringIO()):
                ort.preload_dlls()  # CUDA and cuDNN from the nvidia wheels torch brought
        s = session(model, CUDA)
    except Exception:
        return None
    finally:
        ort.set_default_logger_severity(2)
    return s if CUDA in s.get_providers() else None


def run_onnx(s: ort.InferenceSession, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    outs = [s.run([LOGITS_NAME, EMBEDDING_NAME], {INPUT_NAME: x[i : i + BATCH]}) for i in range(0, len(x), BATCH)]
    return np.concatenate([o[0] for o in outs]), np.concatenate([o[1] for o in outs])


@torch.inference_mode()
def run_torch(model: WithEmbedding, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    outs = [model(torch.from_numpy(x[i : i + BATCH])) for i in range(0, len(x), BATCH)]
    return torch.cat([o[0] for o in outs]).numpy(), torch.cat([o[1] for o in outs]).numpy()


def compare(reference: tuple[np.ndarray, np.ndarray], got: tuple[np.ndarray, np.ndarray]) -> dict:
    """Max absolute differences and top-1 agreement of `got` against `reference` (logits, embedding)."""
    (ref_logits, ref_emb), (logits, emb) = reference, got
    return {
        "max_abs_diff_logits": float(np.abs(ref_logits - logits).max()),
        "max_abs_diff_embedding": float(np.abs(ref_emb - emb).max()),
        "top1_agreement": float((ref_logits.argmax(1) == logits.argmax(1)).mean()),
    }


def within_limits(result: dict) -> bool:
    """The fp32 parity rule, for every runtime: logits and embedding within TOLERANCE, every top-1 the same."""
    return (result["max_abs_diff_logits"] <= TOLERANCE and result["max_abs_diff_embedding"] <= TOLERANCE
            and result["top1_agreement"] == 1.0)


def check_parity(model: WithEmbedding, model_bytes: bytes, images: Images, reference=None) -> dict:
    """onnxruntime against PyTorch on the same normalized images (`reference`: torch's outputs on them, if
    already computed). CPU decides; CUDA, where it really loads, is measured and reported too (a miss
    there is a warning: the model is the same, the kernels differ)."""
    reference = run_torch(model, images.x) if reference is None else reference
    sessions = {CPU: session(model_bytes)}
    if (gpu := cuda_session(model_bytes)) is not None:
        sessions[CUDA] = gpu
    report = {"inputs": images.source, "images": len(images.x), "tolerance": TOLERANCE, "providers": {}}
    for provider, s in sessions.items():
        result = compare(reference, run_onnx(s, images.x))
        result["passed"] = within_limits(result)
        report["providers"][provider] = result
    report["passed"] = report["providers"][CPU]["passed"]
    return report


# --------------------------------------------------------------------------------- a second runtime


def run_opencv(net, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    from cnnedge.infer.opencv import forward

    outs = [forward(net, x[i: i + BATCH], [LOGITS_NAME, EMBEDDING_NAME]) for i in range(0, len(x), BATCH)]
    return np.concatenate([o[0] for o in outs]), np.concatenate([o[1] for o in outs])


def check_opencv(models: dict[str, onnx.ModelProto], input_shape, images: Images, references: dict) -> list[dict]:
    """Step 7: every model again in each engine of OpenCV DNN, an implementation of every operator
    independent of onnxruntime's. fp32 must meet the parity rule against PyTorch (`within_limits`); an fp16
    or int8 model must give every top-1 that onnxruntime gives on the same file (it rounds differently
    from fp32, so the fp32 tolerance does not apply; its differences are reported). A model that an engine
    cannot load or run gets a row saying why. `references`: precision -> (logits, embedding) on `images`."""
    from cnnedge.infer.opencv import engines, load

    rows = []
    with tempfile.TemporaryDirectory(prefix="cnnedge-opencv-") as tmp:
        for precision, proto in models.items():
            path = Path(tmp) / f"{precision}.onnx"
            path.write_bytes(proto.SerializeToString())  # OpenCV chooses the engine only for a file
            for engine in engines():
                row = {"runtime": "opencv", "version": cv2.__version__, "engine": engine, "precision": precision,
                       "reference": "torch" if precision == "fp32" else f"onnxruntime {precision}",
                       "limit": FP32_LIMIT if precision == "fp32" else VARIANT_LIMIT,
                       "inputs": images.source, "images": len(images.x)}
                try:
                    net = load(path, engine, tuple(input_shape), [LOGITS_NAME, EMBEDDING_NAME])
                except CnnedgeError as e:
                    rows.append({**row, "loaded": False, "error": str(e), "passed": False})
                    continue
                result = compare(references[precision], run_opencv(net, images.x))
                passed = within_limits(result) if precision == "fp32" else result["top1_agreement"] == 1.0
                rows.append({**row, "loaded": True, **result, "passed": passed})
    return rows


def onnxruntime_rows(parity: dict, variants: list[Variant]) -> list[dict]:
    """The onnxruntime checks in the form of check_opencv's rows: fp32 against PyTorch (per provider), and
    each variant against the fp32 model (measured, no limit: that is its test accuracy's job)."""
    common = {"runtime": "onnxruntime", "version": ort.__version__, "loaded": True}
    rows = [{**common, "engine": provider, "precision": "fp32", "reference": "torch", "limit": FP32_LIMIT,
             "inputs": parity["inputs"], "images": parity["images"], **r} for provider, r in parity["providers"].items()]
    return rows + [{**common, "engine": CPU, "precision": v.precision, "reference": "onnxruntime fp32", "limit": None,
                    **v.report["vs_fp32"], "passed": None} for v in variants]


def verify_second_runtime(proto: onnx.ModelProto, variants: list[Variant], input_shape, probe: Images,
                          reference) -> list[dict]:
    """Step 7 in `run`: OpenCV's rows; a wrong fp32 model raises (exit 3), anything else that fails warns."""
    references = {"fp32": reference, **{v.precision: run_onnx(session(v.proto), probe.x) for v in variants}}
    rows = check_opencv({"fp32": proto, **{v.precision: v.proto for v in variants}}, input_shape, probe, references)
    for r in rows:
        what = f"OpenCV DNN {r['version']} ({r['engine']} engine)"
        if not r["loaded"]:
            warn(f"{what} cannot run the {r['precision']} model: {r['error']}")
        elif r["precision"] == "fp32" and not r["passed"]:
            raise CnnedgeError(f"{what} parity failed: max |diff| logits {r['max_abs_diff_logits']:.2e}, embedding "
                               f"{r['max_abs_diff_embedding']:.2e} (limit {TOLERANCE:.0e}), top-1 agreement "
                               f"{100 * r['top1_agreement']:.2f}% on {r['inputs']}; nothing written", ExitCode.CHECK_FAILED)
        elif not r["passed"]:
            warn(f"{what} {r['precision']}: top-1 agreement with onnxruntime {100 * r['top1_agreement']:.2f}% "
                 f"on {r['images']:,} images (max |diff| logits {r['max_abs_diff_logits']:.2e})")
    return rows


def top1_accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    return float((logits.argmax(1) == labels).mean())


# --------------------------------------------------------------------------------------- variants


def quantize_fp16(proto: onnx.ModelProto) -> onnx.ModelProto:
    """Weights and arithmetic in fp16; inputs and outputs stay float32, so predict needs no change."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        converted = ir.from_proto(convert_float_to_float16(proto, keep_io_types=True))
    converted.graph.sort()  # the converter appends its input casts at the end of the node list
    return ir.to_proto(converted)


class _Calibration:
    """onnxruntime's CalibrationDataReader protocol over a normalized image array."""

    def __init__(self, x: np.ndarray, batch: int = 100):
        self.batches = iter([{INPUT_NAME: x[i : i + batch]} for i in range(0, len(x), batch)])

    def get_next(self):
        return next(self.batches, None)


def quantize_int8(proto: onnx.ModelProto, calibration: np.ndarray) -> onnx.ModelProto:
    """Static int8 in QDQ form: per-channel int8 weights, uint8 activations calibrated on training images.

    uint8 activations with int8 weights (U8S8) is what onnxruntime's x86 kernels are built for: the Convs
    become QLinearConv and the Gemms QGemm (with int8 activations onnxruntime 1.31 leaves the first Conv and
    both Gemms in fp32 between Dequantize/Quantize, slower than fp32). The first block (first Conv up to its
    MaxPool) stays fp32: a Conv with one input channel makes a poor integer GEMM and took half the int8
    model's time; in fp32 it fuses with its ReLU and pool in onnxruntime's NCHWc layout. Run the model with
    runtime.DISABLED_OPTIMIZERS (cnnedge's Runtime does): 1.8x fp32 instead of 1.3x (bench_int8.py).
    Biases stay float32 (QuantizeBias off): OpenCV's new DNN engine cannot load a quantized Gemm whose bias
    comes out of a DequantizeLinear (net_impl2.cpp:449, bufidx >= 0), and onnxruntime builds the same
    QLinearConv and QGemm kernels from a float bias, at the same speed and accuracy."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quant_pre_process, quantize_static

    with tempfile.TemporaryDirectory(prefix="cnnedge-int8-") as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fp32, pre, out = (Path(tmp) / name for name in ("fp32.onnx", "pre.onnx", "int8.onnx"))
        onnx.save(proto, fp32)
        with contextlib.redirect_stdout(io.StringIO()):
            quant_pre_process(fp32, pre, skip_symbolic_shape=True)  # ONNX shape inference, Conv+BN folding
            quantize_static(pre, out, _Calibration(calibration), quant_format=QuantFormat.QDQ, per_channel=True,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            calibrate_method=CalibrationMethod.MinMax, nodes_to_exclude=first_block(onnx.load(pre)),
                            extra_options={"QuantizeBias": False})
        return onnx.load(out)


def first_block(proto: onnx.ModelProto) -> list[str]:
    """Node names from the first Conv up to the first MaxPool after it (conv1, its BN folded, relu1, pool1)."""
    nodes = proto.graph.node
    first = next(i for i, n in enumerate(nodes) if n.op_type == "Conv")
    last = next((i for i, n in enumerate(nodes) if n.op_type == "MaxPool" and i > first), first)
    return [n.name for n in nodes[first: last + 1]]


def measure_variant(variant: Variant, images: Images, fp32_outputs: tuple[np.ndarray, np.ndarray]) -> None:
    """Agreement with the fp32 model on the same images, and test accuracy when they are labelled."""
    check_model(variant.proto, f"{variant.precision} model")
    outputs = run_onnx(session(variant.proto), images.x)
    variant.report = {"vs_fp32": {"inputs": images.source, "images": len(images.x), **compare(fp32_outputs, outputs)}}
    if images.y is not None:
        variant.test_accuracy = top1_accuracy(outputs[0], images.y)
        variant.report["test_accuracy"] = variant.test_accuracy


# --------------------------------------------------------------------------------- metadata, files


def add_metadata(proto: onnx.ModelProto, checkpoint: dict, precision: str, test_accuracy: float | None,
                 sha256: str, export_date: str) -> onnx.ModelProto:
    info = ModelInfo(
        class_names=list(checkpoint["class_names"]), input_shape=tuple(checkpoint["input_shape"]),
        mean=list(checkpoint["mean"]), std=list(checkpoint["std"]), preprocess=checkpoint["preprocess"],
        arch=checkpoint["arch"], precision=precision, embedding_layer=get_arch(checkpoint["arch"]).embedding,
        test_accuracy=test_accuracy, dataset=checkpoint.get("dataset", ""), checkpoint_sha256=sha256,
        cnnedge_version=__version__, export_date=export_date,
    )
    del proto.metadata_props[:]
    onnx.helper.set_model_props(proto, info.to_props())
    return proto


def check_deployable(proto: onnx.ModelProto, what: str) -> None:
    """The model as predict will read it: metadata by the same strict parser, and as many logits as class
    names. Export never writes a model that predict then refuses."""
    props = {p.key: p.value for p in proto.metadata_props}
    info = ModelInfo.from_props(props, source=what)
    output = next((o for o in proto.graph.output if o.name == LOGITS_NAME), None)
    logits = [] if output is None else output.type.tensor_type.shape.dim
    if len(logits) != 2 or (logits[1].HasField("dim_value") and logits[1].dim_value != len(info.class_names)):
        raise CnnedgeError(f"{what}: the graph gives {logits[1].dim_value if len(logits) == 2 else '?'} logits for "
                           f"{len(info.class_names)} class names; nothing written", ExitCode.CHECK_FAILED)


def write_outputs(models: dict[str, tuple[Path, onnx.ModelProto]], report_path: Path, report: dict,
                  force: bool = False) -> None:
    """The models and the report as a set (see the module docstring): all staged, then published, the report
    last with each model's sha256. Models are small, so no external data."""
    import hashlib

    report["files"] = {}
    staged: list[tuple[Path, Path]] = []  # (temp file, target)
    identity = {}  # target -> (device, inode) of the file this run publishes there
    try:
        for precision, (path, proto) in models.items():
            check_deployable(proto, f"{precision} model")
            data = proto.SerializeToString()
            staged.append((stage(path, data), path))
            identity[path] = _file_id(staged[-1][0])
            report["files"][precision] = {"path": str(path), "size_bytes": len(data),
                                          "sha256": hashlib.sha256(data).hexdigest()}
        report["size_bytes"] = report["files"]["fp32"]["size_bytes"]
        staged.append((stage(report_path, (to_json(report) + "\n").encode()), report_path))
        for i, (tmp, path) in enumerate(staged):
            try:
                publish(tmp, path, overwrite=force)
            except CnnedgeError:
                _unpublish([p for _, p in staged[:i]], identity)
                raise
    finally:
        for tmp, _ in staged:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)


def _file_id(path: Path) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_dev, st.st_ino


def _unpublish(published: list[Path], identity: dict[Path, tuple[int, int]]) -> None:
    """When a file of the set is refused (another run wrote it meanwhile), remove the ones this run has just
    published: new names it created itself (without --force nothing was replaced), checked to still be the
    very files it wrote, so the folder is left as the other run made it."""
    for path in published:
        with contextlib.suppress(OSError):
            if _file_id(path) == identity.get(path):
                os.unlink(path)


def layer_json(rows: list[LayerCheck], values: dict[str, tuple[str | None, str]]) -> list[dict]:
    return [{
        "name": r.name,
        "documented": list(r.documented.shape) if r.documented else None,
        "torch": list(r.measured.shape) if r.measured else None,
        "onnx": list(r.onnx_shape) if r.onnx_shape is not None else None,
        "onnx_value": values.get(r.name, (None, ""))[0],
        "parameters": r.measured.params if r.measured else None,
        "documented_parameters": r.documented.params if r.documented else None,
        "ok": r.ok,
        **({"note": values[r.name][1]} if values.get(r.name, (None, ""))[1] else {}),
    } for r in rows]


def print_parity(parity: dict) -> None:
    for provider, r in parity["providers"].items():
        verdict = "[green]ok[/]" if r["passed"] else "[red]FAILED[/]"
        console.print(f"parity {provider} vs torch on {parity['images']:,} images ({parity['inputs']}): "
                      f"max |diff| logits {r['max_abs_diff_logits']:.2e}, embedding {r['max_abs_diff_embedding']:.2e} "
                      f"(limit {parity['tolerance']:.0e}), top-1 agreement {100 * r['top1_agreement']:.2f}% {verdict}",
                      soft_wrap=True)


def runtimes_table(rows: list[dict]) -> Table:
    table = Table(title="runtimes verified", title_justify="left")
    for col in ("runtime", "engine", "precision", "against", "images", "max |diff| logits", "embedding", "top-1 agreement", ""):
        table.add_column(col, justify="left" if col in ("runtime", "engine", "precision", "against", "") else "right")
    for r in rows:
        engine = SHORT_PROVIDERS.get(r["engine"], r["engine"])
        if not r["loaded"]:
            table.add_row(f"{r['runtime']} {r['version']}", engine, r["precision"], r["reference"], "", "", "", "",
                          "[yellow]cannot run it[/]")
            continue
        verdict = "measured" if r["passed"] is None else "[green]ok[/]" if r["passed"] else "[red]FAILED[/]"
        table.add_row(f"{r['runtime']} {r['version']}", engine, r["precision"], r["reference"], f"{r['images']:,}",
                      f"{r['max_abs_diff_logits']:.2e}", f"{r['max_abs_diff_embedding']:.2e}",
                      f"{100 * r['top1_agreement']:.2f}%", verdict)
    return table


def variants_table(rows: list[tuple[str, Path, int, float | None, dict]], fp32_accuracy: float | None) -> Table:
    table = Table(title="exported models", title_justify="left")
    for col, justify in (("precision", "left"), ("file", "left"), ("size", "right"), ("test accuracy", "right"),
                         ("vs fp32", "right"), ("top-1 agreement with fp32", "right")):
        table.add_column(col, justify=justify)
    for precision, path, size, acc, vs in rows:
        delta = "" if acc is None or fp32_accuracy is None or precision == "fp32" else f"{100 * (acc - fp32_accuracy):+.2f} pts"
        agree = f"{100 * vs['top1_agreement']:.2f}%" if vs else ""
        table.add_row(precision, str(path), fmt_bytes(size), "-" if acc is None else f"{100 * acc:.2f}%", delta, agree)
    return table


# ---------------------------------------------------------------------------------------------- run


def verify_layers(net: nn.Sequential, checkpoint: dict, opset: int, title: str) -> tuple[WithEmbedding, onnx.ModelProto, list[LayerCheck], dict]:
    """Steps 1-4: the documented table in torch and in the exported graph; prints the table, raises on a mismatch."""
    arch = get_arch(checkpoint["arch"])
    rows = check_layers(net, arch, checkpoint["num_classes"])
    model = WithEmbedding(net, arch.embedding).eval()
    graph = export_graph(model, tuple(checkpoint["input_shape"]), opset)
    identities = {name for name, m in net.named_children() if isinstance(m, IDENTITY_MODULES)}
    values = name_layer_values(graph, [r.name for r in rows if r.documented], identities)
    proto = to_proto(graph, opset, arch.name)
    check_onnx_shapes(proto, rows, values)
    console.print(layer_table(rows, title, onnx=True))
    for name, (value, note) in values.items():
        if note:
            console.print(f"  {name}: {note} ({value or '?'})")
    bad = [r for r in rows if not r.ok]
    if bad:
        raise CnnedgeError(f"{arch.name}: {len(bad)} layer(s) disagree with the documented table, nothing written: "
                           + "; ".join(f"{r.name}: {', '.join(r.problems())}" for r in bad), ExitCode.CHECK_FAILED)
    check_model(proto, "fp32 model")
    return model, proto, rows, values


def make_variants(proto: onnx.ModelProto, quantize: list[str], paths: dict[str, Path], train: Images | None,
                  evaluation: Images, fp32_outputs, fp32_accuracy: float | None) -> list[Variant]:
    """Step 6 for fp16 and int8: convert, check, and measure against the fp32 model."""
    variants = []
    for precision in quantize:
        converted = quantize_fp16(proto) if precision == "fp16" else quantize_int8(proto, train.x)
        variant = Variant(precision, paths[precision], converted)
        measure_variant(variant, evaluation, fp32_outputs)
        if precision == "int8":
            variant.report["settings"] = {**INT8_SETTINGS, "calibration_images": len(train.x), "calibration_source": train.source}
            if fp32_accuracy is not None:
                loss = fp32_accuracy - variant.test_accuracy
                variant.report["goal_met"] = loss <= INT8_GOAL
                if loss > INT8_GOAL:
                    warn(f"int8 loses {100 * loss:.2f} points of test accuracy (goal: at most {100 * INT8_GOAL:.1f})")
        variants.append(variant)
    return variants


def run(config: ExportConfig) -> dict:
    """Export, verify and write; returns the report written to <out stem>.json."""
    quantize, paths = check_export(config)
    newest = max_opset()
    if not MIN_OPSET <= config.opset <= newest:
        raise CnnedgeError(f"--opset {config.opset}: choose {MIN_OPSET} to {newest} (the newest opset onnx "
                           f"{onnx.__version__} and onnxruntime {ort.__version__} both support)")
    checkpoint = load_checkpoint(config.checkpoint)
    sha256 = file_sha256(config.checkpoint)
    threads = thread_count(config.threads)
    torch.set_num_threads(threads)
    cv2.setNumThreads(threads)
    test, train, no_test = load_images(checkpoint, config, need_train="int8" in quantize)

    # 1-4: the documented table, in torch and in the graph
    net = model_from_checkpoint(checkpoint, config.checkpoint)
    title = f"{checkpoint['arch']} -> {paths['fp32']}: documented vs torch vs onnx"
    model, proto, rows, values = verify_layers(net, checkpoint, config.opset, title)

    # 5: parity
    model_bytes = proto.SerializeToString()
    probe = parity_inputs(test, tuple(checkpoint["input_shape"]), config.parity_images)
    if probe.y is None:
        warn(f"parity on generated inputs: {no_test or 'fewer than 1,000 test images'}")
    reference = run_torch(model, probe.x)
    parity = check_parity(model, model_bytes, probe, reference)
    print_parity(parity)
    cpu = parity["providers"][CPU]
    if not parity["passed"]:
        raise CnnedgeError(f"ONNX parity failed: max |diff| logits {cpu['max_abs_diff_logits']:.2e}, embedding "
                           f"{cpu['max_abs_diff_embedding']:.2e} (limit {TOLERANCE:.0e}), top-1 agreement "
                           f"{100 * cpu['top1_agreement']:.2f}% on {parity['inputs']}; nothing written", ExitCode.CHECK_FAILED)
    if CUDA in parity["providers"] and not parity["providers"][CUDA]["passed"]:
        warn(f"CUDA parity is outside the fp32 limits (CPU passed): {parity['providers'][CUDA]}")

    # 6: accuracy and variants
    evaluation = test if test is not None else probe  # the variants are compared with fp32 on these
    fp32_outputs = run_onnx(session(model_bytes), evaluation.x)
    fp32_accuracy = top1_accuracy(fp32_outputs[0], test.y) if test is not None else None
    variants = make_variants(proto, quantize, paths, train, evaluation, fp32_outputs, fp32_accuracy)

    # 7: a second runtime
    runtimes = onnxruntime_rows(parity, variants) + verify_second_runtime(
        proto, variants, tuple(checkpoint["input_shape"]), probe, reference)
    console.print(runtimes_table(runtimes))

    # 8-9: metadata and files
    date = datetime.now(timezone.utc).isoformat(timespec="seconds")
    own = (checkpoint.get("metrics") or {}).get("test_accuracy")  # the checkpoint's figure, from training
    models = {"fp32": (paths["fp32"], add_metadata(proto, checkpoint, "fp32", own if test is None else fp32_accuracy, sha256, date))}
    for v in variants:
        models[v.precision] = (v.path, add_metadata(v.proto, checkpoint, v.precision, v.test_accuracy, sha256, date))
    report = {
        "checkpoint": str(config.checkpoint), "checkpoint_sha256": sha256, "arch": checkpoint["arch"], "opset": config.opset,
        "input": INPUT_NAME, "outputs": [LOGITS_NAME, EMBEDDING_NAME], "embedding_layer": model.embedding,
        "layers": layer_json(rows, values), "parity": parity,
        "accuracy": None if test is None else {
            "split": test.source, "images": len(test.x), "checkpoint": own,
            "fp32": fp32_accuracy, **{v.precision: v.test_accuracy for v in variants},
        },
        "providers_tested": list(parity["providers"]),
        "runtimes": runtimes,
        "runtimes_verified": sorted({f"{r['runtime']} {r['version']}" for r in runtimes if r["passed"]}),
        "variants": {v.precision: v.report for v in variants},
        "cnnedge_version": __version__, "export_date": date,
    }
    write_outputs(models, paths["report"], report, force=config.force)
    sizes = {k: f["size_bytes"] for k, f in report["files"].items()}
    console.print(variants_table(
        [("fp32", paths["fp32"], sizes["fp32"], fp32_accuracy, {})]
        + [(v.precision, v.path, sizes[v.precision], v.test_accuracy, v.report["vs_fp32"]) for v in variants],
        fp32_accuracy))
    console.print(printable("wrote " + ", ".join([*(str(p) for p, _ in models.values()), str(paths["report"])])), markup=False)
    return report
