"""OpenCV preprocessing: turn what users photograph or draw into what the network was trained on.

Torch-free: predict, webcam and enroll run on onnxruntime, OpenCV and numpy alone.
Modes: "digit" (MNIST convention: white strokes on black, the symbol's box fitted into 20x20 and
centred by centre of mass in 28x28) and "fit" (the object fills the frame, as in Fashion-MNIST).
"""

from __future__ import annotations

import os

import cv2
import numpy as np

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
MODES = ("digit", "fit")


class ImageError(Exception):
    """An input that cannot be turned into a network input; the message names the reason."""


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Decode a file as is (8/16-bit, grey, BGR or BGRA). np.fromfile copes with any file name."""
    try:
        data = np.fromfile(path, dtype=np.uint8)
    except OSError as e:
        raise ImageError(e.strerror or str(e)) from None
    if data.size == 0:
        raise ImageError("empty file")
    image = cv2.imdecode(data, cv2.IMREAD_UNCHANGED)
    if image is None:
        raise ImageError("not a decodable image")
    return image


def to_gray(image: np.ndarray) -> np.ndarray:
    """Any decoded image -> float32 grey in [0, 1]; transparent pixels become white paper."""
    img = np.asarray(image)
    if img.dtype == np.uint16:
        img = img.astype(np.float32) / 65535.0
    elif img.dtype == np.uint8:
        img = img.astype(np.float32) / 255.0
    else:
        img = np.nan_to_num(img.astype(np.float32))
        lo, hi = float(img.min()), float(img.max())
        img = (img - lo) / (hi - lo) if hi > lo else np.zeros_like(img)
    if img.ndim == 3 and img.shape[2] == 4:
        alpha = img[:, :, 3:4]
        img = img[:, :, :3] * alpha + (1.0 - alpha)
    if img.ndim == 3 and img.shape[2] == 3:
        img = cv2.cvtColor(img, cv2.COLOR_BGR2GRAY)
    elif img.ndim == 3:
        img = img[:, :, 0]
    return img


def _fit_into(canvas: int, box: int, img: np.ndarray) -> np.ndarray:
    h, w = img.shape
    scale = box / max(h, w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    small = cv2.resize(img, (nw, nh), interpolation=cv2.INTER_AREA)
    out = np.zeros((canvas, canvas), np.float32)
    y, x = (canvas - nh) // 2, (canvas - nw) // 2
    out[y : y + nh, x : x + nw] = small
    return out


def _center_of_mass(img: np.ndarray) -> np.ndarray:
    m = cv2.moments(img)
    if m["m00"] <= 0:
        return img
    cy, cx = m["m01"] / m["m00"], m["m10"] / m["m00"]
    h, w = img.shape
    shift = np.float32([[1, 0, w / 2 - cx], [0, 1, h / 2 - cy]])
    return cv2.warpAffine(img, shift, (w, h), flags=cv2.INTER_LINEAR, borderValue=0)


def to_network_input(image: np.ndarray, mode: str = "digit", size: int = 28) -> np.ndarray:
    """Decoded image -> float32 (size, size) in [0, 1], white symbol on black."""
    gray = to_gray(image)
    if gray.size == 0 or min(gray.shape) < 1:
        raise ImageError("empty image")
    border = np.concatenate([gray[0], gray[-1], gray[:, 0], gray[:, -1]])
    ink = 1.0 - gray if np.median(border) > 0.5 else gray  # light paper -> invert to white-on-black
    if mode == "fit":
        return _fit_into(size, size, ink)
    u8 = (ink * 255).astype(np.uint8)
    _, mask = cv2.threshold(u8, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    points = cv2.findNonZero(mask)
    if points is None:
        raise ImageError("no symbol found (blank image)")
    x, y, w, h = cv2.boundingRect(points)
    crop = ink[y : y + h, x : x + w] * (mask[y : y + h, x : x + w] > 0)
    return _center_of_mass(_fit_into(size, round(size * 20 / 28), crop))
