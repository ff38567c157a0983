"""Photos decoded for the digit pipeline (cnnedge.infer.preprocess.decode_for): a JPEG straight to grey,
a large one at 1/2, 1/4 or 1/8 scale in libjpeg's DCT domain. It must give the answers the full decode
gives: the same grey, the same predictions and boxes on the real photos, and PNG's depth and alpha kept."""

from __future__ import annotations

import io

import cv2
import numpy as np
import pytest

from conftest import MODEL, ROOT
from cnnedge.infer import files as F
from cnnedge.infer.predictor import Predictor
from cnnedge.infer.preprocess import WORK_MAX, decode_for

SAMPLES = ROOT / "samples"


@pytest.fixture(scope="module")
def predictor():
    with Predictor(MODEL, "cpu") as p:
        yield p


def jpeg(image: np.ndarray, quality: int = 95) -> bytes:
    ok, data = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, quality])
    assert ok
    return data.tobytes()


@pytest.mark.parametrize("long_side,factor", [(2 * WORK_MAX - 1, 1), (4 * WORK_MAX - 1, 1), (4 * WORK_MAX, 2),
                                              (8 * WORK_MAX, 4), (16 * WORK_MAX, 8), (40 * WORK_MAX, 8)])
def test_a_jpeg_is_shrunk_only_as_far_as_twice_the_work_size(long_side, factor):
    """The remaining shrink to WORK_MAX still pools the ink (thin strokes survive), so at least 2x is kept."""
    gradient = np.tile(np.linspace(0, 255, long_side).astype(np.uint8), (100, 1))
    image, got = decode_for(jpeg(cv2.merge([gradient, gradient, 255 - gradient])), "digit")
    assert got == factor
    assert image.dtype == np.uint8 and image.ndim == (3 if factor == 1 else 2)  # reduced: grey, the pipeline's first step
    assert image.shape[:2] == (-(-100 // factor), -(-long_side // factor))


@pytest.mark.parametrize("path", sorted(SAMPLES.rglob("*.jpg")), ids=lambda p: p.name)
def test_a_jpeg_under_twice_the_work_size_is_decoded_as_is(path):
    """The pixels a camera frame of it gives, colour and all (libjpeg's own grey differs where a saturated
    colour's RGB is clipped): predict and webcam see the same network input."""
    data = path.read_bytes()
    image, factor = decode_for(data, "digit")
    assert factor == 1
    np.testing.assert_array_equal(image, F.decode_image(data))


def test_a_reduced_decode_is_the_grey_of_the_full_one_shrunk():
    """libjpeg's 1/2-scale grey is the full decode's grey averaged over 2x2 blocks, within JPEG's noise."""
    rng = np.random.default_rng(0)
    big = cv2.resize(cv2.GaussianBlur(rng.integers(0, 256, (90, 120, 3), np.uint8), (0, 0), 2), (1600, 1200))
    data = jpeg(big)
    reduced, factor = decode_for(data)
    full = cv2.cvtColor(F.decode_image(data), cv2.COLOR_BGR2GRAY)
    assert factor == 2 and reduced.shape == (600, 800)
    shrunk = cv2.resize(full, (800, 600), interpolation=cv2.INTER_AREA)
    assert np.abs(reduced.astype(int) - shrunk).mean() < 1.0


def test_other_files_and_the_fit_mode_decode_as_is(tmp_path):
    """16-bit depth and alpha (PNG) are the preprocessing's to flatten; "fit" models get the colour image."""
    deep = (np.arange(1400 * 50, dtype=np.uint32).reshape(50, 1400) % 65536).astype(np.uint16)
    rgba = np.dstack([np.full((40, 1500, 3), 200, np.uint8), np.tile(np.uint8([0, 255]), (40, 750))])
    for image in (deep, rgba):
        ok, png = cv2.imencode(".png", image)
        decoded, factor = decode_for(png.tobytes(), "digit")
        assert factor == 1 and decoded.dtype == image.dtype
        np.testing.assert_array_equal(decoded, image)
    colour = cv2.merge([np.zeros((50, 1400), np.uint8)] * 2 + [np.full((50, 1400), 255, np.uint8)])
    decoded, factor = decode_for(jpeg(colour), "fit")
    assert factor == 1 and decoded.shape == colour.shape


def real_photos(handwritten_dir) -> list[tuple[str, np.ndarray]]:
    """The real handwritten photos and the samples' photos (>= 200 px), as 8-bit images."""
    out = []
    for folder in (handwritten_dir, SAMPLES):
        for path in sorted(p for p in folder.rglob("*") if F.is_image_name(p)):
            image = F.read_image(path)
            if min(image.shape[:2]) >= 200:
                if image.dtype != np.uint8:
                    image = (image // 257).astype(np.uint8)
                out.append((f"{path.parent.name}/{path.name}", image[:, :, :3] if image.ndim == 3 else image))
    return out


@pytest.mark.parametrize("enlarge", [3, 7])
def test_real_photos_get_the_same_answer_from_the_reduced_decode(tmp_path, predictor, handwritten_dir, enlarge):
    """The real photos, enlarged 3x and 7x (a phone's resolution) and saved as JPEG: predict (which decodes them
    at 1/2 and 1/4 scale) gives each the label and, in the file's pixels, the box the full decode gives."""
    photos = real_photos(handwritten_dir)
    assert len(photos) >= 20
    photos = photos if enlarge == 3 else photos[::2]  # 3000 px photos are slow to write
    paths, full = [], []
    for i, (name, image) in enumerate(photos):
        big = cv2.resize(image, None, fx=enlarge, fy=enlarge, interpolation=cv2.INTER_CUBIC)
        path = tmp_path / f"{i:02d}.jpg"
        path.write_bytes(jpeg(big))
        paths.append(str(path))
        full.append(F.read_image(path))  # the whole file, in colour: what predict decoded before
    factors = [decode_for(open(p, "rb").read())[1] for p in paths]
    assert factors.count({3: 2, 7: 4}[enlarge]) >= len(paths) // 2, factors  # most of them shrunk that far
    reduced = predictor.predict(paths)
    whole = predictor.predict(full)
    for (name, _), r, w in zip(photos, reduced, whole):
        assert r.error is None and w.error is None, name
        assert r.label == w.label == name.split("/")[0], name
        assert abs(r.confidence - w.confidence) <= 0.05, name
        # The box in the file's pixels: within a couple of reduced pixels and 3% of the digit's size.
        tolerance = 2 * enlarge + 0.03 * max(w.box[2:])
        assert max(abs(a - b) for a, b in zip(r.box, w.box)) <= tolerance, (name, r.box, w.box)


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_a_reduced_decode_is_upright_too(orientation):
    """A large phone photo stored turned, with its EXIF orientation: decoded at 1/2 scale, it is the upright
    photo decoded at 1/2 scale (the orientation is applied after the reduced decode, by the same rule)."""
    Image = pytest.importorskip("PIL.Image")
    from test_orientation import STORED

    upright = np.full((1000, 1600), 230, np.uint8)
    upright[100:700, 100:260] = 20  # an L at the top left: no symmetry
    upright[560:700, 100:700] = 20

    def stored(o: int) -> bytes:
        im = Image.fromarray(upright)
        if STORED[o]:
            im = im.transpose(getattr(Image.Transpose, STORED[o]))
        exif = Image.Exif()
        exif[0x0112] = o
        buf = io.BytesIO()
        im.save(buf, "JPEG", quality=95, exif=exif.tobytes())
        return buf.getvalue()

    turned, factor = decode_for(stored(orientation))
    reference, _ = decode_for(stored(1))
    assert factor == 2 and turned.shape == reference.shape == (500, 800)
    assert np.abs(turned.astype(int) - reference).mean() < 1.0
    assert turned[200, 80] < 60 and turned[320, 300] < 60 and turned[100, 600] > 200
