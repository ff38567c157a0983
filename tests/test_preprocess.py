"""The OpenCV preprocessing on what users really feed it (torch-free, numpy + OpenCV only)."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from cnnedge.errors import ImageError
from cnnedge.infer import files as F
from cnnedge.infer.files import read_idx
from cnnedge.infer import preprocess as P
from cnnedge.synth import STYLES, camera, digit_strokes, draw_strokes, render_digit

MODEL = "export/cnn.onnx"


def stroke_width(x: np.ndarray) -> float:
    """Stroke width of a 28x28 network input, measured like MNIST's (area / half perimeter at 0.5)."""
    return P._stroke_width((x > 0.5).astype(np.uint8))


def check_mnist_geometry(x: np.ndarray) -> None:
    """The MNIST recipe: 28x28 in [0, 1], box fitted into 20x20 (longer side 20), centre of mass at 14."""
    assert x.shape == (28, 28) and x.dtype == np.float32
    assert 0.0 <= x.min() and x.max() <= 1.0 and x.max() > 0.9
    ys, xs = np.nonzero(x > 0.05)
    longer = max(ys.max() - ys.min() + 1, xs.max() - xs.min() + 1)
    assert 19 <= longer <= 22, longer
    m = cv2.moments(x)
    assert abs(m["m10"] / m["m00"] - 14) <= 0.75 and abs(m["m01"] / m["m00"] - 14) <= 0.75


def similarity(a: np.ndarray, b: np.ndarray) -> float:
    """Correlation of two network inputs, a little blurred: 1 for the same shape, unmoved by a pixel's shift."""
    a, b = (cv2.GaussianBlur(x, (0, 0), 1.0).ravel() for x in (a, b))
    return float(np.corrcoef(a, b)[0, 1])


def digit_on(shape, digit, seed, height, width_px, dark_ink=True, centre=None):
    rng = np.random.default_rng(seed)
    h, w = shape
    cov = draw_strokes(shape, digit_strokes(digit, rng), centre or (w / 2, h / 2), height, width_px, rng)
    img = 1.0 - cov if dark_ink else cov
    return np.clip(img * 255 + 0.5, 0, 255).astype(np.uint8)


def test_mnist_test_images_pass_through_unchanged(data_root):
    images = read_idx(data_root / "MNIST/raw/t10k-images-idx3-ubyte")[:2000]
    for img in images:
        r = P.analyse(img)
        assert r.passthrough
        np.testing.assert_allclose(r.input, img.astype(np.float32) / 255, atol=1e-6)
    # the vectorised check predict uses on chunks of files agrees
    assert P.mnist_like(images.astype(np.float32) / 255).all()


def test_inverted_mnist_comes_back_as_mnist(data_root):
    images = read_idx(data_root / "MNIST/raw/t10k-images-idx3-ubyte")[:300]
    for img in images:
        r = P.analyse(255 - img)
        assert r.passthrough and not r.light_ink
        np.testing.assert_allclose(r.input, img.astype(np.float32) / 255, atol=1e-6)


def test_mnist_upscaled_onto_paper_goes_through_the_full_pipeline(data_root):
    """MNIST digits printed large, dark on a light page: the full pipeline (no pass-through) must give
    back MNIST's geometry and keep the model's accuracy on them."""
    from cnnedge.infer.runtime import Runtime

    images = read_idx(data_root / "MNIST/raw/t10k-images-idx3-ubyte")[:300]
    labels = read_idx(data_root / "MNIST/raw/t10k-labels-idx1-ubyte")[:300]
    xs, ious = [], []
    for img in images:
        r = P.analyse(cv2.resize(255 - img, (280, 280), interpolation=cv2.INTER_CUBIC))
        assert not r.passthrough and not r.light_ink
        check_mnist_geometry(r.input)
        a, b = r.input > 0.5, img > 127
        ious.append((a & b).sum() / (a | b).sum())
        xs.append(r.input)
    assert np.median(ious) > 0.7  # the same pixels light up as in the original
    rt = Runtime(MODEL, "cpu")
    direct = np.mean(rt.probabilities(images.astype(np.float32) / 255).argmax(1) == labels)
    through = np.mean(rt.probabilities(np.stack(xs)).argmax(1) == labels)
    assert through >= direct - 0.01, (through, direct)


@pytest.mark.parametrize("style", STYLES)
def test_every_style_gives_an_mnist_style_input(style):
    rng = np.random.default_rng(7)
    for digit in (0, 4, 8):
        image = render_digit(digit, style, rng)
        r = P.analyse(image)
        check_mnist_geometry(r.input)
        if style in ("app28", "canvas"):  # drawn in either polarity: a flat background tells which
            grey = P.to_gray(image)
            light = np.median(np.concatenate([grey[0], grey[-1], grey[:, 0], grey[:, -1]])) < 0.5
        else:
            light = style in ("mnist", "dark")
        assert r.light_ink == light


def test_thin_strokes_on_a_large_canvas_do_not_vanish():
    """A 1 px pen line on a 1200x1000 canvas is thinner than one pixel after a plain resize to 20x20;
    stroke width normalisation must make it as wide as MNIST's pen (about 2.2 px)."""
    img = digit_on((1000, 1200), 3, seed=1, height=800, width_px=1.0)
    naive = cv2.resize(255 - img, (24, 20), interpolation=cv2.INTER_AREA)
    assert naive.max() < 128  # what a naive resize gives: nothing above half intensity
    x = P.prepare(img)
    check_mnist_geometry(x)
    assert 1.6 <= stroke_width(x) <= 3.2


def test_fat_and_thin_pens_come_out_alike():
    thin = P.prepare(digit_on((600, 600), 8, seed=3, height=450, width_px=3))
    fat = P.prepare(digit_on((600, 600), 8, seed=3, height=450, width_px=70))
    assert abs(stroke_width(thin) - stroke_width(fat)) < 1.0
    a, b = thin > 0.5, fat > 0.5
    assert (a & b).sum() / (a | b).sum() > 0.5


def test_transparent_bgra_is_flattened_onto_white():
    cov = P.to_gray(digit_on((120, 100), 7, seed=2, height=90, width_px=14, dark_ink=False))  # 1 on strokes
    bgra = np.zeros((120, 100, 4), np.uint8)  # black under full transparency, as many apps store it
    bgra[:, :, 3] = np.clip(cov * 255, 0, 255).astype(np.uint8)
    grey = P.to_gray(bgra)
    assert grey[0, 0] == pytest.approx(1.0)  # transparent = white paper, not the black colour under it
    assert grey.min() < 0.1
    r = P.analyse(bgra)
    assert not r.light_ink
    check_mnist_geometry(r.input)


def test_white_ink_on_a_transparent_layer_is_flattened_onto_black():
    cov = P.to_gray(digit_on((120, 100), 2, seed=4, height=90, width_px=10, dark_ink=False))
    bgra = np.full((120, 100, 4), 255, np.uint8)
    bgra[:, :, 3] = np.clip(cov * 255, 0, 255).astype(np.uint8)
    grey = P.to_gray(bgra)
    assert grey[0, 0] == pytest.approx(0.0) and grey.max() > 0.9
    check_mnist_geometry(P.prepare(bgra))


def test_sixteen_bit_grey_and_colour_give_the_same_input():
    rng = np.random.default_rng(11)
    bgr = render_digit(5, "paper", rng)
    grey8 = cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY)
    grey16 = grey8.astype(np.uint16) * 257
    twelve_bit = (grey8.astype(np.uint16) * 16)  # a 12-bit sensor in a 16-bit file: everything looks dark
    ref = P.prepare(bgr)
    for variant in (grey8, grey16, twelve_bit, cv2.cvtColor(bgr, cv2.COLOR_BGR2BGRA)):
        x = P.prepare(variant)
        a, b = ref > 0.5, x > 0.5
        assert (a & b).sum() / (a | b).sum() > 0.8


def test_light_on_dark_equals_dark_on_light():
    img = digit_on((300, 260), 6, seed=5, height=200, width_px=12)
    a, b = P.analyse(img), P.analyse(255 - img)
    assert not a.light_ink and b.light_ink
    np.testing.assert_allclose(a.input, b.input, atol=0.02)


def test_shadow_and_gradient_are_normalised_away():
    img = digit_on((400, 400), 4, seed=6, height=260, width_px=10).astype(np.float32) / 255
    yy, xx = np.mgrid[0:400, 0:400].astype(np.float32)
    light = 0.9 - 0.5 * xx / 400  # strong left-to-right falloff
    light = np.where(yy > 250 - 0.3 * xx, light * 0.55, light)  # and a hard-edged shadow across the digit
    lit = np.clip(img * light * 255, 0, 255).astype(np.uint8)
    clean, shaded = P.prepare((img * 230).astype(np.uint8)), P.prepare(lit)
    a, b = clean > 0.5, shaded > 0.5
    assert (a & b).sum() / (a | b).sum() > 0.75


def test_specks_and_a_page_edge_are_ignored():
    img = digit_on((500, 600), 2, seed=8, height=150, width_px=9, centre=(380, 300)).astype(np.float32)
    img[:, :40] = 60  # the table beyond the left edge of the page
    rng = np.random.default_rng(0)
    for x, y in rng.uniform((60, 20), (590, 480), size=(25, 2)):
        if abs(x - 380) > 110 or abs(y - 300) > 110:
            cv2.circle(img, (int(x), int(y)), int(rng.integers(1, 6)), 30, -1)
    r = P.analyse(img.astype(np.uint8))
    x, y, w, h = r.box
    assert 280 <= x and x + w <= 470 and 200 <= y and y + h <= 400, r.box


def test_roi_finds_the_symbol_inside_it_and_reports_frame_coordinates():
    frame = np.full((480, 640, 3), 200, np.uint8)
    frame[:, :, 0] = digit_on((480, 640), 1, seed=9, height=300, width_px=12, centre=(150, 240))  # outside the ROI
    inside = digit_on((480, 640), 0, seed=9, height=180, width_px=10, centre=(480, 240))
    frame = np.minimum(frame, inside[:, :, None])
    r = P.analyse(frame, roi=(360, 120, 240, 240))
    x, y, w, h = r.box
    assert 360 <= x and x + w <= 600 and 120 <= y and y + h <= 360
    check_mnist_geometry(r.input)


def test_nothing_to_classify_is_an_image_error():
    for img in (np.full((100, 100), 255, np.uint8), np.zeros((50, 80, 3), np.uint8),
                np.random.default_rng(0).normal(128, 2, (64, 64)).clip(0, 255).astype(np.uint8)):
        with pytest.raises(ImageError, match="no symbol"):
            P.prepare(img)
    with pytest.raises(ImageError, match="region of interest"):
        P.prepare(np.zeros((10, 10), np.uint8), roi=(20, 20, 5, 5))


def test_undecodable_files_are_image_errors(tmp_path):
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "text.png").write_text("not an image\n")
    (tmp_path / "truncated.png").write_bytes(cv2.imencode(".png", np.zeros((30, 30), np.uint8))[1].tobytes()[:40])
    (tmp_path / "folder.png").mkdir()
    for name, reason in (("empty.png", "empty"), ("text.png", "not a decodable"), ("truncated.png", "not a decodable"),
                         ("folder.png", "directory"), ("missing.png", "No such file")):
        with pytest.raises(ImageError, match=reason):
            F.read_image(tmp_path / name)


def test_fit_mode_fills_the_frame():
    img = np.full((100, 60), 255, np.uint8)
    cv2.rectangle(img, (10, 20), (49, 79), 0, -1)  # a dark 40x60 object on white
    x = P.prepare(img, mode="fit")
    ys, xs = np.nonzero(x > 0.5)
    assert ys.max() - ys.min() + 1 >= 26  # the longer side fills the frame


def test_synth_is_seeded_and_styles_have_their_formats():
    a = render_digit(3, "paper", np.random.default_rng(5))
    b = render_digit(3, "paper", np.random.default_rng(5))
    np.testing.assert_array_equal(a, b)
    rng = np.random.default_rng(0)
    assert render_digit(1, "mnist", rng).shape == (28, 28)
    assert render_digit(1, "marker", rng).shape[2] == 4
    assert render_digit(1, "deep", rng).dtype == np.uint16
    assert min(render_digit(1, "thin", rng).shape[:2]) >= 800


def ruled_page(digit, height, seed, size=480, spacing=28, rule=60, lines=True):
    """The issue's notebook: a pen digit photographed on a 480 px page with dark 2 px rules every 28 px."""
    rng = np.random.default_rng(seed)
    img = np.full((size, size), 235, np.float32)
    if lines:
        for y in range(spacing // 2, size, spacing):
            img[y: y + 2] = rule
    cov = draw_strokes((size, size), digit_strokes(digit, rng), (size / 2, size / 2), height, 0.1 * height, rng)
    return camera(img * (1 - cov) / 255 + cov * 30 / 255, rng)


@pytest.mark.parametrize("height", [162, 216, 270, 380])
def test_a_large_digit_on_ruled_paper_is_not_a_blob(height):
    """Rules as dark as the pen, crossed by a large digit's wide strokes: they must still be recognised as
    rules and removed (the digit's own pixels kept), not merged with the digit into a filled block."""
    for seed in range(2):
        ruled, plain = P.analyse(ruled_page(5, height, seed)), P.analyse(ruled_page(5, height, seed, lines=False))
        check_mnist_geometry(ruled.input)
        x, y, w, h = ruled.box
        assert abs(h - plain.box[3]) <= 0.1 * height and abs(w - plain.box[2]) <= 0.1 * height, (ruled.box, plain.box)
        assert similarity(ruled.input, plain.input) > 0.85


def test_a_tilted_page_on_a_dark_table_is_not_the_symbol():
    """The issue's photo read as 0: a sheet turned by 5-25 degrees on a dark table, visible all around it,
    with a shadow. The page's edge and the table must stay out: the box is the digit's (at most 55% of the
    page's height, 95% of the image's), never the page's."""
    rng = np.random.default_rng(21)
    for digit in range(10):
        img = render_digit(digit, "pageedge", rng)
        r = P.analyse(img)
        x, y, w, h = r.box
        assert max(w / img.shape[1], h / img.shape[0]) <= 0.6, (digit, r.box, img.shape)
        check_mnist_geometry(r.input)


def test_trace_shows_every_step_and_changes_nothing():
    """docs/preprocessing.md's pictures come from `analyse(..., trace=)`: the stages are there, in order,
    and tracing leaves the answer as it is."""
    from conftest import ROOT

    image = F.read_image(str(ROOT / "samples" / "5" / "20_notebook.jpg"))
    trace: dict = {}
    traced = P.analyse(image, trace=trace)
    plain = P.analyse(image)
    assert np.array_equal(traced.input, plain.input) and traced.box == plain.box
    assert [k.split()[0] for k in trace] == ["3", "4", "5", "6", "7", "8", "9"]
    assert "dark ink" in list(trace)[1]
    assert all(v.ndim == 2 and v.size for v in trace.values())
