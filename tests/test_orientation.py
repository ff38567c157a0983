"""EXIF orientation: a phone photo whose pixels are stored sideways is read the way image viewers show it,
in every format that carries the tag (JPEG, TIFF, WebP, PNG eXIf), by predict, enroll and imagefolder
training alike (they all decode through cnnedge.infer.files.read_image).

The files are written by Pillow (an independent EXIF writer) and Pillow's own `ImageOps.exif_transpose`
says what a viewer shows."""

from __future__ import annotations

import io

import numpy as np
import pytest

from cnnedge.infer import files as F
from cnnedge.synth import render_digit

Image = pytest.importorskip("PIL.Image")
ImageOps = pytest.importorskip("PIL.ImageOps")

# What the camera stores for each orientation, given the upright picture: the inverse of what a viewer applies.
STORED = {1: None, 2: "FLIP_LEFT_RIGHT", 3: "ROTATE_180", 4: "FLIP_TOP_BOTTOM", 5: "TRANSPOSE", 6: "ROTATE_90",
          7: "TRANSVERSE", 8: "ROTATE_270"}


def upright_picture(channels: int) -> np.ndarray:
    """A 36x52 picture with no symmetry at all: an L in the top-left corner, a dot near the bottom right."""
    img = np.full((36, 52), 230, np.uint8)
    img[4:30, 4:10] = 20
    img[24:30, 4:28] = 20
    img[28:32, 42:47] = 90
    if channels == 1:
        return img
    bgr = np.dstack([img, img // 2 + 60, 255 - img])
    if channels == 3:
        return bgr
    return np.dstack([bgr, np.where(img < 128, 255, 200).astype(np.uint8)])


def file_bytes(upright: np.ndarray, orientation: int, fmt: str) -> bytes:
    """`upright` stored turned or flipped as a camera does, with the EXIF tag that undoes it."""
    rgb = upright if upright.ndim == 2 else upright[:, :, [2, 1, 0, 3][: upright.shape[2]]]
    im = Image.fromarray(rgb)
    if STORED[orientation]:
        im = im.transpose(getattr(Image.Transpose, STORED[orientation]))
    exif = Image.Exif()
    exif[0x0112] = orientation
    options = {"JPEG": {"quality": 100, "subsampling": 0}, "WEBP": {"lossless": True}}.get(fmt, {})
    buf = io.BytesIO()
    im.save(buf, fmt, exif=exif.tobytes(), **options)
    return buf.getvalue()


CASES = [("JPEG", 1), ("JPEG", 3), ("PNG", 1), ("PNG", 4), ("TIFF", 1), ("TIFF", 3), ("TIFF", 4), ("WEBP", 3), ("WEBP", 4)]


@pytest.mark.parametrize("orientation", range(1, 9))
@pytest.mark.parametrize("fmt,channels", CASES, ids=[f"{f}-{c}ch" for f, c in CASES])
def test_every_orientation_is_applied_as_a_viewer_does(tmp_path, fmt, channels, orientation):
    upright = upright_picture(channels)
    data = file_bytes(upright, orientation, fmt)
    path = tmp_path / f"photo.{fmt.lower()}"
    path.write_bytes(data)
    image = F.read_image(path)
    viewer = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data))))
    assert image.shape[:2] == upright.shape[:2] == viewer.shape[:2]
    # The same picture stored upright, through the same decoder (OpenCV premultiplies TIFF alpha, JPEG is lossy).
    reference = F.decode_image(file_bytes(upright, 1, fmt))
    tolerance = 8 if fmt == "JPEG" else 0
    assert np.abs(image.astype(int) - reference.astype(int)).max() <= tolerance
    # ... and the upright picture is what it shows: the L at the top left, the dot at the bottom right.
    grey = image if image.ndim == 2 else image[:, :, 0]
    assert grey[10, 6] < 100 and grey[27, 20] < 100 and grey[6, 40] > grey[10, 6] + 50
    assert int(grey[30, 44]) < int(grey[5, 44]) - 50 and int(grey[30, 44]) < int(grey[30, 7]) - 50
    if channels == 4:
        assert image.shape[2] == 4  # alpha survives: orientation did not cost the UNCHANGED decode


def test_sixteen_bit_depth_survives_orientation(tmp_path):
    upright = upright_picture(1).astype(np.uint16) * 257
    im = Image.fromarray(upright).transpose(Image.Transpose.ROTATE_90)  # stored for orientation 6
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    im.save(buf, "PNG", exif=exif.tobytes())
    image = F.decode_image(buf.getvalue())
    assert image.dtype == np.uint16
    np.testing.assert_array_equal(image, upright)


@pytest.mark.parametrize("blob", [b"", b"Exif\0\0", b"MM\0*\0\0\0\x08", b"II*\0\xff\xff\xff\x7f", b"MM\0*\0\0\0\x08\0\x05\x01\x12",
                                  b"II*\0\x08\0\0\0\x01\0\x12\x01\x03\0\x01\0\0\0\x09\0", b"XX*\0\x08\0\0\0"])
def test_malformed_exif_means_upright(blob):
    assert F.exif_orientation(blob) == 1


def test_exif_orientation_reads_both_byte_orders():
    for order, tiff in (("<", b"II*\0"), (">", b"MM\0*")):
        import struct
        blob = tiff + struct.pack(order + "IH", 8, 1) + struct.pack(order + "HHIHH", 0x0112, 3, 1, 6, 0) + b"\0\0\0\0"
        assert F.exif_orientation(blob) == 6
        assert F.exif_orientation(b"Exif\0\0" + blob) == 6


def test_a_sideways_phone_photo_is_read_upright_by_predict_and_imagefolder(tmp_path):
    """The issue's case: a 7 photographed upright, stored turned (orientation 6 is what phones write)."""
    from typer.testing import CliRunner

    from cnnedge.cli import app
    from cnnedge.infer.preprocess import analyse

    pytest.importorskip("torch")
    from cnnedge.train.data import load_imagefolder

    rng = np.random.default_rng(70)
    folder = tmp_path / "7"
    folder.mkdir()
    upright = []
    for i in range(3):
        bgr = render_digit(7, "paper", rng)
        upright.append(analyse(bgr).input)
        for orientation in (6, 8, 3):
            (folder / f"photo_{i}_{orientation}.jpg").write_bytes(file_bytes(bgr, orientation, "JPEG"))
    other = tmp_path / "1"  # a classifier's folder needs two classes
    other.mkdir()
    (other / "upright.jpg").write_bytes(file_bytes(render_digit(1, "paper", rng), 1, "JPEG"))
    r = CliRunner().invoke(app, ["predict", str(folder), "--format", "csv"])
    assert r.exit_code == 0, r.output
    labels = [line.split(",")[1] for line in r.stdout.strip().splitlines()[1:]]
    assert labels == ["7"] * 9, r.stdout
    data = load_imagefolder(tmp_path)
    sevens = data.x_train[data.y_train == data.class_names.index("7")]
    assert sevens.shape == (9, 1, 28, 28)
    for k, x in enumerate(sevens[:, 0].numpy()):  # the network sees the upright digit
        a, b = x > 0.5, upright[k // 3] > 0.5
        assert (a & b).sum() / (a | b).sum() > 0.75
