"""Regenerate samples/: hand-drawn digits the way users really feed them to `cnnedge predict`.

    uv run python samples/generate.py     # seeded: the same files every time

ImageFolder layout (samples/<digit>/<name>.<ext>), so `cnnedge predict samples/` reports accuracy.
Every image is drawn by cnnedge.synth from our own stroke skeletons; nothing comes from a dataset.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import cv2
import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from cnnedge.synth import render_digit  # noqa: E402

SEED = 2024


def rotated(image: np.ndarray, degrees: float) -> np.ndarray:
    """The whole photo turned, as when the phone is held at an angle (the page continues at the edges)."""
    h, w = image.shape[:2]
    m = cv2.getRotationMatrix2D((w / 2, h / 2), degrees, 1.0)
    return cv2.warpAffine(image, m, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)


# (digit, style, file name, what it shows, extra transform)
SAMPLES = [
    (0, "mnist", "mnist_like.png", "28x28 white on black, MNIST's own format", None),
    (5, "mnist", "mnist_like.png", "28x28 white on black, MNIST's own format", None),
    (7, "mnist", "mnist_like.bmp", "28x28 as BMP", None),
    (2, "paper", "pen_photo.jpg", "phone photo: pen on paper, shading, noise, JPEG", None),
    (3, "paper", "pen_photo.jpg", "phone photo: pen on paper, shading, noise, JPEG", None),
    (8, "paper", "pen_photo.webp", "phone photo as WebP", None),
    (6, "paper", "rotated_photo.jpg", "phone photo turned by 18 degrees", lambda im: rotated(im, 18)),
    (4, "thin", "thin_canvas.png", "1-3 px strokes on a canvas of 800-1600 px", None),
    (9, "thin", "thin_canvas.png", "1-3 px strokes on a canvas of 800-1600 px", None),
    (1, "marker", "marker_rgba.png", "thick marker on a transparent BGRA image", None),
    (7, "marker", "marker_rgba.png", "thick marker on a transparent BGRA image", None),
    (2, "marker", "marker_rgba.png", "thick marker on a transparent BGRA image", None),
    (5, "offcentre", "offcentre_specks.jpg", "small off-centre digit, specks, page edge and table", None),
    (0, "offcentre", "offcentre_specks.jpg", "small off-centre digit, specks, page edge and table", None),
    (3, "deep", "sixteen_bit.png", "16-bit grey PNG of a photographed page", None),
    (9, "dark", "light_on_dark.jpg", "light strokes on a dark background", None),
    (4, "dark", "light_on_dark.jpg", "light strokes on a dark background", None),
    (6, "pencil", "pencil_scan.tif", "faint pencil on paper, grey TIFF",
     lambda im: cv2.cvtColor(im, cv2.COLOR_BGR2GRAY)),
    (8, "pencil", "pencil.jpg", "faint pencil on paper", None),
    (1, "paper", "pen_photo.jpg", "phone photo: pen on paper, shading, noise, JPEG", None),
    (5, "ruled", "notebook.jpg", "pen on a ruled or squared notebook page", None),
    (3, "crop", "tight_crop.jpg", "a pen photo cut tight around the digit", None),
]


def main() -> None:
    for d in range(10):
        shutil.rmtree(HERE / str(d), ignore_errors=True)
    for i, (digit, style, name, _, transform) in enumerate(SAMPLES):
        rng = np.random.default_rng([SEED, i])  # one stream per sample: editing one leaves the others alone
        image = render_digit(digit, style, rng)
        if transform is not None:
            image = transform(image)
        folder = HERE / str(digit)
        folder.mkdir(exist_ok=True)
        path = folder / f"{i:02d}_{name}"
        params = [cv2.IMWRITE_JPEG_QUALITY, 85] if path.suffix == ".jpg" else []
        if not cv2.imwrite(str(path), image, params):
            raise SystemExit(f"could not write {path}")
        print(f"{path.relative_to(HERE.parent)}  {image.shape[1]}x{image.shape[0]} {image.dtype}"
              f"{'' if image.ndim == 2 else f' x{image.shape[2]}'}")


if __name__ == "__main__":
    main()
