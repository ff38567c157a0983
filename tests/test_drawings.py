"""28x28 drawings that are not MNIST: what drawing apps and paint programs export.

A person draws on a 280 px canvas and the app shrinks it to 28x28: thin 1-2 px polylines filling about
21x17 px, placed by eye. Such an image must not be taken for an MNIST crop (used as is), and a folder of
them, in either polarity, must go through `cnnedge predict` like any other files. Real MNIST crops, on the
other hand, must stay untouched."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
from typer.testing import CliRunner

from cnnedge.cli import app
from cnnedge.infer import preprocess as P
from cnnedge.infer.files import read_idx
from cnnedge.synth import render_digit
from test_preprocess import check_mnist_geometry, stroke_width


def app_drawing(digit: int, rng: np.random.Generator, dark_ink: bool = False) -> np.ndarray:
    """A drawing app's 28x28 export of `digit`, white on black (or black on white with `dark_ink`)."""
    img = render_digit(digit, "app28", rng)
    light_ink = np.median(np.concatenate([img[0], img[-1]])) < 128
    return 255 - img if light_ink == dark_ink else img


def test_every_mnist_image_is_used_as_is(data_root):
    """The whole MNIST training set and test set, in both polarities, pass the "already MNIST" rule."""
    for name in ("train", "t10k"):
        images = read_idx(data_root / f"MNIST/raw/{name}-images-idx3-ubyte").astype(np.float32) / 255
        assert P.mnist_like(images).all(), name
        ready = P._passthrough(1.0 - images[:3000])
        assert all(r is not None and not r.light_ink for r in ready)
        np.testing.assert_allclose(np.stack([r.input for r in ready]), images[:3000], atol=1e-6)


def test_app_drawings_get_the_full_normalisation():
    rng = np.random.default_rng(13)
    results = [P.analyse(app_drawing(i % 10, rng, dark_ink=i % 3 == 0)) for i in range(200)]
    passed = [r.passthrough for r in results]
    assert np.mean(passed) <= 0.05  # only a drawing that happens to have MNIST's geometry is used as is
    for r in results:
        if not r.passthrough:
            check_mnist_geometry(r.input)  # fitted into 20x20 and centred by mass
    widths = [stroke_width(r.input) for r, p in zip(results, passed) if not p]
    assert 1.6 <= np.median(widths) <= 3.2  # thickened to MNIST's pen, not left at 1-2 px


def test_what_predict_uses_as_is_is_mnist_geometry():
    """Our own output is MNIST-like (so preprocessing twice changes nothing), an app drawing is not, and the
    same drawing padded, shifted or squeezed is not either."""
    rng = np.random.default_rng(5)
    drawing = app_drawing(3, rng)
    normalised = P.analyse(drawing).input
    assert P.mnist_like(normalised[None])[0]
    shifted = np.roll(normalised, 3, axis=1)  # mass 3 px off the centre
    small = cv2.resize(normalised, (20, 20), interpolation=cv2.INTER_AREA)
    boxed = np.zeros((28, 28), np.float32)  # the box shrunk to 14 px
    boxed[7:21, 7:21] = cv2.resize(small, (14, 14), interpolation=cv2.INTER_AREA)
    assert not P.mnist_like(np.stack([shifted, boxed])).any()


@pytest.mark.parametrize("count", [1, 40])
def test_folders_of_dark_on_white_drawings_go_through_predict(tmp_path, count):
    """The issue's crash: a folder of 28x28 8-bit grey files that are all dark ink on white (none of them
    MNIST-like) made `cnnedge predict` exit 4 on an empty stack."""
    rng = np.random.default_rng(count)
    truth = []
    for i in range(count):
        d = (i + 4) % 10
        (tmp_path / str(d)).mkdir(exist_ok=True)
        cv2.imwrite(str(tmp_path / str(d) / f"drawing_{i}.png"), app_drawing(d, rng, dark_ink=True))
        truth.append(str(d))
    r = CliRunner().invoke(app, ["predict", str(tmp_path), "--format", "json"])
    assert r.exit_code == 0, r.output
    results = json.loads(r.stdout)["results"]
    assert len(results) == count and all(res["error"] is None and res["label"] is not None for res in results)
    if count > 1:
        assert np.mean([res["label"] == res["truth"] for res in results]) >= 0.85
