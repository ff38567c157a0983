"""Fine-tuning the shipped digits model on greek/ (54 photographed letters, 6 classes): the recipe, the
export of the new 6-class model, its accuracy on the 24 test images, and the few-shot baseline it must beat."""

from __future__ import annotations

import json

import pytest
import torch

from cnnedge.train.checkpoint import load_checkpoint
from cnnedge.train.trainer import FINETUNE_HPARAMS
from conftest import ROOT, assert_one_line_error, cli

SOURCE = ROOT / "models/cnn.pt"  # the shipped digits model (MNIST)
DIGITS_ONNX = ROOT / "export/cnn.onnx"  # its shipped export
GREEK = ["alpha", "beta", "delta", "epsilon", "gamma", "lambda"]


def _summary(*args) -> dict:
    result = cli("predict", *args, "--format", "json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)["summary"]


@pytest.fixture(scope="module")
def fine_tuned(tmp_path_factory, greek_dir):
    """`cnnedge train --from models/cnn.pt` on greek/ with the default fine-tuning recipe, then `cnnedge export`."""
    folder = tmp_path_factory.mktemp("finetune")
    out, onnx = folder / "greek.pt", folder / "greek.onnx"
    result = cli("train", "--dataset", f"imagefolder:{greek_dir}", "--from", SOURCE, "--seed", "0", "--out", out)
    assert result.returncode == 0, result.stderr
    assert "fine-tuning" in result.stdout and "54 train / 0 val / 24 test" in result.stdout
    exported = cli("export", out, "--out", onnx)
    assert exported.returncode == 0, exported.stderr
    return out, onnx


def test_fine_tuned_export_scores_at_least_95_percent_on_greek_test(fine_tuned, greek_dir):
    out, onnx = fine_tuned
    summary = _summary(greek_dir / "test", "--model", onnx)
    assert summary["images"] == summary["labelled"] == 24 and summary["errors"] == 0
    assert summary["class_names"] == GREEK
    assert summary["accuracy"] >= 0.95, summary["confusion_matrix"]  # at most 1 of 24 wrong
    # The ONNX model and PyTorch (the training report) agree on every test image.
    metrics = json.loads(out.with_name("greek.metrics.json").read_text())
    assert metrics["confusion_matrix"] == summary["confusion_matrix"]


def test_fine_tuned_checkpoint_has_a_six_class_head_and_the_fine_tuning_recipe(fine_tuned):
    out, onnx = fine_tuned
    checkpoint = load_checkpoint(out)
    assert checkpoint["complete"] and checkpoint["num_classes"] == 6 and checkpoint["class_names"] == GREEK
    assert checkpoint["state_dict"]["fc2.weight"].shape == (6, 128)
    assert checkpoint["fine_tuned_from"]["dataset"] == "mnist"
    source = load_checkpoint(SOURCE)
    assert (checkpoint["mean"], checkpoint["std"], checkpoint["preprocess"]) == (source["mean"], source["std"], source["preprocess"])
    assert {k: checkpoint["hparams"][k] for k in FINETUNE_HPARAMS} == FINETUNE_HPARAMS
    assert checkpoint["config"]["val_fraction"] == 0  # every one of the 54 images trains; test/ reports
    # The backbone moved (it is fine-tuned, not frozen), and kept the source's BatchNorm statistics.
    assert not torch.equal(checkpoint["state_dict"]["conv1.weight"], source["state_dict"]["conv1.weight"])
    assert torch.equal(checkpoint["state_dict"]["bn2.running_var"], source["state_dict"]["bn2.running_var"])
    assert out.with_name("greek.curves.png").is_file() and out.with_name("greek.confusion.png").is_file()
    # The export checked the layer table adapted to the 6-class head.
    report = json.loads(onnx.with_suffix(".json").read_text())
    head = next(row for row in report["layers"] if row["name"] == "fc2")
    assert head["documented"] == head["torch"] == head["onnx"] == [6] and head["parameters"] == 128 * 6 + 6 and head["ok"]


def test_fine_tuning_beats_few_shot_with_the_digits_model(fine_tuned, greek_dir, tmp_path):
    """Few-shot: embed greek/train with the digits model, classify by the nearest class prototype. Fine-tuning
    adapts the features themselves to the new symbols, so it must do at least as well."""
    gallery = tmp_path / "greek.gallery.npz"
    enrolled = cli("enroll", greek_dir / "train", "--out", gallery, "--model", DIGITS_ONNX)
    assert enrolled.returncode == 0, enrolled.stderr
    few_shot = _summary(greek_dir / "test", "--model", DIGITS_ONNX, "--gallery", gallery)
    assert few_shot["images"] == 24 and few_shot["class_names"] == GREEK
    fine = _summary(greek_dir / "test", "--model", fine_tuned[1])
    assert fine["accuracy"] >= few_shot["accuracy"], (fine["confusion_matrix"], few_shot["confusion_matrix"])


def test_freeze_backbone_trains_only_the_head_and_options_override_the_recipe(greek_dir, tmp_path):
    out = tmp_path / "frozen.pt"
    result = cli("train", "--dataset", f"imagefolder:{greek_dir}", "--from", SOURCE, "--freeze-backbone",
                     "--epochs", "4", "--batch-size", "8", "--no-plots", "--out", out)
    assert result.returncode == 0, result.stderr
    assert "backbone frozen" in result.stdout
    tuned, source = load_checkpoint(out), load_checkpoint(SOURCE)
    assert tuned["hparams"]["epochs"] == 4 and tuned["hparams"]["batch_size"] == 8  # given: they win
    assert tuned["hparams"]["optimizer"] == FINETUNE_HPARAMS["optimizer"]  # not given: the fine-tuning recipe
    assert len(tuned["history"]) == 4
    backbone = [k for k in source["state_dict"] if not k.startswith("fc2.")]
    assert backbone and all(torch.equal(tuned["state_dict"][k], source["state_dict"][k]) for k in backbone)
    assert tuned["state_dict"]["fc2.weight"].shape == (6, 128) and tuned["state_dict"]["fc2.bias"].shape == (6,)
    assert tuned["history"][-1]["train_loss"] < tuned["history"][0]["train_loss"]  # the head did learn


def test_refusals_are_one_line_and_write_nothing(greek_dir, tmp_path):
    out = tmp_path / "x.pt"
    assert_one_line_error(cli("train", "--freeze-backbone", "--out", out), 2, "--freeze-backbone needs --from")
    # greek/train alone has no test split: with no validation images there is nothing to report on.
    assert_one_line_error(cli("train", "--dataset", f"imagefolder:{greek_dir / 'train'}", "--from", SOURCE,
                                  "--val-fraction", "0", "--out", out), 2, "no test split", "--val-fraction")
    assert_one_line_error(cli("train", "--dataset", f"imagefolder:{greek_dir}", "--from", SOURCE,
                                  "--val-fraction", "1.5", "--out", out), 2, "--val-fraction")
    assert not out.exists()
