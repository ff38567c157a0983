"""Property-based tests (hypothesis): preprocessing, decoding and the ONNX metadata parser never crash.

Whatever array, bytes or metadata they are given, they either return what their contract promises or
raise the one documented error type with a message: preprocess.ImageError for images, CnnedgeError for
metadata. Anything else (a cv2.error, an IndexError, NaN in a network input) would reach a user as a
traceback or as a confident wrong answer."""

from __future__ import annotations

import json
import os

import cv2
import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings, strategies as st
from hypothesis.extra import numpy as hnp

from cnnedge.choices import PREPROCESS_MODES
from cnnedge.errors import ImageError
from cnnedge.infer import files as F
from cnnedge.infer import preprocess as P
from cnnedge.errors import CnnedgeError
from cnnedge.infer.modelinfo import ModelInfo
from cnnedge.synth import render_digit

# CNNEDGE_FUZZ_EXAMPLES=5000 for a deeper search than the suite's quick one.
EXAMPLES = int(os.environ.get("CNNEDGE_FUZZ_EXAMPLES", "150"))
FAST = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])

DTYPES = [np.uint8, np.uint16, np.int8, np.int32, np.float16, np.float32, np.float64, np.bool_]


def check_network_input(x: np.ndarray, size: int = 28) -> None:
    assert isinstance(x, np.ndarray) and x.dtype == np.float32 and x.shape == (size, size)
    assert np.isfinite(x).all() and x.min() >= 0.0 and x.max() <= 1.0


def prepared_or_image_error(image: np.ndarray, **kwargs) -> None:
    """The contract: a valid (28, 28) float32 input in [0, 1], or ImageError with a message."""
    try:
        x = P.prepare(image, **kwargs)
    except ImageError as e:
        assert str(e).strip(), "an ImageError must say why"
        return
    check_network_input(x, kwargs.get("size", 28))


@st.composite
def images(draw, max_side: int = 48):
    """Arrays of any rank 0..4 (zero-size dimensions included), any of DTYPES, 1..5 channels, any values
    (NaN and infinities in floats), and a few structured ones (a bar on a background) so that the full
    pipeline runs, not only its early exits."""
    dtype = np.dtype(draw(st.sampled_from(DTYPES)))
    ndim = draw(st.integers(0, 4))
    if ndim == 3:
        shape = (draw(st.integers(0, max_side)), draw(st.integers(0, max_side)), draw(st.integers(1, 5)))
    else:
        shape = tuple(draw(st.integers(0, max_side)) for _ in range(ndim))
    if dtype.kind == "f":
        elements = st.floats(width=8 * dtype.itemsize if dtype.itemsize < 8 else 64, allow_nan=True,
                             allow_infinity=True)
    else:
        elements = None  # any value of the dtype
    arr = draw(hnp.arrays(dtype, shape, elements=elements))
    if arr.ndim >= 2 and min(arr.shape[:2]) >= 12 and draw(st.booleans()):
        # A stroke on a background, so that the symbol search, the stroke rendering and the placement run.
        lo, hi = (0, 1) if dtype.kind in "fb" else (np.iinfo(dtype).min, np.iinfo(dtype).max)
        arr[...] = hi
        h, w = arr.shape[:2]
        y = draw(st.integers(1, h - 2))
        arr[max(0, y - 2): y + 2, w // 5: 4 * w // 5] = lo
    return arr


@FAST
@given(images())
@example(np.full((40, 40), np.nan, np.float32))
@example(np.array([[np.inf, -np.inf], [np.nan, 0.0]] * 10, np.float64).repeat(10, axis=1))
@example(np.zeros((30, 30, 2), np.uint8))
@example(np.zeros((0, 30, 3), np.uint8))
@example(np.zeros((30, 30, 0), np.uint8))
@example(np.ones((1, 5000), np.uint8))
@example(np.uint8(7))
def test_prepare_returns_a_valid_input_or_an_image_error(image):
    prepared_or_image_error(image)


@FAST
@given(images(max_side=40), st.sampled_from(PREPROCESS_MODES), st.sampled_from(P.INK),
       st.tuples(st.integers(-50, 60), st.integers(-50, 60), st.integers(-10, 80), st.integers(-10, 80)) | st.none())
def test_prepare_with_any_mode_ink_and_roi(image, mode, ink, roi):
    prepared_or_image_error(image, mode=mode, ink=ink, roi=roi)


@settings(max_examples=max(20, EXAMPLES // 3), deadline=None)
@given(st.integers(0, 9), st.sampled_from([np.uint8, np.uint16, np.float32, np.float64]),
       st.sampled_from([None, 1, 3, 4]), st.floats(0.3, 1.0), st.floats(-0.5, 0.5))
def test_a_digit_in_any_dtype_range_and_layout_gives_an_input(digit, dtype, channels, scale, offset):
    """Real digits, stored in whatever numeric form (a 12-bit range in uint16, floats around 0, ...): the
    pipeline must find the symbol, not only survive."""
    grey = cv2.cvtColor(render_digit(digit, "paper", np.random.default_rng(digit)), cv2.COLOR_BGR2GRAY)
    grey = cv2.resize(grey, (96, 72), interpolation=cv2.INTER_AREA).astype(np.float64) / 255
    values = grey * scale + offset
    if np.dtype(dtype).kind == "u":
        values = (values - values.min()) / (values.max() - values.min()) * scale * np.iinfo(dtype).max
    img = values.astype(dtype)
    if channels is not None:
        img = np.repeat(img[..., None], channels, axis=2)
        if channels == 4:
            img[..., 3] = 1 if np.dtype(dtype).kind == "f" else np.iinfo(dtype).max  # opaque
    check_network_input(P.prepare(img))


# ------------------------------------------------------------------------------------------ decode


def _png_and_jpeg() -> list[bytes]:
    img = render_digit(5, "paper", np.random.default_rng(0))
    img = cv2.resize(img, (64, 48), interpolation=cv2.INTER_AREA)
    out = [cv2.imencode(ext, img)[1].tobytes() for ext in (".png", ".jpg", ".bmp", ".tiff", ".webp")]
    out.append(cv2.imencode(".png", (cv2.cvtColor(img, cv2.COLOR_BGR2GRAY).astype(np.uint16) * 257))[1].tobytes())
    return out


VALID_FILES = _png_and_jpeg()


def decoded_or_image_error(data: bytes) -> None:
    try:
        image = F.decode_image(data)
    except ImageError as e:
        assert str(e).strip()
        return
    assert isinstance(image, np.ndarray) and image.size > 0 and image.ndim in (2, 3)
    assert image.ndim == 2 or image.shape[2] in (1, 3, 4)
    prepared_or_image_error(image)  # and whatever decodes must go through preprocessing too


@FAST
@given(st.binary(max_size=2048))
@example(b"")
@example(b"\x89PNG\r\n\x1a\n")
@example(b"\xff\xd8\xff")
@example(b"GIF89a")
@example(b"BM" + bytes(60))
@example(b"II*\x00" + bytes(16))
def test_random_bytes_decode_or_raise_an_image_error(data):
    decoded_or_image_error(data)


@FAST
@given(st.sampled_from(range(len(VALID_FILES))), st.data())
def test_mutated_image_files_decode_or_raise_an_image_error(which, data):
    """Valid PNG, JPEG, BMP, TIFF and WebP files cut short, with bytes overwritten, or with a run zeroed."""
    blob = bytearray(VALID_FILES[which])
    kind = data.draw(st.sampled_from(["truncate", "flip", "zero", "header"]))
    if kind == "truncate":
        blob = blob[: data.draw(st.integers(0, len(blob) - 1))]
    elif kind == "flip":
        for i in data.draw(st.lists(st.integers(0, len(blob) - 1), min_size=1, max_size=8)):
            blob[i] = data.draw(st.integers(0, 255))
    elif kind == "zero":
        i = data.draw(st.integers(0, len(blob) - 1))
        blob[i: i + data.draw(st.integers(1, 64))] = b"\x00" * len(blob[i: i + 64])
    else:  # the header, where sizes and formats are declared
        i = data.draw(st.integers(0, min(40, len(blob) - 1)))
        blob[i] = data.draw(st.integers(0, 255))
    decoded_or_image_error(bytes(blob))


# ---------------------------------------------------------------------------------------- metadata


VALID_PROPS = ModelInfo(class_names=[str(i) for i in range(10)], input_shape=(1, 28, 28), mean=[0.1307],
                        std=[0.3081], preprocess="digit", arch="edgenet", embedding_layer="relu4",
                        test_accuracy=0.99, dataset="mnist").to_props()

JSONISH = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
                       lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=3), children, max_size=3),
                       max_leaves=8)


def parsed_or_cnnedge_error(props: dict) -> None:
    try:
        info = ModelInfo.from_props(props, source="fuzz.onnx")
    except CnnedgeError as e:
        assert str(e).startswith("fuzz.onnx: metadata "), str(e)
        return
    # What the readers rely on, checked the way they use it.
    c, h, w = info.input_shape
    assert all(isinstance(d, int) and d > 0 for d in (c, h, w))
    assert isinstance(info.class_names, list) and info.class_names and all(isinstance(n, str) for n in info.class_names)
    assert len(info.mean) == len(info.std) == c and all(s > 0 for s in info.std)
    assert np.isfinite(info.mean).all() and np.isfinite(info.std).all()
    assert info.preprocess in PREPROCESS_MODES and info.precision in ("fp32", "fp16", "int8")
    assert info.test_accuracy is None or isinstance(info.test_accuracy, float)
    assert ModelInfo.from_props(info.to_props(), source="again") == info  # it round-trips


@FAST
@given(st.dictionaries(st.text(max_size=24), st.text(max_size=40), max_size=16))
def test_arbitrary_props_parse_or_raise_cnnedge_error(props):
    parsed_or_cnnedge_error(props)


@FAST
@given(st.data())
def test_mutated_valid_props_parse_or_raise_cnnedge_error(data):
    props = dict(VALID_PROPS)
    for key in data.draw(st.lists(st.sampled_from(sorted(VALID_PROPS)), min_size=1, max_size=4, unique=True)):
        action = data.draw(st.sampled_from(["delete", "text", "json", "empty"]))
        if action == "delete":
            del props[key]
        elif action == "text":
            props[key] = data.draw(st.text(max_size=30))
        elif action == "json":
            props[key] = json.dumps(data.draw(JSONISH))
        else:
            props[key] = ""
    parsed_or_cnnedge_error(props)


@pytest.mark.parametrize("key, value", [
    ("input_shape", "[1, 28, 28.0]"), ("input_shape", "[true, 28, 28]"), ("input_shape", "[1, 28]"),
    ("mean", "[NaN]"), ("mean", "[Infinity]"), ("std", "[0]"), ("std", "[-1]"), ("class_names", "[]"),
    ("class_names", "[1, 2]"), ("class_names", "{}"), ("class_names", "[" * 100000), ("test_accuracy", "abc"),
    ("test_accuracy", "nan"), ("preprocess", "crop"), ("precision", "fp8"), ("cnnedge.metadata_version", "2"),
])
def test_known_bad_values_are_refused_with_the_key_named(key, value):
    with pytest.raises(CnnedgeError, match=key.replace(".", r"\.")):
        ModelInfo.from_props({**VALID_PROPS, key: value}, source="m.onnx")
