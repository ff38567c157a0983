"""Pictures of network inputs, drawn with OpenCV (torch-free, no matplotlib).

- `label_grid`: small images in a grid, each with a caption under it and a frame that says whether the
  prediction is right (green), wrong (red) or unknown (grey). `cnnedge train` draws its training samples
  and test predictions with it, `cnnedge predict --grid` the 28x28 crops it classified.
- `pixel_view`: one network input enlarged, every pixel's value written in its cell (seed 004's figure).
"""

from __future__ import annotations

import math
from typing import Sequence

import cv2
import numpy as np

from cnnedge.errors import CnnedgeError

RED = (0, 0, 230)  # BGR; pure enough that a test can find the wrong tiles by colour
GREEN = (0, 150, 0)
GREY = (170, 170, 170)
INK = (30, 30, 30)
PAPER = (255, 255, 255)
FONT = cv2.FONT_HERSHEY_SIMPLEX
FRAME = 3  # frame width in pixels
GAP = 8  # between cells
LINE = 15  # height of a caption line
TITLE = 30  # height of the title bar


def to_u8(image: np.ndarray) -> np.ndarray:
    """A grey network input (float in [0, 1], or uint8) as uint8."""
    if image.dtype == np.uint8:
        return image
    return np.clip(image * 255 + 0.5, 0, 255).astype(np.uint8)


def ascii_text(text: str) -> str:
    """OpenCV's Hershey fonts draw ASCII only: anything else becomes '?'."""
    return "".join(c if 32 <= ord(c) < 127 else "?" for c in text)


def _fit_text(text: str, width: int, scale: float) -> str:
    """`text` cut (with '~') so that it fits in `width` pixels at font `scale`."""
    text = ascii_text(text)
    while len(text) > 1 and cv2.getTextSize(text, FONT, scale, 1)[0][0] > width:
        text = text[:-2] + "~"
    return text


def _title_bar(width: int, title: str) -> np.ndarray:
    bar = np.full((TITLE, width, 3), PAPER, np.uint8)
    cv2.putText(bar, _fit_text(title, width - 12, 0.5), (6, 20), FONT, 0.5, INK, 1, cv2.LINE_AA)
    return bar


def grid_layout(n: int, tile: tuple[int, int], cols: int | None = None, scale: int = 3, lines: int = 1,
                title: bool = False) -> tuple[tuple[int, int], list[tuple[int, int, int, int]]]:
    """Where `label_grid` puts n tiles of `tile` = (h, w) pixels: the picture's (height, width) and each
    tile's frame as (x, y, w, h), row by row, `lines` caption lines under each."""
    h, w = tile
    cols = max(1, min(cols or math.ceil(math.sqrt(n)), n))
    rows = math.ceil(n / cols)
    tile_w, tile_h = w * scale + 2 * FRAME, h * scale + 2 * FRAME
    cell_w, cell_h = tile_w + GAP, tile_h + lines * LINE + GAP
    top = TITLE if title else 0
    boxes = [(GAP + (i % cols) * cell_w, top + GAP + (i // cols) * cell_h, tile_w, tile_h) for i in range(n)]
    return (top + rows * cell_h + GAP, cols * cell_w + GAP), boxes


def label_grid(images: Sequence[np.ndarray], captions: Sequence[Sequence[str]],
               wrong: Sequence[bool | None] | None = None, cols: int | None = None, scale: int = 3,
               title: str | None = None) -> tuple[np.ndarray, list[tuple[int, int, int, int]]]:
    """Grey images (float [0, 1] or uint8, all one size) in a grid, `captions[i]` (lines) under image i.
    `wrong[i]`: True draws the frame and caption in red, False in green, None in grey (no truth known).
    Returns the BGR picture and each tile's frame as (x, y, w, h) in it (see grid_layout)."""
    if not len(images):
        raise ValueError("label_grid needs at least one image")
    wrong = list(wrong) if wrong is not None else [None] * len(images)
    h, w = images[0].shape[:2]
    lines = max((len(c) for c in captions), default=0)
    (height, width), boxes = grid_layout(len(images), (h, w), cols, scale, lines, bool(title))
    canvas = np.full((height, width, 3), PAPER, np.uint8)
    for image, caption, bad, (x, y, tile_w, tile_h) in zip(images, captions, wrong, boxes):
        colour = GREY if bad is None else RED if bad else GREEN
        canvas[y: y + tile_h, x: x + tile_w] = colour
        big = cv2.resize(to_u8(image), (w * scale, h * scale), interpolation=cv2.INTER_NEAREST)
        canvas[y + FRAME: y + FRAME + h * scale, x + FRAME: x + FRAME + w * scale] = big[..., None]
        for k, line in enumerate(caption):
            cv2.putText(canvas, _fit_text(line, tile_w, 0.42), (x, y + tile_h + (k + 1) * LINE - 3), FONT, 0.42,
                        INK if bad is None else colour, 1, cv2.LINE_AA)
    if title:
        canvas[:TITLE] = _title_bar(width, title)
    return canvas, boxes


def pixel_view(image: np.ndarray, cell: int = 34, title: str | None = None) -> np.ndarray:
    """One grey image (float [0, 1], or uint8 shown as /255) enlarged to `cell` pixels per pixel, each cell
    showing its value to two decimals (0 as "0"), in white on dark cells and black on light ones; row and
    column numbers along the edges."""
    values = image.astype(np.float32) / 255 if image.dtype == np.uint8 else image.astype(np.float32)
    h, w = values.shape
    margin = 26  # row and column numbers
    scale = 0.34 * cell / 34
    body = cv2.resize(to_u8(values), (w * cell, h * cell), interpolation=cv2.INTER_NEAREST)
    body = cv2.cvtColor(body, cv2.COLOR_GRAY2BGR)
    threshold = float(values.max()) / 2.5  # seed 004's rule for the text colour
    for r in range(h):
        for c in range(w):
            v = float(values[r, c])
            text = "0" if v == 0 else f"{v:.2f}"
            (tw, th), _ = cv2.getTextSize(text, FONT, scale, 1)
            colour = PAPER if v < threshold else (0, 0, 0)
            cv2.putText(body, text, (c * cell + (cell - tw) // 2, r * cell + (cell + th) // 2), FONT, scale, colour,
                        1, cv2.LINE_AA)
    for k in range(1, max(h, w)):  # thin lines between the cells
        if k < h:
            body[k * cell, :] = (90, 90, 90)
        if k < w:
            body[:, k * cell] = (90, 90, 90)
    canvas = np.full((h * cell + margin, w * cell + margin, 3), PAPER, np.uint8)
    canvas[margin:, margin:] = body
    for k in range(max(h, w)):
        label = str(k)
        (tw, th), _ = cv2.getTextSize(label, FONT, 0.35, 1)
        if k < w:
            cv2.putText(canvas, label, (margin + k * cell + (cell - tw) // 2, margin - 8), FONT, 0.35, INK, 1, cv2.LINE_AA)
        if k < h:
            cv2.putText(canvas, label, (margin - tw - 5, margin + k * cell + (cell + th) // 2), FONT, 0.35, INK, 1,
                        cv2.LINE_AA)
    if title:
        canvas = np.vstack([_title_bar(canvas.shape[1], title), canvas])
    return canvas


def write_png(path, picture: np.ndarray) -> None:
    """Encode and write atomically; one clear error when the place cannot be written."""
    from cnnedge.atomic import write_bytes

    ok, png = cv2.imencode(".png", picture)
    if not ok:
        raise CnnedgeError(f"{path}: could not encode the PNG")
    try:
        write_bytes(path, png.tobytes())
    except OSError as e:
        raise CnnedgeError(f"{path}: cannot write ({e.strerror or e})") from None
