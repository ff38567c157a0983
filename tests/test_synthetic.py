"""Synthetic handwriting mixed into training: the ways of writing MNIST under-represents (cnnedge.synth),
rendered once in MNIST's format, cached, added to a digits training split only (never to validation or
test)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cnnedge import synth
from cnnedge.infer import preprocess as P
from cnnedge.train import data as D


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return tmp_path / "cache" / "cnnedge" / "synth"


def test_synthetic_digits_are_in_mnist_format_with_every_variant():
    images, labels = synth.mnist_digits(400, seed=3)
    assert images.shape == (400, 28, 28) and images.dtype == np.uint8
    assert np.bincount(labels).tolist() == [40] * 10
    x = images.astype(np.float32) / 255
    assert P.mnist_like(x).mean() >= 0.95  # fitted into 20x20 and centred by mass, like MNIST
    widths = [P._stroke_width((im > 0.5).astype(np.uint8)) for im in x]
    assert min(widths) < 1.8 and max(widths) > 3.5  # thin uniform pens and bold ones
    # The same seed gives the same images; the first of a larger set are a smaller set.
    np.testing.assert_array_equal(synth.mnist_digits(50, seed=3)[0], images[:50])


def test_unusual_variants_are_drawn():
    """Every skeleton (closed-top and crossed 4s, open-top 6s, g-like 9s, crossed zeros...) appears."""
    rng = np.random.default_rng(0)
    for digit, variants in synth.UNUSUAL_VARIANTS.items():
        for v in variants:
            strokes = synth.digit_strokes(digit, rng, v)
            allp = np.vstack(strokes)
            assert np.ptp(allp[:, 1]) == pytest.approx(1.0)  # height 1, centred
    assert all(len(synth.ALL_VARIANTS[d]) > synth.COMMON_VARIANTS[d] for d in range(10) if d not in (2, 3, 5))


def test_rendered_once_then_read_from_the_cache(cache, monkeypatch):
    x, y = D.synthetic_digits(120, seed=0)
    assert x.shape == (120, 1, 28, 28) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert 0 <= x.min() and x.max() == 1
    [file] = cache.iterdir()
    monkeypatch.setattr(synth, "mnist_digits", lambda *a: pytest.fail("rendered again"))
    x2, y2 = D.synthetic_digits(80, seed=0)  # fewer: the first of the cached ones
    assert torch.equal(x2, x[:80]) and torch.equal(y2, y[:80])
    assert list(cache.iterdir()) == [file]


def test_a_damaged_or_unwritable_cache_only_costs_the_rendering(cache, monkeypatch):
    x, _ = D.synthetic_digits(30, seed=0)
    [file] = cache.iterdir()
    file.write_bytes(b"not an npz file")
    x2, _ = D.synthetic_digits(30, seed=0)
    assert torch.equal(x, x2)
    monkeypatch.setenv("XDG_CACHE_HOME", "/proc/no-such-cache")  # cannot be created
    x3, _ = D.synthetic_digits(30, seed=0)
    assert torch.equal(x, x3)


def fake_data(name, class_names=D.DIGITS, n=200):
    x = torch.rand(n, 1, 28, 28)
    return D.Data(name, x, torch.arange(n) % len(class_names), x[:50], torch.zeros(50, dtype=torch.long),
                  class_names, "digit", "")


def test_added_to_the_training_split_only():
    data = fake_data("mnist")
    train_idx, val_idx = D.split_validation(200, 0.1, 0)
    test_before = data.x_test.clone()
    new_idx, added = D.add_synthetic(data, train_idx, 0.25, seed=0)
    assert added == round(0.25 * len(train_idx)) and len(data.x_train) == 200 + added
    assert torch.equal(new_idx[: len(train_idx)], train_idx) and (new_idx[len(train_idx):] >= 200).all()
    assert (val_idx < 200).all() and torch.equal(data.x_test, test_before)
    assert torch.bincount(data.y_train[200:], minlength=10).min() >= added // 10


@pytest.mark.parametrize("name", ["fashion-mnist", "kmnist", "imagefolder:/my/digits"])
def test_not_added_to_other_datasets(name):
    data = fake_data(name)
    train_idx = torch.arange(150)
    new_idx, added = D.add_synthetic(data, train_idx, 0.5, seed=0)
    assert added == 0 and new_idx is train_idx and len(data.x_train) == 200


def test_the_default_recipe_mixes_them_in(tmp_path, data_root, monkeypatch, capsys):
    """`cnnedge train` adds them to the training split and says so; the checkpoint records the fraction.
    (On the first 1,000 MNIST images, to be quick; --limit itself means those images alone.)"""
    from cnnedge.train import trainer
    from cnnedge.train.checkpoint import load_checkpoint
    from cnnedge.train.zoo import get_arch

    def first_images(*args):
        data = D.load_data(*args)
        data.x_train, data.y_train = data.x_train[:1000], data.y_train[:1000]
        return data

    monkeypatch.setattr(trainer, "load_data", first_images)
    fraction = get_arch("edgenet").recipe["synthetic"]
    out = tmp_path / "cnn.pt"
    trainer.run(trainer.TrainConfig(out=str(out), plots=False, hparams={"epochs": 1}))
    added = round(fraction * 950)  # 5% held out for validation
    assert f"(950 train + {added} synthetic / 50 val / 10,000 test)" in capsys.readouterr().out
    assert load_checkpoint(out)["hparams"]["synthetic"] == fraction
    trainer.run(trainer.TrainConfig(out=str(tmp_path / "limited.pt"), plots=False, hparams={"epochs": 1}, limit=1000))
    assert "(950 train / 50 val / 10,000 test)" in capsys.readouterr().out
