"""Datasets read in place from the shared data through torchvision and the ImageFolder loader."""

from __future__ import annotations

import torch

from cnnedge.train.data import augment_batch, load_data, normalization, split_validation
from conftest import assert_one_line_error, cli


def test_mnist_idx_files_through_torchvision(data_root):
    data = load_data("mnist", data_root)
    assert data.x_train.shape == (24_345, 1, 28, 28) and data.x_test.shape == (10_000, 1, 28, 28)
    assert data.x_train.dtype == torch.float32 and 0.0 == data.x_train.min() and data.x_train.max() == 1.0
    counts = torch.bincount(data.y_train, minlength=10)
    assert counts.min() == 2_181 and counts.max() == 2_770  # as the data README documents
    assert torch.bincount(data.y_test).tolist()[:3] == [980, 1_135, 1_032]  # the official test set
    assert data.class_names == [str(i) for i in range(10)] and data.preprocess == "digit"
    mean, std = normalization(data.x_train)
    assert abs(mean[0] - 0.1307) < 0.003 and abs(std[0] - 0.3081) < 0.003


def test_data_dir_falls_back_to_environment(data_root, monkeypatch):
    monkeypatch.setenv("CNNEDGE_DATA", str(data_root))
    assert len(load_data("mnist").x_test) == 10_000


def test_missing_dataset_names_files_and_folder(tmp_path):
    result = cli("train", "--data-dir", tmp_path, "--out", tmp_path / "m.pt")
    assert_one_line_error(result, 2, "train-images-idx3-ubyte", "t10k-labels-idx1-ubyte", str(tmp_path / "MNIST" / "raw"))
    assert not (tmp_path / "m.pt").exists()


def test_unknown_dataset(tmp_path):
    assert_one_line_error(cli("train", "--dataset", "cifar", "--out", tmp_path / "m.pt"), 2, "unknown dataset 'cifar'")


def test_imagefolder_is_preprocessed_like_predict(greek_dir):
    data = load_data(f"imagefolder:{greek_dir}")
    assert data.class_names == ["alpha", "beta", "delta", "epsilon", "gamma", "lambda"]
    assert data.x_train.shape == (54, 1, 28, 28) and data.x_test.shape == (24, 1, 28, 28)
    assert torch.bincount(data.y_train).tolist() == [9] * 6
    # MNIST convention: white symbol on a black border, not dark ink on grey paper.
    border = torch.cat([data.x_train[:, 0, :3].flatten(), data.x_train[:, 0, -3:].flatten()])
    assert border.mean() < 0.02 and data.x_train.amax(dim=(1, 2, 3)).min() > 0.5


def test_validation_split_is_seeded_and_disjoint():
    train, val = split_validation(1000, 0.1, seed=3)
    again, val_again = split_validation(1000, 0.1, seed=3)
    assert torch.equal(train, again) and torch.equal(val, val_again) and len(val) == 100
    assert sorted(torch.cat([train, val]).tolist()) == list(range(1000))
    assert not torch.equal(val, split_validation(1000, 0.1, seed=4)[1])


def test_augmentation_is_per_sample_and_seeded(data_root):
    x = load_data("mnist", data_root).x_test[:64]
    torch.manual_seed(0)
    a = augment_batch(x)
    torch.manual_seed(0)
    b = augment_batch(x)
    assert torch.equal(a, b) and a.shape == x.shape
    assert a.min() >= 0 and a.max() <= 1
    moved = (a - x).abs().flatten(1).mean(1)
    assert (moved > 0.005).float().mean() > 0.9  # nearly every image changed, each its own way
    assert moved.std() > 0.005
