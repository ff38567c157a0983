"""Issue 14, hardening round 2: each case the issue lists, reproduced, and the answer cnnedge now gives.

No file is lost or deleted that cnnedge did not create, untrusted models and checkpoints are one-line errors
with exit code 2 (3 for a failed verification), I/O faults too, and every JSON document is strict JSON.
Commands run in this process through `cnnedge.cli.main` (exit codes and messages as a user gets them)
unless the test is about the process itself (closed stdout, /dev/full, pipes, file permissions)."""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from cnnedge import atomic, cli
from cnnedge.errors import CnnedgeError
from cnnedge.infer import runtime as rt
from cnnedge.infer.files import collect_inputs, printable
from cnnedge.infer.gallery import Gallery
from cnnedge.infer.modelinfo import MAX_CLASSES, ModelInfo
from cnnedge.synth import render_digit
from cnnedge.train import export as ex
from cnnedge.train.checkpoint import load_checkpoint, save_checkpoint
from conftest import MODEL, ROOT, assert_one_line_error, run_cli
from test_export import make_checkpoint

SHIPPED_PT = ROOT / "models" / "cnn.pt"
SAMPLE = ROOT / "samples" / "3" / "04_pen_photo.jpg"
AS_USER = ["setpriv", "--inh-caps=-dac_override,-dac_read_search", "--bounding-set=-dac_override,-dac_read_search"]


def strict_json(text: str):
    """json.loads that refuses NaN and Infinity, which are not JSON."""
    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")
    return json.loads(text, parse_constant=refuse)


@pytest.fixture
def cnnedge(monkeypatch, capsys):
    """`cnnedge ARGS` through the real entry point, in this process -> (exit code, stdout, stderr)."""
    def run(*args) -> tuple[int, str, str]:
        monkeypatch.setattr(sys, "argv", ["cnnedge", *map(str, args)])
        try:
            cli.main()
            code = 0
        except SystemExit as e:
            code = e.code
        out, err = capsys.readouterr()
        return code, out, err
    return run


def one_line(result: tuple[int, str, str], code: int, *fragments: str) -> str:
    got, _, err = result
    lines = [line for line in err.splitlines() if line.strip()]
    assert got == code and len(lines) == 1, (got, err)
    assert "Traceback" not in err and "internal error" not in err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def as_user(args: list) -> list:
    """Run without root's right to read and write anything, so that file modes mean what they say."""
    if os.geteuid() != 0:
        return list(map(str, args))
    if shutil.which("setpriv") is None:
        pytest.skip("running as root without setpriv: unreadable files cannot be made")
    return [*AS_USER, *map(str, args)]


def cli_process(*args, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(as_user([sys.executable, "-m", "cnnedge", *args]), cwd=ROOT, capture_output=True, text=True,
                          timeout=300, **kwargs)


def write_clip(path: Path, frames: int, size=(320, 240)) -> Path:
    rng = np.random.default_rng(0)
    images = [cv2.resize(render_digit(d % 10, "paper", rng), size) for d in range(10)]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 15.0, size)
    for i in range(frames):
        writer.write(images[i % 10])
    writer.release()
    return path


# --------------------------------------------------------------------------- 1. webcam --save, full disk


def test_webcam_save_on_a_full_disk_keeps_the_old_video_and_says_so(tmp_path, small_disk, cnnedge):
    disk = small_disk(1024)
    old = write_clip(disk / "annotated.avi", 20)  # the good video a full disk must not cost
    before = old.read_bytes()
    source = write_clip(tmp_path / "long.avi", 300)  # ~1.5 MB annotated: more than the disk holds
    result = cnnedge("webcam", "--source", source, "--no-window", "--format", "json", "--save", old)
    line = one_line(result, 2, "--save", "annotated.avi", "of the 300 frames", "the disk is full", "existing file is kept")
    assert old.read_bytes() == before
    assert sorted(p.name for p in disk.iterdir()) == ["annotated.avi"]  # no temp file left behind
    assert '"summary"' not in result[1], line  # no summary claiming 300 saved frames


def test_webcam_save_reads_back_what_it_wrote(tmp_path, cnnedge):
    source = write_clip(tmp_path / "clip.avi", 30)
    code, out, err = cnnedge("webcam", "--source", source, "--no-window", "--format", "json", "--save", tmp_path / "out.mp4")
    assert code == 0, err
    summary = strict_json(out.splitlines()[-1])["summary"]
    cap = cv2.VideoCapture(str(tmp_path / "out.mp4"))
    assert summary["saved"]["frames"] == 30 == cap.get(cv2.CAP_PROP_FRAME_COUNT)
    cap.release()


# ------------------------------------------------------------------ 2. nothing deleted that is not ours


def test_files_named_like_temp_files_are_never_deleted(tmp_path, cnnedge):
    crops = tmp_path / "crops"
    crops.mkdir()
    draft = crops / ".thesis.2024.draft.tmp"  # the example: a hidden file named like an old temp file
    draft.write_text("data")
    dead = int(subprocess.run([sys.executable, "-c", "print(__import__('os').getpid())"], capture_output=True,
                              text=True).stdout)
    lookalike = crops / f".notes.txt.{dead}.abcdefgh.tmp.txt"  # the old pattern, with a pid that is gone
    lookalike.write_text("data")
    code, _, err = cnnedge("predict", "samples/", "--save-crops", crops)
    assert code == 0, err
    assert draft.read_text() == "data" and lookalike.read_text() == "data"
    assert len(list(crops.glob("*.png"))) == 22
    # What cnnedge itself left (a writer killed mid-write) is recognised, and only that.
    assert atomic.is_stale_temp(f".cnn.pt.cnnedge.{dead}.k2j4x_9a.tmp")
    assert not atomic.is_stale_temp(draft.name) and not atomic.is_stale_temp(lookalike.name)


# ------------------------------------------------------------------- 3-4. export: overlap and sets


@pytest.fixture(scope="module")
def models() -> dict[str, onnx.ModelProto]:
    """The shipped models, as export would write them (they carry cnnedge metadata)."""
    return {p: onnx.load(str(MODEL.with_name(name))) for p, name in
            (("fp32", "cnn.onnx"), ("fp16", "cnn.fp16.onnx"), ("int8", "cnn.int8.onnx"))}


def write_set(folder: Path, models: dict, force: bool = False, tag: str = "") -> dict:
    """write_outputs on the shipped models into `folder` (cnn.onnx, its variants, cnn.json)."""
    paths = {"fp32": folder / "cnn.onnx", "fp16": folder / "cnn.fp16.onnx", "int8": folder / "cnn.int8.onnx"}
    protos = {}
    for precision, proto in models.items():
        proto = onnx.ModelProto.FromString(proto.SerializeToString())
        proto.doc_string = tag  # another export: other bytes
        protos[precision] = (paths[precision], proto)
    report = {"checkpoint_sha256": "0" * 64, "export": tag}
    ex.write_outputs(protos, folder / "cnn.json", report, force=force)
    return report


def test_export_refuses_at_publish_time_an_output_another_run_wrote_meanwhile(tmp_path, models):
    """Two exports overlap: the other one published cnn.fp16.onnx after this one's existence check."""
    theirs = tmp_path / "cnn.fp16.onnx"
    theirs.write_bytes(b"the other run's model")
    with pytest.raises(CnnedgeError, match="cnn.fp16.onnx already exists .*pass --force"):
        write_set(tmp_path, models)
    assert theirs.read_bytes() == b"the other run's model"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cnn.fp16.onnx"]  # this run's cnn.onnx withdrawn, no temps


def test_export_on_a_full_disk_publishes_nothing_and_a_rerun_works(small_disk, models):
    disk = small_disk(700)  # cnn.onnx fits, the set (743 KiB) does not
    with pytest.raises(CnnedgeError, match="cannot write .*No space left on device"):
        write_set(disk, models)
    assert list(disk.iterdir()) == []  # not cnn.onnx without its variants and report: nothing, no temp files
    write_set(disk, {k: v for k, v in models.items() if k != "fp16"})  # what fits: no refusal of the rerun
    assert sorted(p.name for p in disk.iterdir()) == ["cnn.int8.onnx", "cnn.json", "cnn.onnx"]


def test_a_set_interrupted_between_two_renames_is_refused_until_exported_again(tmp_path, models, cnnedge, monkeypatch):
    write_set(tmp_path, models, tag="old")
    real_publish, published = ex.publish, []

    def killed_after_the_first(tmp, path, overwrite=True):
        if published:
            raise KeyboardInterrupt  # as SIGKILL would stop it: after cnn.onnx, before the variants and report
        real_publish(tmp, path, overwrite)
        published.append(path)

    monkeypatch.setattr(ex, "publish", killed_after_the_first)
    with pytest.raises(KeyboardInterrupt):
        write_set(tmp_path, models, force=True, tag="new")
    monkeypatch.setattr(ex, "publish", real_publish)
    assert published == [tmp_path / "cnn.onnx"]
    # The new cnn.onnx beside the old report and variants: refused in one line by predict and info (exit 3).
    one_line(cnnedge("predict", SAMPLE, "--model", tmp_path / "cnn.onnx"), 3, "cnn.onnx", "cnn.json",
             "partial or mixed export", "--force")
    one_line(cnnedge("info", tmp_path / "cnn.onnx"), 3, "partial or mixed export")
    code, out, err = cnnedge("predict", SAMPLE, "--model", tmp_path / "cnn.int8.onnx", "--format", "json")
    assert code == 0, err  # the old variants still match the old report: a consistent (old) set
    write_set(tmp_path, models, force=True, tag="new")  # the recovery the message names
    for name in ("cnn.onnx", "cnn.fp16.onnx", "cnn.int8.onnx"):
        assert cnnedge("info", tmp_path / name, "--format", "json")[0] == 0
    report = strict_json((tmp_path / "cnn.json").read_text())
    assert report["files"]["fp16"]["sha256"] == hashlib.sha256((tmp_path / "cnn.fp16.onnx").read_bytes()).hexdigest()


def test_a_variant_left_from_an_earlier_export_is_refused(tmp_path, models, cnnedge):
    write_set(tmp_path, models, tag="both variants")
    write_set(tmp_path, {"fp32": models["fp32"], "int8": models["int8"]}, force=True, tag="int8 only")
    one_line(cnnedge("info", tmp_path / "cnn.fp16.onnx"), 3, "cnn.fp16.onnx", "not part of the export", "cnn.json")
    assert cnnedge("info", tmp_path / "cnn.int8.onnx")[0] == 0


def test_export_publishes_the_report_last_with_every_sha256(tmp_path, monkeypatch):
    monkeypatch.setenv("CNNEDGE_DATA", str(tmp_path / "no-data"))
    order = []
    real_publish = ex.publish
    monkeypatch.setattr(ex, "publish", lambda tmp, path, overwrite=True: (order.append(Path(path).name),
                                                                           real_publish(tmp, path, overwrite)))
    checkpoint = make_checkpoint(tmp_path / "k.pt", "keras_convnet")
    config = ex.ExportConfig(checkpoint=str(checkpoint), out=str(tmp_path / "k.onnx"), quantize=("fp16",))
    report = ex.run(config)
    assert order == ["k.onnx", "k.fp16.onnx", "k.json"]
    for entry in report["files"].values():
        assert entry["sha256"] == hashlib.sha256(Path(entry["path"]).read_bytes()).hexdigest()


# ------------------------------------------------------------------------------ 5. unreadable folders


def test_unreadable_folders_and_files_are_reported_and_the_rest_runs(tmp_path):
    good = tmp_path / "digits" / "3"
    good.mkdir(parents=True)
    shutil.copy(SAMPLE, good / "a.jpg")
    locked_class = tmp_path / "digits" / "8"  # a class subfolder of mode 000
    locked_class.mkdir()
    shutil.copy(SAMPLE, locked_class / "b.jpg")
    locked_arg = tmp_path / "locked"  # an unreadable folder given as an argument
    locked_arg.mkdir()
    shutil.copy(SAMPLE, locked_arg / "c.jpg")
    unsearchable = tmp_path / "unsearchable"  # a file inside a folder that can be listed but not entered
    unsearchable.mkdir()
    shutil.copy(SAMPLE, unsearchable / "d.jpg")
    for folder, mode in ((locked_class, 0), (locked_arg, 0), (unsearchable, 0o600)):
        folder.chmod(mode)
    try:
        r = cli_process("predict", tmp_path / "digits", locked_arg, unsearchable / "d.jpg", "--format", "json")
    finally:
        for folder in (locked_class, locked_arg, unsearchable):
            folder.chmod(0o755)
    assert r.returncode == 1, r.stderr  # some inputs failed, the rest ran: not 0, not 4
    lines = r.stderr.splitlines()
    assert len(lines) == 3 and all(line.startswith("warning: ") for line in lines), lines
    assert any(f"{locked_class}: Permission denied" in line for line in lines), lines
    assert any(f"{locked_arg}: Permission denied" in line for line in lines), lines  # not "(try --recursive)"
    assert any("d.jpg: Permission denied; skipped" in line for line in lines), lines
    results = strict_json(r.stdout)["results"]
    assert [(Path(res["path"]).name, res["label"]) for res in results if res["label"]] == [("a.jpg", "3")]


# --------------------------------------------------------------------------- 6. untrusted models


def hostile_onnx(path: Path, classes: int = 10, names: int = 10, nan: bool = False, loop: int | None = None,
                 input_shape=(1, 28, 28), static_logits: bool = True) -> Path:
    """A loadable model with cnnedge metadata whose graph does what a hostile or broken one would."""
    features = int(np.prod(input_shape))
    weight = np.full((features, classes), np.nan if nan else 0.001, np.float32)
    nodes = [helper.make_node("Flatten", ["input"], ["flat"], axis=1), helper.make_node("MatMul", ["flat", "w"], ["mm"])]
    initializers = [numpy_helper.from_array(weight, "w")]
    if not static_logits:  # a width only known at run time: Slice(mm, 0, 1000 computed from the input)
        nodes += [helper.make_node("ReduceSum", ["flat"], ["total"], keepdims=0),
                  helper.make_node("Mul", ["total", "zero_f"], ["z"]), helper.make_node("Add", ["z", "big"], ["e"]),
                  helper.make_node("Cast", ["e"], ["ei"], to=TensorProto.INT64),
                  helper.make_node("Reshape", ["ei", "one_dim"], ["ends"]),
                  helper.make_node("Slice", ["mm", "starts", "ends", "axes"], ["logits"])]
        initializers += [numpy_helper.from_array(np.array(0, np.float32), "zero_f"),
                         numpy_helper.from_array(np.array(1000, np.float32), "big"),
                         numpy_helper.from_array(np.array([1], np.int64), "one_dim"),
                         numpy_helper.from_array(np.array([0], np.int64), "starts"),
                         numpy_helper.from_array(np.array([1], np.int64), "axes")]
    elif loop is None:
        nodes.append(helper.make_node("Identity", ["mm"], ["logits"]))
    else:  # a Loop of `loop` iterations that adds 1 to a counter, multiplied into the logits
        body = helper.make_graph(
            [helper.make_node("Identity", ["cond_in"], ["cond_out"]), helper.make_node("Add", ["acc_in", "one"], ["acc_out"])],
            "body", [helper.make_tensor_value_info("i", TensorProto.INT64, []),
                     helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
                     helper.make_tensor_value_info("acc_in", TensorProto.FLOAT, [])],
            [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
             helper.make_tensor_value_info("acc_out", TensorProto.FLOAT, [])],
            initializer=[numpy_helper.from_array(np.array(1, np.float32), "one")])
        nodes += [helper.make_node("Loop", ["M", "cond", "zero"], ["acc"], body=body),
                  helper.make_node("Mul", ["mm", "acc"], ["logits"])]
        initializers += [numpy_helper.from_array(np.array(loop, np.int64), "M"),
                         numpy_helper.from_array(np.array(True), "cond"), numpy_helper.from_array(np.array(0, np.float32), "zero")]
    graph = helper.make_graph(nodes, "hostile", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", *input_shape])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", classes if static_logits else "K"])],
                              initializer=initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)
    info = ModelInfo(class_names=[str(i) for i in range(names)], input_shape=(1, 28, 28), mean=[0.13], std=[0.31],
                     preprocess="digit", arch="hostile")
    helper.set_model_props(model, info.to_props())
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return path


@pytest.mark.parametrize("case, fragment", [
    (dict(classes=12), "disagrees with the 10 class names"),  # was IndexError (exit 4)
    (dict(classes=3), "disagrees with the 10 class names"),  # was exit 0 with wrong labels
    (dict(classes=12, static_logits=False), "output logits has shape [1, 12] for 1 image(s) and 10 classes"),
    (dict(nan=True), "output logits holds NaN or infinite values"),  # was NaN in the JSON
])
def test_a_model_whose_graph_disagrees_with_its_metadata_is_one_line(tmp_path, cnnedge, case, fragment):
    model = hostile_onnx(tmp_path / "m.onnx", **case)
    result = cnnedge("predict", SAMPLE, "--model", model, "--format", "json")
    one_line(result, 2, "m.onnx", fragment)
    assert result[1] == ""  # no half document, no NaN


def test_a_huge_metadata_input_shape_is_refused_before_anything_is_allocated(tmp_path, cnnedge):
    model = hostile_onnx(tmp_path / "big.onnx", input_shape=(1, 28, 28))
    props = {p.key: p.value for p in onnx.load(str(model)).metadata_props}
    proto = onnx.load(str(model))
    del proto.metadata_props[:]
    helper.set_model_props(proto, {**props, "input_shape": "[1, 4096, 4096]"})
    onnx.save(proto, model)
    one_line(cnnedge("predict", "samples/", "--model", model), 2, "input_shape", "at most 4 channels and 512 pixels")


def test_a_model_that_never_finishes_is_stopped(tmp_path, cnnedge, monkeypatch):
    monkeypatch.setattr(rt, "RUN_TIME_LIMIT", 1.0)  # 60 s in use; onnxruntime's terminate flag works the same
    model = hostile_onnx(tmp_path / "loop.onnx", loop=10**15)
    one_line(cnnedge("predict", SAMPLE, "--model", model), 2, "loop.onnx", "stopped after 1 s", "does not finish")
    # The watchdog stops only that run: the next model runs as usual.
    assert cnnedge("predict", SAMPLE, "--format", "json")[0] == 0


def test_a_gallery_temperature_that_would_give_nan_confidences_is_refused(tmp_path):
    from cnnedge.infer.gallery import build

    runtime = rt.Runtime(MODEL, "cpu")
    rng = np.random.default_rng(0)
    gallery, _ = build(["a", "b"], rng.standard_normal((4, 128)).astype(np.float32), np.array([0, 0, 1, 1]),
                       ["1", "2", "3", "4"], runtime, "test")
    gallery.meta["temperature"]["cosine"] = 1e-40
    gallery.save(tmp_path / "g.npz")
    with pytest.raises(CnnedgeError, match="temperature must give a number from 1e-06 to 1e\\+06") as e:
        Gallery.load(tmp_path / "g.npz")
    assert e.value.code == 2


# --------------------------------------------------------------------- 6. untrusted checkpoints


@pytest.mark.parametrize("change, fragment", [
    (dict(format_version="2"), "'format_version' is '2'"),
    (dict(num_classes=-3), "'num_classes' is -3 for 10 class names"),
    (dict(num_classes=10**9), "'num_classes' is 1000000000"),  # was a 512 GB allocation attempt
    (dict(class_names=["a", "b"]), "'num_classes' is 10 for 2 class names"),  # export wrote what predict refused
    (dict(preprocess="sharpen"), "'preprocess' must be one of digit, fit"),
    (dict(input_shape=[1, 4096, 4096]), "'input_shape'"),
    (dict(class_names=[f"c{i}" for i in range(MAX_CLASSES + 1)], num_classes=MAX_CLASSES + 1), "2 to 1,000"),
])
def test_a_checkpoint_with_impossible_fields_is_refused_and_export_writes_nothing(tmp_path, cnnedge, change, fragment):
    path = tmp_path / "bad.pt"
    torch.save({**load_checkpoint(SHIPPED_PT), **change}, path)
    one_line(cnnedge("export", path, "--out", tmp_path / "out" / "bad.onnx"), 2, "bad.pt", fragment)
    assert not (tmp_path / "out").exists()


def resumable(tmp_path: Path, dataset: str) -> Path:
    """A checkpoint as an interrupted `cnnedge train` leaves it in <out stem>.partial.pt (epoch 1 of 3)."""
    base = load_checkpoint(SHIPPED_PT)
    model = torch.nn.Linear(1, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    hparams = {**base["hparams"], "epochs": 3}
    config = {"arch": "edgenet", "dataset": dataset, "data_dir": None, "out": str(tmp_path / "cnn.pt"), "device": "cpu",
              "seed": 0, "val_fraction": 0.05, "limit": None, "download": False, "resume": False, "from_checkpoint": None,
              "freeze_backbone": False, "plots": False, "hparams": {}, "force": False}
    history = [{"epoch": 1, "train_loss": 1.0, "train_accuracy": 0.5, "val_loss": None, "val_accuracy": None,
                "lr": 0.1, "seconds": 1.0}]
    partial = tmp_path / "cnn.partial.pt"
    save_checkpoint(partial, {**{k: v for k, v in base.items() if k not in ("format", "format_version", "metrics")},
                              "epoch": 1, "epochs": 3, "complete": False, "history": history, "hparams": hparams,
                              "config": config, "optimizer_state": optimizer.state_dict(),
                              "scheduler_state": scheduler.state_dict()})
    return partial


@pytest.mark.parametrize("change, fragment", [
    (dict(config="not a dict"), "carries no training state"),
    (dict(config=None), "carries no training state"),
    (dict(epoch=7), "epoch 7 is not one of the run's 3 epochs"),
    (dict(epoch="1"), "epoch '1'"),
    (dict(history=[]), "history does not list epochs 1 to 1"),
])
def test_resume_from_a_damaged_run_is_one_line(tmp_path, cnnedge, change, fragment):
    partial = resumable(tmp_path, "mnist")
    checkpoint = torch.load(partial, weights_only=True)
    torch.save({**checkpoint, **change}, partial)
    one_line(cnnedge("train", "--out", tmp_path / "cnn.pt", "--resume"), 2, "--resume", fragment)


def test_resume_with_unknown_or_wrongly_typed_options_is_one_line(tmp_path, cnnedge):
    partial = resumable(tmp_path, "mnist")
    checkpoint = torch.load(partial, weights_only=True)
    torch.save({**checkpoint, "config": {**checkpoint["config"], "colour": "red"}}, partial)
    one_line(cnnedge("train", "--out", tmp_path / "cnn.pt", "--resume"), 2, "unknown training options colour")
    torch.save({**checkpoint, "config": {**checkpoint["config"], "limit": -5}}, partial)
    one_line(cnnedge("train", "--out", tmp_path / "cnn.pt", "--resume"), 2, "--limit -5")


def test_resume_after_a_class_folder_was_added_is_one_line(tmp_path, cnnedge):
    data = tmp_path / "digits"
    shutil.copytree(ROOT / "samples", data, ignore=shutil.ignore_patterns("*.py"))
    resumable(tmp_path, f"imagefolder:{data}")  # trained on the 10 digit folders
    (data / "x").mkdir()
    shutil.copy(SAMPLE, data / "x" / "new.jpg")
    one_line(cnnedge("train", "--out", tmp_path / "cnn.pt", "--resume"), 2,
             "now has 11 classes, the interrupted run trained on 10", "train into a new --out")
    assert not (tmp_path / "cnn.pt").exists()


# ------------------------------------------------------------------------------------- 7. I/O faults


def test_stdout_closed_or_full_is_one_line(tmp_path):
    closed = subprocess.run(f"{sys.executable} -m cnnedge predict samples/ >&-", shell=True, cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert_one_line_error(closed, 2, "standard output is closed")  # was AttributeError 'isatty' (exit 4)
    for fmt in ("table", "json"):
        with open("/dev/full", "w") as full:
            r = subprocess.run([sys.executable, "-m", "cnnedge", "predict", "samples/", "--format", fmt], cwd=ROOT,
                               stdout=full, stderr=subprocess.PIPE, text=True, timeout=120)
        assert_one_line_error(subprocess.CompletedProcess(r.args, r.returncode, "", r.stderr), 2,
                              "cannot write to standard output: No space left on device")


def test_a_reader_that_leaves_early_gets_141_and_no_message():
    """`cnnedge predict DIR | head -1` exited 1 ("some inputs failed") because click and rich map a broken
    pipe to 1. A closed pipe before the first write is the same as head leaving after one line."""
    for fmt in ("table", "csv"):
        proc = subprocess.Popen([sys.executable, "-m", "cnnedge", "predict", "samples/", "samples/", "--format", fmt],
                                cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        proc.stdout.close()
        assert proc.wait(timeout=120) == 141 and proc.stderr.read() == "", fmt


def test_outputs_under_a_file_are_one_line_before_any_work(tmp_path, cnnedge):
    a_file = tmp_path / "a_file"
    a_file.write_text("I am a file")
    one_line(cnnedge("export", SHIPPED_PT, "--out", a_file / "cnn.onnx"), 2, "a_file is a file, not a folder")
    one_line(cnnedge("inspect", SHIPPED_PT, "--out", a_file / "inspect"), 2, "a_file is a file, not a folder")
    one_line(cnnedge("train", "--out", a_file / "cnn.pt"), 2, "a_file is a file, not a folder")
    one_line(cnnedge("predict", "samples/", "--save-crops", a_file / "crops"), 2, "a_file is a file, not a folder")
    assert a_file.read_text() == "I am a file"


def test_outputs_in_a_read_only_folder_are_one_line_before_any_work(small_disk, cnnedge):
    read_only = small_disk(64, read_only=True)  # read-only for root too (a chmod 555 folder is not)
    one_line(cnnedge("export", SHIPPED_PT, "--out", read_only / "cnn.onnx"), 2, "is a read-only file system")
    one_line(cnnedge("inspect", SHIPPED_PT, "--out", read_only), 2, "is a read-only file system")
    one_line(cnnedge("train", "--out", read_only / "cnn.pt"), 2, "is a read-only file system")
    assert list(read_only.iterdir()) == []


def test_a_full_disk_during_training_keeps_the_old_model(tmp_path, small_disk, cnnedge):
    disk = small_disk(600)  # the old model (400 KiB) fits, and a checkpoint of the new run does not
    out = disk / "cnn.pt"
    shutil.copy(SHIPPED_PT, out)
    data = tmp_path / "digits"
    shutil.copytree(ROOT / "samples", data, ignore=shutil.ignore_patterns("*.py"))
    result = cnnedge("train", "--dataset", f"imagefolder:{data}", "--epochs", "1", "--batch-size", "8", "--no-plots",
                     "--out", out, "--force")
    _, _, err = result
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert result[0] == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert "cannot write" in lines[0] and "No space left on device" in lines[0], lines[0]
    assert out.read_bytes() == SHIPPED_PT.read_bytes()
    assert sorted(p.name for p in disk.iterdir()) == ["cnn.pt"]  # no temp file, no half checkpoint


# ------------------------------------------------------------------------------- 8. training options


@pytest.mark.parametrize("args, fragment", [
    (("--lr", "inf"), "--lr inf"), (("--lr", "nan"), "--lr nan"), (("--lr", "0"), "--lr 0.0"),
    (("--label-smoothing", "5"), "--label-smoothing 5.0"),  # was ZeroDivisionError (exit 4)
    (("--momentum", "-1"), "--momentum -1.0"), (("--weight-decay", "-1"), "--weight-decay -1.0"),  # were ValueError
    (("--limit", "-24000"), "--limit -24000"),  # trained on 345 images
    (("--limit", "0"), "--limit 0"), (("--epochs", "0"), "--epochs 0"), (("--batch-size", "-2"), "--batch-size -2"),
    (("--seed", "-1"), "--seed -1"), (("--val-fraction", "nan"), "--val-fraction"),
    (("--resume", "--arch", "vgg_mini", "--epochs", "9"), "--arch, --epochs cannot change"),  # silently ignored
])
def test_impossible_training_options_are_refused_up_front(tmp_path, cnnedge, args, fragment):
    one_line(cnnedge("train", *args, "--out", tmp_path / "cnn.pt"), 2, fragment)
    assert list(tmp_path.iterdir()) == []


def test_train_refuses_an_existing_out_unless_forced_or_resumed(tmp_path, cnnedge):
    out = tmp_path / "cnn.pt"
    out.write_bytes(b"my model")
    one_line(cnnedge("train", "--out", out), 2, "cnn.pt already exists; pass --force")
    (tmp_path / "cnn.pt").unlink()
    (tmp_path / "cnn.metrics.json").write_text("{}")  # the metrics of an earlier run count too
    one_line(cnnedge("train", "--out", out), 2, "cnn.metrics.json already exists; pass --force")
    (tmp_path / "cnn.partial.pt").write_bytes(b"an interrupted run")
    one_line(cnnedge("train", "--out", out), 2, "cnn.partial.pt holds an unfinished run", "--resume", "--force")
    one_line(cnnedge("train", "--out", tmp_path / "other.pt", "--resume"), 2, "no interrupted run of")


def test_imagefolder_with_one_class_or_too_many_classes_is_refused_at_once(tmp_path, cnnedge):
    one = tmp_path / "one"
    shutil.copytree(ROOT / "samples" / "3", one / "three")
    one_line(cnnedge("train", "--dataset", f"imagefolder:{one}", "--out", tmp_path / "o.pt"), 2,
             "only class 'three' has images", "at least 2 classes")  # trained a "100%" model
    many = tmp_path / "many"
    for i in range(MAX_CLASSES + 1):
        (many / f"c{i}").mkdir(parents=True)
    one_line(cnnedge("train", "--dataset", f"imagefolder:{many}", "--out", tmp_path / "m.pt"), 2,
             "1,001 class folders", "at most 1,000 classes")  # 180 s and 10 GB before a MemoryError


def test_an_empty_class_folder_is_a_warning(tmp_path, capsys):
    from cnnedge.train.data import load_data

    empty = tmp_path / "empty"
    shutil.copytree(ROOT / "samples" / "3", empty / "three")
    shutil.copytree(ROOT / "samples" / "7", empty / "seven")
    (empty / "nine").mkdir()
    data = load_data(f"imagefolder:{empty}")
    assert data.class_names == ["nine", "seven", "three"] and set(data.y_train.tolist()) == {1, 2}
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and "nine: empty class folder" in lines[0], lines


def test_a_small_dataset_gets_a_recipe_that_fits_it():
    from cnnedge.train.trainer import MIN_STEPS, fit_to_dataset, resolve_hparams

    hp = resolve_hparams("edgenet", {})
    fitted, warning = fit_to_dataset(hp, {}, 54)  # greek/train without its validation images
    assert (hp["batch_size"], hp["epochs"]) == (8, 72) and hp["epochs"] * 7 >= MIN_STEPS  # was 128 and 3: 3 steps
    assert "small dataset (54 training images): batch 8 and 72 epochs, 504 optimizer steps" in fitted and warning is None
    hp = resolve_hparams("edgenet", {"batch_size": 64, "epochs": 3})  # the user's own choice is kept, and warned about
    fitted, warning = fit_to_dataset(hp, {"batch_size": 64, "epochs": 3}, 54)
    assert fitted is None and (hp["batch_size"], hp["epochs"]) == (64, 3) and "only 3 optimizer steps" in warning
    hp = resolve_hparams("edgenet", {})  # MNIST: the recipe as it is
    assert fit_to_dataset(hp, {}, 23_128) == (None, None) and (hp["batch_size"], hp["epochs"]) == (128, 3)


def test_the_one_cycle_schedule_never_steps_past_its_end():
    """3 epochs of 1 step each: the printed rate went 0.041 -> 4e-07 -> 0.041 (the schedule wrapped around)."""
    from cnnedge.train.trainer import make_scheduler, train_epoch

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 2))
    hp = {"optimizer": "sgd", "lr": 0.1, "momentum": 0.9, "weight_decay": 0.0, "schedule": "onecycle", "batch_size": 8,
          "epochs": 3, "loss": "cross-entropy", "label_smoothing": 0.0, "augment": False}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    scheduler = make_scheduler(optimizer, hp, steps_per_epoch=1)
    x, y = torch.rand(8, 1, 2, 2), torch.randint(0, 2, (8,))
    rates = []
    for _ in range(3):
        train_epoch(model, optimizer, scheduler, x, y, torch.arange(8), torch.zeros(1), torch.ones(1), hp, "cpu",
                    None, None, 1, total_steps=3)
        rates.append(optimizer.param_groups[0]["lr"])
    assert rates == sorted(rates, reverse=True) and rates[-1] < 1e-5, rates  # was [0.041, 4e-07, 0.041]


def test_the_checkpoint_is_published_after_its_metrics(tmp_path, cnnedge, monkeypatch):
    """A reader of --out during a run got KeyError 'metrics': --out now appears last, complete, with its metrics
    beside it; the epochs of the run go to <stem>.partial.pt, which the finished model replaces."""
    from cnnedge.train import trainer

    seen = []
    real_save = trainer.save_checkpoint

    def save(path, checkpoint, overwrite=True):
        seen.append((Path(path).name, checkpoint["complete"], (tmp_path / "m.metrics.json").exists()))
        real_save(path, checkpoint, overwrite)

    monkeypatch.setattr(trainer, "save_checkpoint", save)
    data = tmp_path / "digits"
    shutil.copytree(ROOT / "samples", data, ignore=shutil.ignore_patterns("*.py"))
    code, out, err = cnnedge("train", "--dataset", f"imagefolder:{data}", "--epochs", "2", "--batch-size", "8",
                             "--no-plots", "--out", tmp_path / "m.pt")
    assert code == 0, err
    assert seen == [("m.partial.pt", False, False), ("m.partial.pt", False, False), ("m.pt", True, True)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["digits", "m.metrics.json", "m.pt"]
    assert load_checkpoint(tmp_path / "m.pt")["metrics"]["validation_accuracy"] >= 0
    strict_json((tmp_path / "m.metrics.json").read_text())


# -------------------------------------------------------------------------------- 9. symlink loops


def test_a_recursive_glob_does_not_follow_links_to_folders(tmp_path):
    folder = tmp_path / "D" / "a"
    folder.mkdir(parents=True)
    shutil.copy(SAMPLE, folder / "x.png")
    os.symlink("..", folder / "up")  # two links to the parent: glob.glob ran for minutes
    os.symlink("..", folder / "up2")
    r = run_cli("predict", f"{tmp_path}/D/**/*.png", "--recursive", "--format", "json", timeout=120)
    assert r.returncode == 0, r.stderr
    assert [Path(res["path"]).name for res in strict_json(r.stdout)["results"]] == ["x.png"]  # once, not 41 times
    paths, _ = collect_inputs([f"{tmp_path}/D/**/*.png", folder, folder / "up" / "a" / "x.png"], recursive=True)
    assert paths == [f"{tmp_path}/D/a/x.png"]  # the same file by another way: one input


# -------------------------------------------------------------------- 10. control characters in names


def test_control_characters_in_file_names_are_shown_escaped(tmp_path):
    folder = tmp_path / "names"
    folder.mkdir()
    hostile = ["clear\x1b[2J\x1b]0;pwned\x07.png", "two\nlines.png", "bidi\u202egnp.png"]
    for name in hostile:
        (folder / name).write_bytes(b"not an image")
    shutil.copy(SAMPLE, folder / "ok\x1b[31m.jpg")
    for fmt in ("table", "csv", "json"):
        r = run_cli("predict", folder, "--format", fmt, env={"COLUMNS": "300"})
        assert r.returncode == 1, r.stderr
        assert "\x1b" not in r.stderr and "\x1b" not in r.stdout and "\u202e" not in r.stderr + r.stdout
        lines = r.stderr.splitlines()
        assert len(lines) == 3 and all(line.startswith("warning: ") for line in lines), lines  # one line each
        assert any("two\\x0alines.png: not a decodable image" in line for line in lines), lines
        assert any("clear\\x1b[2J\\x1b]0;pwned\\x07.png" in line for line in lines), lines
        if fmt == "json":  # JSON escapes them itself and keeps the exact name
            [ok] = [res for res in strict_json(r.stdout)["results"] if res["label"]]
            assert ok["path"].endswith("ok\x1b[31m.jpg")
        else:
            assert "ok\\x1b[31m.jpg" in r.stdout
    assert printable("a\x1b]0;t\x07b\u2028c") == "a\\x1b]0;t\\x07b\\u2028c" and printable("café ü") == "café ü"


def test_errors_escape_control_characters_too(tmp_path, cnnedge):
    model = tmp_path / "m\x1b[2J\n.onnx"
    one_line(cnnedge("predict", SAMPLE, "--model", model), 2, "m\\x1b[2J\\x0a.onnx: no such model file")


# ----------------------------------------------------------------------------------- 11. --save-crops


def test_save_crops_writes_whole_files_without_an_fsync_each(tmp_path, cnnedge, monkeypatch):
    syncs = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (syncs.append(fd), real_fsync(fd)))
    code, _, err = cnnedge("predict", "samples/", "--save-crops", tmp_path / "crops")
    assert code == 0, err
    crops = sorted((tmp_path / "crops").iterdir())
    assert len(crops) == 22 and all(cv2.imread(str(p), cv2.IMREAD_UNCHANGED).shape == (28, 28) for p in crops)
    assert len(syncs) <= 1  # the folder, once (it was 2 per crop: 44)


def test_save_crops_on_a_full_disk_is_one_line(small_disk, cnnedge):
    disk = small_disk(16)  # room for a few crops (a page each), not 22
    line = one_line(cnnedge("predict", "samples/", "--save-crops", disk / "crops"), 2, "cannot write", "No space left")
    assert "crops/" in line and not [p for p in (disk / "crops").iterdir() if p.name.startswith(".")]  # no temp left


# ------------------------------------------------------------------------------ 13. messages


def test_a_file_given_in_the_wrong_place_is_named_for_what_it_is(tmp_path, cnnedge):
    one_line(cnnedge("export", ROOT / "README.md", "--out", tmp_path / "x.onnx"), 2, "README.md", "a text file")
    line = one_line(cnnedge("export", MODEL, "--out", tmp_path / "x.onnx"), 2, "already an ONNX model",
                    "export takes a checkpoint")
    assert "malicious" not in line and "unpickle" not in line
    one_line(cnnedge("predict", SAMPLE, "--model", SHIPPED_PT), 2, "a PyTorch checkpoint, not an ONNX model",
             f"cnnedge export {SHIPPED_PT}")
    assert list(tmp_path.iterdir()) == []


def test_the_webcam_panel_ends_its_line_before_the_summary(tmp_path):
    source = write_clip(tmp_path / "clip.avi", 12)
    r = run_cli("webcam", "--source", source, "--no-window")
    assert r.returncode == 0, r.stderr
    last = r.stdout.rstrip("\n").splitlines()[-1]
    assert last.startswith("12 frames from ") and "╯" not in last, r.stdout[-400:]


# -------------------------------------------------------------------------------- 14. opsets


def test_every_advertised_opset_exports_and_the_next_is_refused(tmp_path, monkeypatch, cnnedge):
    monkeypatch.setenv("CNNEDGE_DATA", str(tmp_path / "no-data"))
    newest = ex.max_opset()
    assert newest >= 26  # onnxruntime 1.31 runs 26; onnx defines 28
    checkpoint = make_checkpoint(tmp_path / "k.pt", "keras_convnet")
    code, _, err = cnnedge("export", checkpoint, "--out", tmp_path / f"k{newest}.onnx", "--opset", newest)
    assert code == 0, err  # was "16 layer(s) disagree" (exit 3) at 26-28
    proto = onnx.load(str(tmp_path / f"k{newest}.onnx"))
    assert proto.opset_import[0].version == newest and all(layer["ok"] for layer in strict_json(
        (tmp_path / f"k{newest}.json").read_text())["layers"])
    if newest < onnx.defs.onnx_opset_version():
        one_line(cnnedge("export", checkpoint, "--out", tmp_path / "next.onnx", "--opset", newest + 1), 2,
                 f"choose 17 to {newest}")
