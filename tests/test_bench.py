"""`cnnedge bench`: the JSON rows, that each row ran the runtime it names, and ratios from measured numbers.
Tiny repetition counts keep this fast; the figures themselves are not asserted (no timed tests). The main
run is on this tree's fresh export (conftest.fresh_export), which OpenCV DNN loads too."""

from __future__ import annotations

import ctypes
import json
import shutil
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from conftest import MODEL, ROOT, assert_one_line_error, cli
from cnnedge import bench
from cnnedge.infer.files import read_idx
from cnnedge.train.checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint
from cnnedge.errors import CnnedgeError
from cnnedge.train.zoo import get_arch, measure_layers

CHECKPOINT = ROOT / "models" / "cnn.pt"
QUICK = ("--warmup", "1", "--repeat", "3", "--min-time", "0")
TEST_IMAGES = 1000


def mnist_test(data_root, n: int) -> tuple[np.ndarray, np.ndarray]:
    raw = data_root / "MNIST" / "raw"
    return read_idx(raw / "t10k-images-idx3-ubyte")[:n], read_idx(raw / "t10k-labels-idx1-ubyte")[:n].astype(int)


def normalized(images: np.ndarray, checkpoint: dict) -> np.ndarray:
    return ((images[:, None] / 255.0 - checkpoint["mean"][0]) / checkpoint["std"][0]).astype(np.float32)


def onnx_accuracy(path, x, y) -> float:
    logits = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(["logits"], {"input": x})[0]
    return float((logits.argmax(1) == y).mean())


def torch_accuracy(checkpoint: dict, x, y) -> float:
    with torch.no_grad():
        return float((model_from_checkpoint(checkpoint)(torch.from_numpy(x)).argmax(1).numpy() == y).mean())


def bench_json(*args: str, env: dict | None = None) -> tuple[dict, str]:
    r = cli("bench", "--format", "json", *QUICK, *args, env=env)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout), r.stderr


@pytest.fixture(scope="module")
def doc(data_root, fresh_export):
    d, _ = bench_json("--model", str(fresh_export.path), "--checkpoint", str(CHECKPOINT), "--batch-sizes", "1,8",
                      "--providers", "cpu", "--images", "40", "--photos", "2", "--test-images", str(TEST_IMAGES))
    return d


def model_files(fresh_export) -> dict:
    return {"fp32": fresh_export.path, "fp16": fresh_export.path.with_name("cnn.fp16.onnx"),
            "int8": fresh_export.path.with_name("cnn.int8.onnx")}


def find(rows, runtime, precision, batch):
    return next(r for r in rows if (r["runtime"], r["precision"], r["batch"]) == (runtime, precision, batch))


def test_json_rows_have_the_issue_schema(doc):
    rows = doc["rows"]
    assert {(r["runtime"], r["precision"], r["batch"]) for r in rows} == {
        (rt, p, b) for rt, p in (("torch", "fp32"), *((rt, p) for rt in ("onnxruntime", "opencv") for p in ("fp32", "fp16", "int8")))
        for b in (1, 8)}
    for r in rows:
        assert set(bench.ROW_KEYS) <= set(r), r
        assert r["provider"] == "cpu" and isinstance(r["batch"], int)
        for key in ("latency_ms_p50", "latency_ms_p99", "images_per_second", "accuracy", "speedup_vs_torch"):
            assert isinstance(r[key], float) and r[key] > 0, (key, r)
        assert r["latency_ms_p99"] >= r["latency_ms_p50"] and r["calls"] >= 3
        assert r["size_bytes"] == (ROOT / r["file"]).stat().st_size
    assert [r["runtime"] for r in rows if r["batch"] == 1] == ["torch"] + ["onnxruntime"] * 3 + ["opencv"] * 3
    assert doc["threads"]["onnxruntime_intra_op"] >= 1 and doc["threads"]["torch"] == doc["threads"]["onnxruntime_intra_op"]
    assert doc["versions"]["onnxruntime"] == ort.__version__ and doc["versions"]["torch"] == torch.__version__
    assert doc["command"].startswith("cnnedge bench --format json")
    assert doc["model"]["accuracy_on"] == f"{TEST_IMAGES:,} MNIST test images"


def test_each_row_ran_the_runtime_it_names(doc, data_root, fresh_export):
    """Providers read back from the sessions, sizes of the files they loaded, and accuracy recomputed here
    with each engine on the same test images."""
    import cv2

    from cnnedge.infer.opencv import OpenCVRuntime

    checkpoint = load_checkpoint(CHECKPOINT)
    images, labels = mnist_test(data_root, TEST_IMAGES)
    x = normalized(images, checkpoint)
    for precision, path in model_files(fresh_export).items():
        for batch in (1, 8):
            r = find(doc["rows"], "onnxruntime", precision, batch)
            assert r["session_providers"] == ["CPUExecutionProvider"] and r["engine"] == f"onnxruntime {ort.__version__}"
            assert r["size_bytes"] == path.stat().st_size and r["file"].endswith(path.name)
            assert r["accuracy"] == pytest.approx(onnx_accuracy(path, x, labels), abs=1e-12)
            o = find(doc["rows"], "opencv", precision, batch)
            assert o["session_providers"] is None and o["engine"].startswith(f"OpenCV {cv2.__version__} (")
            assert o["size_bytes"] == path.stat().st_size and o["provider"] == "cpu"
            cv_logits = OpenCVRuntime(path).forward(x)[0]
            assert o["accuracy"] == pytest.approx(float((cv_logits.argmax(1) == labels).mean()), abs=1e-12)
    t = find(doc["rows"], "torch", "fp32", 1)
    assert t["session_providers"] is None and t["engine"].startswith(f"torch {torch.__version__} eager")
    assert t["size_bytes"] == CHECKPOINT.stat().st_size
    assert t["accuracy"] == pytest.approx(torch_accuracy(checkpoint, x, labels), abs=1e-12)


def test_ratios_follow_the_measured_latencies():
    """Rows from known timings (p50 latencies of 4, 1, 0.5 and 2 ms at batch 8; 1 ms at batch 1), ratios
    worked out by hand: each against the right row (same batch: torch; same runtime: fp32; same precision:
    onnxruntime), the p50 not the p99, 2 FLOPs per MAC."""
    def engine(runtime, precision):
        return bench.Engine(runtime, "cpu", precision, f"{precision}.onnx", 1, "v", None, lambda x: x)

    def row(runtime, precision, batch, ms):
        times = np.array([ms, ms, ms, 10 * ms]) / 1e3  # one slow call: the p99, never the rate
        return bench.make_row(engine(runtime, precision), batch, times)

    rows = [row("torch", "fp32", 8, 4.0), row("onnxruntime", "fp32", 8, 1.0), row("onnxruntime", "int8", 8, 0.5),
            row("opencv", "int8", 8, 2.0), row("torch", "fp32", 1, 1.0), row("onnxruntime", "fp32", 1, 1.0)]
    bench.add_ratios(rows, macs=1_000_000)
    torch8, ort8, int8, cv8, torch1, ort1 = rows
    assert [r["images_per_second"] for r in rows] == pytest.approx([2000, 8000, 16000, 4000, 1000, 1000])
    assert [r["speedup_vs_torch"] for r in rows] == pytest.approx([1, 4, 8, 2, 1, 1])
    assert int8["speedup_vs_fp32"] == pytest.approx(2) and ort8["speedup_vs_fp32"] == pytest.approx(1)
    assert torch8["speedup_vs_fp32"] is None and cv8["speedup_vs_fp32"] is None  # no OpenCV fp32 row here
    assert cv8["speedup_vs_onnxruntime"] == pytest.approx(0.25) and ort8["speedup_vs_onnxruntime"] is None
    assert [r["gflops"] for r in rows] == pytest.approx([4, 16, 32, 8, 2, 2])  # 2 x 1e6 MACs x images/s
    assert int8["latency_ms_p50"] == pytest.approx(0.5) and int8["latency_ms_p99"] > 4


def test_the_run_fills_every_ratio_and_fraction(doc):
    rows = doc["rows"]
    for r in rows:
        assert r["speedup_vs_torch"] > 0 and r["gflops"] > 0 and 0 < r["peak_fraction"]
        assert (r["speedup_vs_fp32"] is None) == (r["runtime"] == "torch")
        assert (r["speedup_vs_onnxruntime"] is None) == (r["runtime"] != "opencv")
    assert find(rows, "torch", "fp32", 8)["speedup_vs_torch"] == 1.0
    assert doc["peak_gflops"]["cpu"] > 1


def test_macs_from_the_onnx_graph_match_the_torch_module():
    """Counted torch-free from ONNX shape inference; measured here with forward hooks on the module."""
    net = model_from_checkpoint(load_checkpoint(CHECKPOINT))
    measured = sum(m.macs for m in measure_layers(net, get_arch("edgenet").input_shape).values())
    assert bench.count_macs(MODEL) == measured == 1_994_240


def test_preprocessing_and_end_to_end_sections(doc):
    pre = doc["preprocess"]
    assert [(p["input"], p["threads"]) for p in pre] == [
        ("40 28x28 crops", 1), ("40 28x28 crops", doc["threads"]["preprocess_workers"]),
        ("2 640x480 photos", 1), ("2 640x480 photos", doc["threads"]["preprocess_workers"])]
    assert all(p["images_per_second"] > 0 for p in pre)
    crops, cv_crops, photos, cv_photos = doc["predict"]
    assert [p["runtime"] for p in doc["predict"]] == ["onnxruntime", "opencv"] * 2
    assert crops["input"] == "40 28x28 PNG files" and crops["images"] == 40 and crops["errors"] == 0
    assert crops["accuracy"] >= 0.95  # the MNIST test images, read back from PNG files in class folders
    assert photos["input"] == "2 640x480 JPEG photos" and photos["images"] == 2 and photos["provider"] == "cpu"
    assert photos["accuracy"] is not None and crops["images_per_second"] > 0
    assert (cv_crops["input"], cv_crops["accuracy"]) == (crops["input"], crops["accuracy"])
    assert (cv_photos["input"], cv_photos["accuracy"]) == (photos["input"], photos["accuracy"])


def _roll_rows(array: np.ndarray, shift: int) -> np.ndarray:
    return np.roll(array, shift, axis=0)


def test_a_changed_checkpoint_or_int8_file_changes_only_its_own_rows(data_root, tmp_path):
    """fc2's class rows rolled by 1 in the checkpoint and by 2 in the int8 file: predictions move to the next
    class(es), so the PyTorch rows and the int8 rows lose their accuracy, each in its own way."""
    checkpoint = load_checkpoint(CHECKPOINT)
    for key in ("fc2.weight", "fc2.bias"):
        checkpoint["state_dict"][key] = torch.roll(checkpoint["state_dict"][key], 1, dims=0)
    save_checkpoint(tmp_path / "rolled.pt", {k: v for k, v in checkpoint.items() if k not in ("format", "format_version")})
    shutil.copy(MODEL, tmp_path / "cnn.onnx")
    shutil.copy(MODEL.with_name("cnn.fp16.onnx"), tmp_path / "cnn.fp16.onnx")
    int8 = onnx.load(MODEL.with_name("cnn.int8.onnx"))
    rolled = 0
    for init in int8.graph.initializer:  # weights, biases and their per-channel scales and zero points
        if init.name.startswith("fc2.") and init.dims and init.dims[0] == 10:
            init.CopyFrom(onnx.numpy_helper.from_array(_roll_rows(onnx.numpy_helper.to_array(init), 2), init.name))
            rolled += 1
    assert rolled >= 4, "the int8 graph's fc2 initializers were not found"
    onnx.save(int8, tmp_path / "cnn.int8.onnx")

    doc, stderr = bench_json("--model", str(tmp_path / "cnn.onnx"), "--checkpoint", str(tmp_path / "rolled.pt"),
                             "--batch-sizes", "1", "--images", "0", "--photos", "0", "--test-images", "500")
    images, labels = mnist_test(data_root, 500)
    x = normalized(images, checkpoint)
    acc = {r["runtime"] + " " + r["precision"]: r["accuracy"] for r in doc["rows"]}
    assert acc["onnxruntime fp32"] >= 0.98 and acc["onnxruntime fp16"] >= 0.98
    assert acc["torch fp32"] < 0.05 and acc["onnxruntime int8"] < 0.05
    assert acc["torch fp32"] == pytest.approx(torch_accuracy(checkpoint, x, labels), abs=1e-12)
    assert acc["onnxruntime int8"] == pytest.approx(onnx_accuracy(tmp_path / "cnn.int8.onnx", x, labels), abs=1e-12)
    assert "is not the checkpoint" in stderr and "sha256 differs" in stderr
    assert doc["preprocess"] == [] and doc["predict"] == []


def test_variant_rows_are_named_after_the_file_metadata(tmp_path):
    shutil.copy(MODEL, tmp_path / "cnn.onnx")
    shutil.copy(MODEL.with_name("cnn.fp16.onnx"), tmp_path / "cnn.int8.onnx")  # a mislabelled file
    r = cli("bench", "--format", "json", *QUICK, "--model", tmp_path / "cnn.onnx", "--batch-sizes", "1",
                "--images", "0", "--photos", "0", "--test-images", "100", "--providers", "cpu", "--runtimes", "onnxruntime",
                env={"CNNEDGE_DATA": str(tmp_path)})  # no test set here: accuracy is null
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)["rows"]
    assert [(x["runtime"], x["precision"]) for x in rows] == [("torch", "fp32"), ("onnxruntime", "fp32"), ("onnxruntime", "fp16")]
    assert all(x["accuracy"] is None for x in rows)
    assert "cnn.int8.onnx: its metadata says precision fp16" in r.stderr
    assert "no fp16 rows" in r.stderr and "no accuracy" in r.stderr


def test_runs_without_torch_and_onnx(tmp_path):
    """An edge device with onnxruntime only: no PyTorch rows, null speed-ups, MACs unknown, and no crash."""
    code = ("import sys; sys.modules['torch'] = None; sys.modules['onnx'] = None; "
            "sys.argv = ['cnnedge', *sys.argv[1:]]; from cnnedge.cli import main; main()")
    r = subprocess.run([sys.executable, "-c", code, "bench", "--format", "json", *QUICK, "--batch-sizes", "1,4",
                        "--images", "10", "--photos", "0", "--test-images", "100", "--providers", "cpu",
                        "--runtimes", "onnxruntime"],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert {x["runtime"] for x in doc["rows"]} == {"onnxruntime"} and len(doc["rows"]) == 6
    assert all(x["speedup_vs_torch"] is None and x["gflops"] is None for x in doc["rows"])
    assert all(x["speedup_vs_fp32"] is not None for x in doc["rows"])
    assert doc["model"]["macs_per_image"] is None and doc["versions"]["torch"] is None
    assert "torch is not installed" in r.stderr and "MACs unknown" in r.stderr
    assert doc["predict"][0]["images"] == 10


def test_without_onnxruntime_the_opencv_rows_run_alone(fresh_export):
    """A 32-bit ARM board: no onnxruntime (nor torch, nor onnx). OpenCV rows only, ratios to onnxruntime null,
    the end-to-end rows on OpenCV; asking for onnxruntime there is one line naming --runtime opencv."""
    code = ("import sys; sys.modules['onnxruntime'] = None; sys.modules['torch'] = None; sys.modules['onnx'] = None; "
            "sys.argv = ['cnnedge', *sys.argv[1:]]; from cnnedge.cli import main; main()")
    args = ["bench", "--format", "json", *QUICK, "--model", str(fresh_export.path), "--batch-sizes", "1,4",
            "--images", "10", "--photos", "0", "--test-images", "100"]
    r = subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert {(x["runtime"], x["provider"]) for x in doc["rows"]} == {("opencv", "cpu")} and len(doc["rows"]) == 6
    assert all(x["speedup_vs_onnxruntime"] is None and x["speedup_vs_fp32"] is not None for x in doc["rows"])
    assert doc["versions"]["onnxruntime"] is None and doc["peak_gflops"]["cpu"] is None
    assert [p["runtime"] for p in doc["predict"]] == ["opencv"]
    assert "onnxruntime is not installed" in r.stderr
    r = subprocess.run([sys.executable, "-c", code, *args, "--runtimes", "onnxruntime,opencv"], cwd=ROOT,
                       capture_output=True, text=True, timeout=600)
    assert_one_line_error(r, 2, "onnxruntime is not installed", "--runtime opencv")


def test_runtimes_option_selects_the_rows(fresh_export, data_root):
    """In this process (torch is imported already): --runtimes opencv gives the PyTorch and OpenCV rows."""
    cfg = bench.BenchConfig(model=str(fresh_export.path), checkpoint=str(CHECKPOINT), runtimes=bench.parse_runtimes("opencv"),
                            providers=("cpu",), batch_sizes=(1,), warmup=1, repeat=3, min_time=0, images=0, photos=0,
                            test_images=100)
    doc = bench.run(cfg)
    assert [(r["runtime"], r["precision"]) for r in doc["rows"]] == [
        ("torch", "fp32"), ("opencv", "fp32"), ("opencv", "fp16"), ("opencv", "int8")]
    assert all(r["accuracy"] > 0.9 for r in doc["rows"])
    with pytest.raises(CnnedgeError, match="--runtimes: unknown runtime 'tflite'"):
        bench.parse_runtimes("opencv,tflite")


def test_table_and_markdown_state_threads_and_summary(data_root):
    args = (*QUICK, "--batch-sizes", "1,4", "--images", "0", "--photos", "0", "--test-images", "200", "--providers", "cpu")
    table = cli("bench", *args)
    assert table.returncode == 0, table.stderr
    assert "threads: onnxruntime" in table.stdout and "intra-op" in table.stdout and "torch" in table.stdout
    assert "cpu: onnxruntime fp32 vs PyTorch eager:" in table.stdout and "int8 vs fp32" in table.stdout
    assert "GFLOP/s" in table.stdout and "Traceback" not in table.stderr
    md = cli("bench", "--format", "markdown", *args)
    assert md.returncode == 0, md.stderr
    assert "| runtime | provider | precision | batch |" in md.stdout and md.stdout.count("| onnxruntime | cpu |") == 6


def _cuda_driver() -> bool:
    try:
        ctypes.CDLL("libcuda.so.1")
        return True
    except OSError:
        return False


@pytest.mark.skipif(_cuda_driver(), reason="this machine has a CUDA driver")
def test_cuda_without_a_gpu():
    """Only cuda asked for: one line and exit 2. cpu and cuda: the cpu rows, and a note for cuda."""
    r = cli("bench", "--providers", "cuda", *QUICK)
    assert_one_line_error(r, 2, "no requested provider can run the model", "cuda")
    doc, stderr = bench_json("--providers", "cpu,cuda", "--batch-sizes", "1", "--images", "0", "--photos", "0",
                             "--test-images", "100", "--checkpoint", str(CHECKPOINT))
    assert {x["provider"] for x in doc["rows"]} == {"cpu"}
    assert "note: no rows for provider cuda" in stderr


def test_usage_errors_are_one_line_with_exit_2(tmp_path):
    assert_one_line_error(cli("bench", "--model", tmp_path / "missing.onnx"), 2, "missing.onnx", "no such model file")
    assert_one_line_error(cli("bench", "--checkpoint", tmp_path / "missing.pt"), 2, "missing.pt")
    assert_one_line_error(cli("bench", "--batch-sizes", "1,0"), 2, "--batch-sizes", "'0'")
    assert_one_line_error(cli("bench", "--providers", "gpu"), 2, "unknown provider 'gpu'")
    assert_one_line_error(cli("bench", "--format", "xml"), 2, "'xml' is not one of")
    assert_one_line_error(cli("bench", "--repeat", "0"), 2, "--repeat")
    (tmp_path / "broken.onnx").write_bytes(b"not a model")
    assert_one_line_error(cli("bench", "--model", tmp_path / "broken.onnx"), 2, "broken.onnx", "not a loadable ONNX model")


def test_idx_reader_refuses_truncated_files(tmp_path, data_root):
    good = (data_root / "MNIST" / "raw" / "t10k-labels-idx1-ubyte").read_bytes()
    (tmp_path / "short").write_bytes(good[:100])
    with pytest.raises(CnnedgeError, match="truncated"):
        read_idx(tmp_path / "short")
    assert read_idx(data_root / "MNIST" / "raw" / "t10k-labels-idx1-ubyte").shape == (10_000,)


def test_shipped_int8_model_runs_integer_kernels(tmp_path):
    """The export recipe (uint8 activations, int8 weights, first block in fp32), run as cnnedge's Runtime runs
    it: conv2, conv3 and both Gemms become integer kernels, conv1 a fused fp32 Conv, and pool1 stays before
    the QuantizeLinear (in fp32, where onnxruntime's NCHWc kernels keep it fast)."""
    from cnnedge.infer.runtime import DISABLED_OPTIMIZERS

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(MODEL.with_name("cnn.int8.onnx")), options, providers=["CPUExecutionProvider"],
                         disabled_optimizers=DISABLED_OPTIMIZERS)
    ops = [n.op_type for n in onnx.load(tmp_path / "optimized.onnx").graph.node]
    assert ops.count("QLinearConv") == 2 and ops.count("QGemm") == 2
    assert [op for op in ops if op in {"Conv", "FusedConv", "Gemm", "FusedGemm", "MatMul"}] == ["FusedConv"]
    assert ops.index("MaxPool") < ops.index("QuantizeLinear")


def test_engines_take_turns():
    """Warm-up each, then rounds in which every engine runs in turn: a load change hits all rows alike."""
    order = []
    times = bench.time_in_turns([lambda: order.append("a"), lambda: order.append("b")], 1, 3, 0)
    assert order == ["a", "b"] + ["a", "b"] * 3
    assert [len(t) for t in times] == [3, 3] and all((t >= 0).all() for t in times)
