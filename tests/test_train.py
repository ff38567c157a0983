"""`cnnedge train` end to end on the real MNIST files: accuracy, outputs, reproducibility, resume, refusals."""

from __future__ import annotations

import json
import signal

import cv2
import numpy as np
import pytest
import torch

from cnnedge.train.checkpoint import load_checkpoint, model_from_checkpoint
from cnnedge.train.data import load_data
from conftest import SMALL_TRAIN, assert_one_line_error, cli, run_cli, start_paused_at_epoch

NO_PLOTS = (*SMALL_TRAIN, "--no-plots")

def _metrics(out) -> dict:
    return json.loads(out.with_name(out.stem + ".metrics.json").read_text())


def test_a_run_writes_its_report_plots_and_a_checkpoint_that_scores_what_it_says(small_model, data_root):
    out, result = small_model
    metrics = _metrics(out)
    assert 0.9 < metrics["test_accuracy"] <= 1  # a fraction, not a percentage; 2,000 images learn that much
    cm = np.array(metrics["confusion_matrix"])
    assert cm.shape == (10, 10) and cm.sum() == 10_000
    assert abs(np.trace(cm) / cm.sum() - metrics["test_accuracy"]) < 1e-9
    assert set(metrics["per_class_accuracy"]) == {str(i) for i in range(10)}
    assert [h["epoch"] for h in metrics["history"]] == [1, 2] and [h["threads"] for h in metrics["history"]] == [1, 1]
    for suffix in (".curves.png", ".confusion.png", ".samples.png", ".predictions.png"):
        image = cv2.imread(str(out.with_name(out.stem + suffix)))
        assert image is not None and image.shape[0] > 100
    assert "test accuracy" in result.stdout and "confusion matrix" in result.stdout

    checkpoint = load_checkpoint(out)
    assert checkpoint["complete"] and checkpoint["arch"] == "edgenet" and checkpoint["dataset"] == "mnist"
    assert checkpoint["command"].startswith("cnnedge train --limit 2000 --epochs 2")
    assert checkpoint["input_shape"] == [1, 28, 28] and checkpoint["preprocess"] == "digit"
    assert "optimizer_state" not in checkpoint  # a finished model ships without training state

    # Round trip: the reloaded network scores exactly what the run reported.
    model = model_from_checkpoint(checkpoint)
    data = load_data("mnist", data_root)
    mean, std = checkpoint["mean"][0], checkpoint["std"][0]
    with torch.no_grad():
        preds = model((data.x_test - mean) / std).argmax(1)
    assert int((preds == data.y_test).sum()) == round(metrics["test_accuracy"] * 10_000)


@pytest.mark.slow
def test_one_epoch_on_real_mnist_beats_98_percent(tmp_path, data_root):
    out = tmp_path / "cnn.pt"
    result = run_cli("train", "--epochs", "1", "--no-plots", "--out", out)
    assert result.returncode == 0, result.stderr
    metrics = _metrics(out)
    assert metrics["test_accuracy"] >= 0.98, metrics["test_accuracy"]
    assert np.array(metrics["confusion_matrix"]).sum() == 10_000 and load_checkpoint(out)["complete"]


def test_same_seed_same_metrics(small_model, tmp_path):
    out = tmp_path / "again.pt"
    assert cli("train", *NO_PLOTS, "--out", out).returncode == 0
    first, second = _metrics(small_model[0]), _metrics(out)
    assert not list(out.parent.glob("*.png"))  # --no-plots: no curves, confusion, samples or predictions PNG
    assert first["test_accuracy"] == second["test_accuracy"]
    assert [h["train_loss"] for h in first["history"]] == [h["train_loss"] for h in second["history"]]
    other = tmp_path / "other.pt"
    assert cli("train", *NO_PLOTS, "--seed", "2", "--out", other).returncode == 0  # the last --seed wins
    assert _metrics(other)["history"][0]["train_loss"] != first["history"][0]["train_loss"]


def test_interrupt_keeps_last_epoch_and_resume_matches_uninterrupted_run(small_model, tmp_path):
    out = tmp_path / "resumed.pt"
    proc, lines = start_paused_at_epoch(2, "train", *NO_PLOTS, "--out", out)  # paused at epoch 2's start
    assert any(line.startswith("epoch 1/2") for line in lines), lines
    proc.send_signal(signal.SIGINT)  # a real Ctrl-C from outside, in epoch 2
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "interrupted during epoch 2" in stderr and "Traceback" not in stderr
    assert not out.exists()  # --out only ever holds a finished model
    saved = load_checkpoint(out.with_name("resumed.partial.pt"))
    assert saved["epoch"] == 1 and not saved["complete"]

    result = cli("train", "--out", out, "--resume")
    assert result.returncode == 0, result.stderr
    assert "resuming" in result.stdout
    assert not out.with_name("resumed.partial.pt").exists() and load_checkpoint(out)["complete"]
    resumed, reference = _metrics(out), _metrics(small_model[0])
    assert resumed["test_accuracy"] == reference["test_accuracy"]
    assert [h["train_loss"] for h in resumed["history"]] == [h["train_loss"] for h in reference["history"]]


def test_mse_loss_with_sgd_learns(tmp_path, data_root):
    out = tmp_path / "mse.pt"
    result = cli("train", "--limit", "4000", "--epochs", "2", "--loss", "mse", "--optimizer", "sgd",
                 "--lr", "0.5", "--schedule", "constant", "--no-plots", "--out", out)
    assert result.returncode == 0, result.stderr
    assert _metrics(out)["test_accuracy"] > 0.85


def test_refuses_files_that_are_not_checkpoints(tmp_path):
    garbage = tmp_path / "cnn.pt"
    garbage.write_bytes(b"definitely not a zip or a pickle")
    assert_one_line_error(cli("train", "--out", garbage, "--resume"), 2, str(garbage), "not a cnnedge checkpoint")
    bare = tmp_path / "bare.pt"
    torch.save({"conv1.weight": torch.zeros(1)}, bare)  # a plain state_dict is not enough
    assert_one_line_error(cli("train", "--from", bare, "--out", tmp_path / "x.pt"), 2, "not a cnnedge checkpoint")
    assert not (tmp_path / "x.pt").exists()


def test_unknown_arch_and_unavailable_device(tmp_path):
    assert_one_line_error(cli("train", "--arch", "resnet9000", "--out", tmp_path / "a.pt"), 2, "unknown architecture")
    if not torch.cuda.is_available():
        assert_one_line_error(cli("train", "--device", "cuda", "--out", tmp_path / "b.pt"), 2, "--device cuda")
