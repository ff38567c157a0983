"""`cnnedge predict` and the Predictor API on real photos, MNIST files, the shipped samples and synthetic
handwriting, through the shipped export/cnn.onnx."""

from __future__ import annotations

import csv
import io
import json
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest

from conftest import MODEL, ROOT, assert_one_line_error, run_cli, run_torch_free
from cnnedge.infer.files import collect_inputs, read_idx
from cnnedge.infer.predictor import Predictor
from cnnedge.synth import HANDWRITING_STYLES, render_digit

SAMPLES = ROOT / "samples"
N_SAMPLES = sum(1 for p in SAMPLES.rglob("*") if p.is_file() and p.suffix != ".py")


@pytest.fixture(scope="module")
def predictor():
    with Predictor(MODEL, "cpu") as p:
        yield p


def test_real_handwritten_photos_all_right_through_the_cli(handwritten_dir):
    r = run_cli("predict", handwritten_dir, "--format", "json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert len(doc["results"]) == 10
    for res in doc["results"]:
        assert res["error"] is None and res["label"] == res["truth"], res
    assert doc["summary"]["accuracy"] == 1.0
    assert doc["summary"]["confusion_matrix"] == np.eye(10, dtype=int).tolist()


def test_samples_table_shows_accuracy_and_they_are_right():
    r = run_cli("predict", "samples/")
    assert r.returncode == 0, r.stderr
    assert f"accuracy 100.00% ({N_SAMPLES}/{N_SAMPLES} in class folders)" in r.stdout
    assert "per-class accuracy" in r.stdout and "confusion matrix" in r.stdout
    assert "provider cpu" in r.stdout


def test_samples_cover_the_kinds_the_issue_lists():
    files = [p for p in SAMPLES.rglob("*") if p.is_file() and p.suffix != ".py"]
    assert 15 <= len(files) <= 25
    assert {p.parent.name for p in files} == {str(d) for d in range(10)}
    kinds = {p.suffix.lower() for p in files}
    assert {".png", ".jpg", ".webp", ".bmp", ".tif"} <= kinds
    decoded = [cv2.imread(str(p), cv2.IMREAD_UNCHANGED) for p in files]
    assert any(d.dtype == np.uint16 for d in decoded)
    assert any(d.ndim == 3 and d.shape[2] == 4 for d in decoded)
    assert any(d.shape[:2] == (28, 28) for d in decoded)
    assert any(max(d.shape[:2]) >= 800 for d in decoded)


def test_mnist_test_set_as_png_keeps_the_model_accuracy(data_root, tmp_path, predictor):
    images = read_idx(data_root / "MNIST/raw/t10k-images-idx3-ubyte")
    labels = read_idx(data_root / "MNIST/raw/t10k-labels-idx1-ubyte")
    for i, (img, y) in enumerate(zip(images, labels)):
        folder = tmp_path / str(y)
        folder.mkdir(exist_ok=True)
        cv2.imwrite(str(folder / f"{i:05d}.png"), img)
    preds = predictor.predict(tmp_path)
    assert len(preds) == 10_000 and all(p.error is None for p in preds)
    accuracy = np.mean([p.label == p.truth for p in preds])
    direct = predictor.runtime.probabilities(images.astype(np.float32) / 255).argmax(1)
    assert accuracy == pytest.approx(np.mean(direct == labels), abs=1e-9)  # not one image changed its answer
    assert accuracy >= predictor.info.test_accuracy - 1e-9


def test_synthetic_realistic_handwriting(tmp_path, predictor):
    """Pen photos, thin canvases, RGBA marker, light on dark, off-centre with specks and page edges,
    16-bit, pencil: 12 images per style, written as files and read back through the predictor."""
    truth, paths = [], []
    for style in HANDWRITING_STYLES:
        rng = np.random.default_rng([123, zlib.crc32(style.encode())])
        for i in range(12):
            d = i % 10
            path = tmp_path / f"{style}_{i}.png"
            cv2.imwrite(str(path), render_digit(d, style, rng))
            paths.append(str(path))
            truth.append(str(d))
    preds = predictor.predict(paths)
    ok = np.array([p.label == t for p, t in zip(preds, truth)])
    assert ok.mean() >= 0.93, ok.mean()
    per_style = ok.reshape(len(HANDWRITING_STYLES), 12).mean(axis=1)
    assert per_style.min() >= 0.75, dict(zip(HANDWRITING_STYLES, per_style))


def write_batch(tmp_path):
    good = tmp_path / "good"
    good.mkdir()
    rng = np.random.default_rng(3)
    for d in (2, 7):
        cv2.imwrite(str(good / f"digit_{d}.png"), render_digit(d, "paper", rng))
    (tmp_path / "notes.png").write_text("this is text, not a picture\n")
    (tmp_path / "zero.jpg").write_bytes(b"")
    (tmp_path / "empty_folder").mkdir()
    return good


def test_bad_inputs_are_one_line_each_and_the_rest_still_runs(tmp_path):
    good = write_batch(tmp_path)
    r = run_cli("predict", good, tmp_path / "notes.png", tmp_path / "zero.jpg", tmp_path / "empty_folder",
                tmp_path / "missing.png", "--format", "json")
    assert r.returncode == 1, (r.stdout, r.stderr)
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 4, r.stderr
    assert "Traceback" not in r.stderr
    for name, reason in (("notes.png", "not a decodable image"), ("zero.jpg", "empty file"),
                         ("empty_folder", "no "), ("missing.png", "no such file")):
        assert any(name in line and reason in line for line in lines), (name, lines)
    doc = json.loads(r.stdout)
    by_name = {res["path"].split("/")[-1]: res for res in doc["results"]}
    assert by_name["digit_2.png"]["label"] == "2" and by_name["digit_7.png"]["label"] == "7"
    assert by_name["notes.png"]["label"] is None and "decodable" in by_name["notes.png"]["error"]
    assert by_name["zero.jpg"]["label"] is None and by_name["zero.jpg"]["confidence"] is None
    assert doc["summary"]["images"] == 4 and doc["summary"]["errors"] == 2


def test_json_schema(tmp_path):
    good = write_batch(tmp_path)
    r = run_cli("predict", good, "--format", "json", "--topk", "4")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert set(doc) == {"model", "runtime", "provider", "results", "summary"}
    assert doc["model"] == "export/cnn.onnx" and doc["runtime"] == "onnxruntime" and doc["provider"] == "cpu"
    for res in doc["results"]:
        assert {"path", "label", "confidence", "topk", "error"} <= set(res)
        assert res["error"] is None and isinstance(res["confidence"], float) and 0 < res["confidence"] <= 1
        probs = [t["probability"] for t in res["topk"]]
        assert len(probs) == 4 and probs == sorted(probs, reverse=True)
        assert res["topk"][0]["label"] == res["label"] and res["topk"][0]["probability"] == res["confidence"]
    s = doc["summary"]
    assert {"images", "errors", "seconds", "images_per_second", "accuracy"} <= set(s)
    assert s["images"] == 2 and s["errors"] == 0 and s["seconds"] > 0 and s["images_per_second"] > 0
    assert s["accuracy"] is None  # "good" is not a class folder


def test_csv(tmp_path):
    r = run_cli("predict", "samples/", "--format", "csv")
    assert r.returncode == 0, r.stderr
    rows = list(csv.DictReader(io.StringIO(r.stdout)))
    assert len(rows) == N_SAMPLES
    assert set(rows[0]) == {"path", "label", "confidence", "topk", "error", "truth"}
    for row in rows:
        assert row["label"] == row["truth"] and row["error"] == ""
        assert len(row["topk"].split(";")) == 3 and row["topk"].startswith(row["label"] + ":")


def test_cuda_that_cannot_load_is_one_line_and_exit_2():
    from cnnedge.errors import CnnedgeError
    from cnnedge.infer.runtime import Runtime

    try:
        Runtime(MODEL, "cuda")
        pytest.skip("CUDA really loads on this machine")
    except CnnedgeError:
        pass
    r = run_cli("predict", "samples/", "--provider", "cuda")
    assert_one_line_error(r, 2, "provider cuda")
    assert r.stdout == ""


def test_usage_errors_exit_2(tmp_path):
    assert_one_line_error(run_cli("predict", "samples/", "--model", tmp_path / "none.onnx"), 2, "no such model file")
    (tmp_path / "fake.onnx").write_bytes(b"\x00garbage")
    assert_one_line_error(run_cli("predict", "samples/", "--model", tmp_path / "fake.onnx"), 2, "not a loadable ONNX")
    assert_one_line_error(run_cli("predict", "samples/", "--format", "xml"), 2, "'xml' is not one of 'table', 'json', 'csv'")
    assert_one_line_error(run_cli("predict", "samples/", "--provider", "tpu"), 2, "'tpu' is not one of")
    r = run_cli("predict", tmp_path / "nothing_here_*.png")
    assert r.returncode == 2 and "no images to predict" in r.stderr and "Traceback" not in r.stderr


def test_predict_never_imports_torch():
    r = run_torch_free(["predict", "samples/", "--format", "json"])
    assert json.loads(r.stdout)["summary"]["accuracy"] == 1.0


def test_predictor_api_on_paths_and_arrays(predictor):
    paths = sorted(str(p) for p in SAMPLES.rglob("*") if p.is_file() and p.suffix != ".py")
    by_path = predictor.predict(paths)
    arrays = [cv2.imread(p, cv2.IMREAD_UNCHANGED) for p in paths]
    by_array = predictor.predict(arrays)
    assert [p.label for p in by_path] == [p.label for p in by_array] == [p.truth for p in by_path]
    for a, b in zip(by_path, by_array):
        assert b.path is None and a.confidence == pytest.approx(b.confidence, abs=1e-6)
    one = predictor.predict(paths[0])  # a single path works too
    assert len(one) == 1 and one[0].label == by_path[0].label
    grey = cv2.cvtColor(render_digit(4, "paper", np.random.default_rng(9)), cv2.COLOR_BGR2GRAY)
    inputs = [grey, cv2.cvtColor(grey, cv2.COLOR_GRAY2BGR), cv2.cvtColor(grey, cv2.COLOR_GRAY2BGRA),
              grey.astype(np.uint16) * 257]
    assert [p.label for p in predictor.predict(inputs)] == ["4"] * 4
    rng = np.random.default_rng(4)
    stack = np.stack([render_digit(d, "mnist", rng) for d in range(10)])  # (10, 28, 28): one image each
    assert [p.label for p in predictor.predict(stack)] == [str(d) for d in range(10)]
    blank = predictor.predict([np.full((50, 50), 255, np.uint8)])[0]
    assert blank.label is None and "no symbol" in blank.error


def test_save_crops_writes_the_network_inputs(tmp_path):
    out = tmp_path / "crops"
    r = run_cli("predict", "samples/", "--save-crops", out, "--format", "csv")
    assert r.returncode == 0, r.stderr
    crops = sorted(out.glob("*.png"))
    rows = list(csv.DictReader(io.StringIO(r.stdout)))
    assert len(crops) == len(rows) == N_SAMPLES
    for c, row in zip(crops, rows):  # named <index>_<file stem>_pred-<label>.png, in input order
        assert c.name.endswith(f"_{Path(row['path']).stem}_pred-{row['label']}.png"), (c.name, row)
        img = cv2.imread(str(c), cv2.IMREAD_UNCHANGED)
        assert img.shape == (28, 28) and img.dtype == np.uint8 and img.max() >= 230
        assert img[0].max() == 0 and img[-1].max() == 0  # black border, as MNIST


def test_inputs_from_folders_globs_and_recursion(tmp_path):
    deep = tmp_path / "a" / "b" / "c"
    deep.mkdir(parents=True)
    for folder in (tmp_path / "a", tmp_path / "a" / "b", deep):
        cv2.imwrite(str(folder / "x.png"), np.zeros((28, 28), np.uint8))
    (tmp_path / "a" / "readme.txt").write_text("not listed from a folder")
    (tmp_path / "a" / ".hidden.png").write_bytes(b"")
    found, problems = collect_inputs([tmp_path / "a"])
    assert sorted(p.split(str(tmp_path))[-1] for p in found) == ["/a/b/x.png", "/a/x.png"] and not problems
    found, _ = collect_inputs([tmp_path / "a"], recursive=True)
    assert len(found) == 3
    found, _ = collect_inputs([str(tmp_path / "a" / "*.png"), str(tmp_path / "a" / "x.png")])
    assert len(found) == 1  # duplicates removed
    found, problems = collect_inputs([str(tmp_path / "zzz*.png"), str(tmp_path / "nope.png")])
    assert not found and [p[1] for p in problems] == ["no file matches this pattern", "no such file or directory"]
