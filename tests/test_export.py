"""`cnnedge export`: layer checks in torch and in the graph, parity, metadata, variants, failures."""

from __future__ import annotations

import hashlib
import json
import sys
from collections import Counter
from dataclasses import replace
from datetime import datetime
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnxscript import ir
from torch import nn

from cnnedge import __version__, cli
from cnnedge.train import export as ex
from cnnedge.train.checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint
from cnnedge.infer.modelinfo import ModelInfo
from cnnedge.train.zoo import ARCHS, build_edgenet, get_arch
from conftest import MODEL, ROOT, assert_one_line_error, run_cli

SHIPPED = ROOT / "models" / "cnn.pt"


def make_checkpoint(path: Path, arch: str, seed: int = 0, build=None) -> Path:
    """An untrained checkpoint with the keys `cnnedge train` writes, and BatchNorm statistics that are not
    the identity, so the Conv+BN fusion onnxruntime does at load time is really exercised by parity."""
    torch.manual_seed(seed)
    model = (build or get_arch(arch).build)(10).eval()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    save_checkpoint(path, {
        "cnnedge_version": __version__, "command": "test", "arch": arch, "num_classes": 10,
        "class_names": [str(i) for i in range(10)], "input_shape": [1, 28, 28], "mean": [0.1307], "std": [0.3081],
        "preprocess": "digit", "dataset": "mnist", "seed": seed, "epochs": 0, "hparams": {}, "epoch": 0,
        "complete": True, "metrics": {"test_accuracy": 0.1}, "state_dict": model.state_dict(),
    })
    return path


def export_cli(monkeypatch, *args: str) -> int:
    """`cnnedge export ARGS` in this process (torch stays imported: much faster than a subprocess)."""
    monkeypatch.setattr(sys, "argv", ["cnnedge", "export", *map(str, args)])
    try:
        cli.main()
    except SystemExit as e:
        return e.code
    return 0


def mnist_test(n: int, checkpoint: dict) -> tuple[np.ndarray, np.ndarray]:
    from cnnedge.train.data import load_data

    data = load_data("mnist")
    mean, std = checkpoint["mean"][0], checkpoint["std"][0]
    return ((data.x_test[:n] - mean) / std).numpy(), data.y_test[:n].numpy()


@pytest.fixture(scope="module")
def shipped(fresh_export):
    """The shipped checkpoint exported once with both variants, as a user would (conftest.fresh_export)."""
    return fresh_export.path, fresh_export.report


# ------------------------------------------------------------------------------------ every architecture


@pytest.mark.parametrize("name", list(ARCHS))
def test_every_zoo_architecture_exports_and_passes_its_checks(name, tmp_path, data_root):
    ckpt = make_checkpoint(tmp_path / f"{name}.pt", name)
    report = ex.run(ex.ExportConfig(str(ckpt), out=str(tmp_path / "out" / f"{name}.onnx"), parity_images=1_000))
    table = get_arch(name).table
    assert [layer["name"] for layer in report["layers"]] == [row.name for row in table]
    for layer, row in zip(report["layers"], table):
        assert layer["ok"] and tuple(layer["documented"]) == row.shape
        assert tuple(layer["torch"]) == row.shape and tuple(layer["onnx"]) == row.shape, layer
        assert layer["parameters"] == row.params
    parity = report["parity"]
    assert parity["passed"] and parity["inputs"] == "mnist test set" and parity["images"] == 1_000
    cpu = parity["providers"]["CPUExecutionProvider"]
    assert 0 < cpu["max_abs_diff_logits"] <= 1e-4 and cpu["max_abs_diff_embedding"] <= 1e-4
    assert cpu["top1_agreement"] == 1.0
    assert report["accuracy"]["images"] == 10_000 and 0 <= report["accuracy"]["fp32"] <= 1

    # Every documented layer is a named value in the written graph (dropout: its input, said so).
    graph = onnx.load(tmp_path / "out" / f"{name}.onnx").graph
    produced = {v for node in graph.node for v in node.output}
    for layer in report["layers"]:
        assert layer["onnx_value"] in produced
        if "note" in layer:
            assert "identity at inference" in layer["note"] and "drop" in layer["name"]
        elif layer["onnx_value"] not in ("logits", "embedding"):
            assert layer["onnx_value"] == layer["name"]
    assert [o.name for o in graph.output] == ["logits", "embedding"]
    emb = next(layer for layer in report["layers"] if layer["name"] == get_arch(name).embedding)
    assert emb["onnx_value"] == "embedding"


def test_export_without_data_uses_generated_inputs(tmp_path, monkeypatch):
    ckpt = make_checkpoint(tmp_path / "lenet.pt", "lenet_dropout")
    monkeypatch.setenv("CNNEDGE_DATA", str(tmp_path / "no-data"))
    report = ex.run(ex.ExportConfig(str(ckpt), out=str(tmp_path / "lenet.onnx")))
    assert report["parity"]["passed"] and report["parity"]["inputs"].startswith("generated")
    assert report["accuracy"] is None
    info = ModelInfo.from_props(ort.InferenceSession(str(tmp_path / "lenet.onnx")).get_modelmeta().custom_metadata_map)
    assert info.test_accuracy == 0.1  # the checkpoint's own figure when there is no test set


def test_opset_17_is_converted_after_the_layers_are_named(tmp_path, monkeypatch):
    ckpt = make_checkpoint(tmp_path / "edgenet.pt", "edgenet")
    monkeypatch.setenv("CNNEDGE_DATA", str(tmp_path / "no-data"))
    report = ex.run(ex.ExportConfig(str(ckpt), out=str(tmp_path / "e.onnx"), opset=17))
    model = onnx.load(tmp_path / "e.onnx")
    assert report["opset"] == 17 and {o.domain: o.version for o in model.opset_import}[""] == 17
    assert all(layer["ok"] for layer in report["layers"])
    assert {"conv1", "bn1", "relu1", "pool3", "flatten", "fc1"} <= {v for n in model.graph.node for v in n.output}


# ------------------------------------------------------------------------------------------- failures


def broken_edgenet(num_classes: int = 10) -> nn.Sequential:
    model = build_edgenet(num_classes)
    model.conv2 = nn.Conv2d(16, 24, 3, padding=1, bias=False)  # the table says 32 channels
    model.bn2 = nn.BatchNorm2d(24)
    model.conv3 = nn.Conv2d(24, 64, 3, padding=1, bias=False)
    return model


def test_a_network_that_disagrees_with_its_table_fails_with_exit_3_and_writes_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(ARCHS, "broken", replace(get_arch("edgenet"), name="broken", build=broken_edgenet))
    ckpt = make_checkpoint(tmp_path / "broken.pt", "broken", build=broken_edgenet)
    out_dir = tmp_path / "export"
    assert export_cli(monkeypatch, ckpt, "--out", out_dir / "broken.onnx") == 3
    captured = capsys.readouterr()
    err = [line for line in captured.err.splitlines() if line.strip()]
    assert len(err) == 1 and "disagree with the documented table" in err[0] and "nothing written" in err[0]
    assert "conv2: torch shape (24, 14, 14) != documented (32, 14, 14)" in err[0]
    assert "onnx shape (24, 14, 14) != documented (32, 14, 14)" in err[0]
    assert "documented vs torch vs onnx" in captured.out and "bn2" in captured.out  # the table
    assert not out_dir.exists() or not any(out_dir.iterdir())


def failed_export_errors(tmp_path, monkeypatch, capsys) -> list[str]:
    """Export a fresh edgenet checkpoint without data: it must exit 3 and write nothing; its error lines."""
    monkeypatch.setenv("CNNEDGE_DATA", str(tmp_path / "no-data"))
    ckpt = make_checkpoint(tmp_path / "edgenet.pt", "edgenet")
    out_dir = tmp_path / "export"
    assert export_cli(monkeypatch, ckpt, "--out", out_dir / "cnn.onnx") == 3
    assert not out_dir.exists() or not any(out_dir.iterdir())
    return [line for line in capsys.readouterr().err.splitlines() if line.strip() and not line.startswith("warning:")]


def test_parity_failure_exits_3_and_writes_nothing(tmp_path, monkeypatch, capsys):
    """The parity figures are real: a graph whose weights drift by 1e-3 from the network fails."""
    export_graph = ex.export_graph

    def drifted(model, input_shape, opset):
        graph = export_graph(model, input_shape, opset)
        bias = graph.graph.initializers["fc2.bias"]
        bias.const_value = ir.tensor(bias.const_value.numpy() + 1e-3, name="fc2.bias")
        return graph

    monkeypatch.setattr(ex, "export_graph", drifted)
    err = failed_export_errors(tmp_path, monkeypatch, capsys)
    assert len(err) == 1 and "parity failed" in err[0] and "1.00e-03" in err[0]


def test_opencv_parity_failure_exits_3_and_writes_nothing(tmp_path, monkeypatch, capsys):
    """The second runtime decides too: OpenCV's fp32 logits 1e-3 off (onnxruntime's are right) fail the export."""
    run_opencv = ex.run_opencv

    def drifted(net, x):
        logits, embedding = run_opencv(net, x)
        return logits + 1e-3, embedding

    monkeypatch.setattr(ex, "run_opencv", drifted)
    err = failed_export_errors(tmp_path, monkeypatch, capsys)
    assert len(err) == 1 and "OpenCV DNN" in err[0] and "parity failed" in err[0] and "1.00e-03" in err[0], err


def test_a_non_checkpoint_gets_one_line_and_exit_2(tmp_path, monkeypatch, capsys):
    bogus = tmp_path / "weights.pt"
    bogus.write_bytes(b"this is not a checkpoint")
    assert_one_line_error(run_cli("export", bogus, "--out", tmp_path / "x.onnx"), 2, "not a cnnedge checkpoint")
    assert not (tmp_path / "x.onnx").exists() and not (tmp_path / "x.json").exists()
    torch.save(build_edgenet().state_dict(), tmp_path / "bare.pt")  # a bare state_dict is not a checkpoint either
    for path, why in ((tmp_path / "bare.pt", "no 'cnnedge.checkpoint' header"), (tmp_path / "missing.pt", "no such checkpoint")):
        assert export_cli(monkeypatch, path, "--out", tmp_path / "y.onnx") == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and why in err[0]
    assert not (tmp_path / "y.onnx").exists()


def test_existing_outputs_need_force(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CNNEDGE_DATA", str(tmp_path / "no-data"))
    ckpt = make_checkpoint(tmp_path / "k.pt", "keras_convnet")
    out = tmp_path / "k.onnx"
    out.write_bytes(b"old")
    draft = tmp_path / ".thesis.2024.draft.tmp"  # a user's file named like a temp file (issue 14): kept
    draft.write_text("data")
    assert export_cli(monkeypatch, ckpt, "--out", out) == 2
    assert "already exists; pass --force" in capsys.readouterr().err and out.read_bytes() == b"old"
    assert export_cli(monkeypatch, ckpt, "--out", out, "--force") == 0
    onnx.checker.check_model(onnx.load(out), full_check=True)
    assert draft.read_text() == "data"
    assert export_cli(monkeypatch, ckpt, "--out", tmp_path / "k.txt") == 2
    assert export_cli(monkeypatch, ckpt, "--out", tmp_path / "q.onnx", "--quantize", "int4") == 2
    assert export_cli(monkeypatch, ckpt, "--out", tmp_path / "q.onnx", "--opset", "13") == 2
    assert not (tmp_path / "q.onnx").exists()


# ------------------------------------------------------------------------------- the shipped model


def test_parity_numbers_are_real(shipped):
    """The report's figures are measured: recomputed here under the export's conditions (one thread, batches
    of ex.BATCH, the session options cnnedge runs models with), they are the same numbers."""
    out, report = shipped
    checkpoint = load_checkpoint(SHIPPED)
    model = ex.WithEmbedding(model_from_checkpoint(checkpoint), "relu4").eval()
    x, _ = mnist_test(10_000, checkpoint)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(out), options, providers=["CPUExecutionProvider"],
                                   disabled_optimizers=ex.DISABLED_OPTIMIZERS)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.no_grad():
            ref = [torch.cat(t).numpy() for t in zip(*(model(torch.from_numpy(x[i:i + ex.BATCH])) for i in range(0, len(x), ex.BATCH)))]
    finally:
        torch.set_num_threads(threads)
    got = [np.concatenate(t) for t in zip(*(session.run(["logits", "embedding"], {"input": x[i:i + ex.BATCH]})
                                            for i in range(0, len(x), ex.BATCH)))]
    cpu = report["parity"]["providers"]["CPUExecutionProvider"]
    assert report["parity"]["images"] == 10_000 and report["parity"]["inputs"] == "mnist test set"
    assert cpu["max_abs_diff_logits"] == pytest.approx(np.abs(ref[0] - got[0]).max(), rel=1e-3)
    assert cpu["max_abs_diff_embedding"] == pytest.approx(np.abs(ref[1] - got[1]).max(), rel=1e-3)
    assert 0 < cpu["max_abs_diff_logits"] <= ex.TOLERANCE and cpu["top1_agreement"] == 1.0
    assert (got[0].argmax(1) == ref[0].argmax(1)).all()
    assert "CPUExecutionProvider" in report["providers_tested"]


def test_metadata_round_trips(shipped):
    out, report = shipped
    checkpoint = load_checkpoint(SHIPPED)
    for precision, path in (("fp32", out), ("fp16", out.with_name("cnn.fp16.onnx")), ("int8", out.with_name("cnn.int8.onnx"))):
        props = ort.InferenceSession(str(path)).get_modelmeta().custom_metadata_map
        info = ModelInfo.from_props(props, str(path))
        assert info.class_names == checkpoint["class_names"] and info.input_shape == (1, 28, 28)
        assert info.mean == checkpoint["mean"] and info.std == checkpoint["std"]
        assert (info.preprocess, info.arch, info.embedding_layer, info.dataset) == ("digit", "edgenet", "relu4", "mnist")
        assert info.precision == precision and info.test_accuracy == report["accuracy"][precision]
        assert info.checkpoint_sha256 == hashlib.sha256(SHIPPED.read_bytes()).hexdigest()
        assert info.cnnedge_version == __version__ and datetime.fromisoformat(info.export_date).tzinfo is not None
        # onnx reads the same props (what Netron shows)
        assert {p.key: p.value for p in onnx.load(path).metadata_props} == props


def test_dynamic_batch_runs_at_1_and_37(shipped):
    out, _ = shipped
    checkpoint = load_checkpoint(SHIPPED)
    model = model_from_checkpoint(checkpoint)
    x, _ = mnist_test(37, checkpoint)
    s = ort.InferenceSession(str(out))
    for batch in (x[:1], x):
        logits, emb = s.run(["logits", "embedding"], {"input": batch})
        assert logits.shape == (len(batch), 10) and emb.shape == (len(batch), 128)
        with torch.no_grad():
            np.testing.assert_allclose(logits, model(torch.from_numpy(batch)).numpy(), atol=1e-4)


def test_quantized_variants_report_accuracy_and_sizes(shipped):
    out, report = shipped
    acc = report["accuracy"]
    assert acc["fp32"] == pytest.approx(load_checkpoint(SHIPPED)["metrics"]["test_accuracy"], abs=5e-4)
    assert acc["fp32"] - acc["int8"] <= 0.002 and report["variants"]["int8"]["goal_met"]  # the goal
    assert acc["fp32"] - acc["fp16"] <= 0.001
    sizes = {k: v["size_bytes"] for k, v in report["files"].items()}
    assert sizes["fp32"] == report["size_bytes"] == out.stat().st_size
    assert sizes["int8"] < sizes["fp16"] < sizes["fp32"]
    assert report["variants"]["int8"]["settings"]["calibration_images"] == 1_000
    assert report["opset"] >= 17
    # the same accuracy measured here, independently
    checkpoint = load_checkpoint(SHIPPED)
    x, y = mnist_test(10_000, checkpoint)
    logits = ort.InferenceSession(str(out.with_name("cnn.int8.onnx"))).run(["logits"], {"input": x})[0]
    assert (logits.argmax(1) == y).mean() == pytest.approx(acc["int8"])
    ops = Counter(n.op_type for n in onnx.load(out.with_name("cnn.int8.onnx")).graph.node)
    assert ops["QuantizeLinear"] > 0 and ops["DequantizeLinear"] > 0


def test_onnxruntime_fuses_conv_bn_relu_at_load(shipped, tmp_path):
    """Why export keeps BatchNorm as its own node: onnxruntime folds it into the conv when it loads."""
    out, _ = shipped
    written = Counter(n.op_type for n in onnx.load(out).graph.node)
    assert written["BatchNormalization"] == 3 and written["Relu"] == 4
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    ort.InferenceSession(str(out), options, providers=["CPUExecutionProvider"])
    optimized = Counter(n.op_type for n in onnx.load(tmp_path / "optimized.onnx").graph.node)
    assert optimized["BatchNormalization"] == 0 and optimized["Relu"] == 0 and optimized["Conv"] + optimized["FusedConv"] == 3


def test_shipped_export_is_current_and_its_report_describes_it(fresh_export, data_root):
    """export/ is models/cnn.pt exported by this tree: each file is the one the committed report vouches for,
    the report's layer table is what this tree's exporter writes, and the shipped model matches PyTorch
    (measured here, not read from the report's own flags)."""
    report = json.loads((ROOT / "export" / "cnn.json").read_text())
    checkpoint_sha = hashlib.sha256(SHIPPED.read_bytes()).hexdigest()
    assert set(report["files"]) == {"fp32", "fp16", "int8"} and report["checkpoint_sha256"] == checkpoint_sha
    for precision, entry in report["files"].items():
        data = (ROOT / entry["path"]).read_bytes()
        assert (len(data), hashlib.sha256(data).hexdigest()) == (entry["size_bytes"], entry["sha256"]), precision
        info = ModelInfo.from_props({p.key: p.value for p in onnx.load_from_string(data).metadata_props})
        assert info.checkpoint_sha256 == checkpoint_sha and info.precision == precision
    assert MODEL == ROOT / report["files"]["fp32"]["path"] and report["size_bytes"] == MODEL.stat().st_size
    assert report["layers"] == fresh_export.report["layers"]

    checkpoint = load_checkpoint(SHIPPED)
    model = ex.WithEmbedding(model_from_checkpoint(checkpoint), "relu4").eval()
    x, _ = mnist_test(1_000, checkpoint)
    with torch.no_grad():
        ref_logits, ref_emb = (t.numpy() for t in model(torch.from_numpy(x)))
    logits, emb = ort.InferenceSession(str(MODEL)).run(["logits", "embedding"], {"input": x})
    assert np.abs(logits - ref_logits).max() <= ex.TOLERANCE and np.abs(emb - ref_emb).max() <= ex.TOLERANCE
    assert (logits.argmax(1) == ref_logits.argmax(1)).all()
