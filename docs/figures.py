"""Draw the documentation's pictures from the shipped model and samples/ (torch-free):

    uv run python docs/figures.py            # -> docs/images/pipeline.png, docs/images/steps_*.png

pipeline.png: a few inputs as a user gives them, the symbol's box, the 28x28 network input and the
prediction. steps_<name>.png: each stage of the digit preprocessing (cnnedge.infer.preprocess, traced by
`analyse(..., trace=...)`) for one image, the stages docs/preprocessing.md describes.
"""

from __future__ import annotations

import sys
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cnnedge.infer.files import read_image  # noqa: E402
from cnnedge.infer.grid import FONT, INK, PAPER, ascii_text, to_u8, write_png  # noqa: E402
from cnnedge.infer.predictor import Predictor  # noqa: E402
from cnnedge.infer.preprocess import analyse, to_gray  # noqa: E402

IMAGES = ROOT / "docs" / "images"
PIPELINE = ["samples/2/03_pen_photo.jpg", "samples/5/20_notebook.jpg", "samples/6/06_rotated_photo.jpg",
            "samples/4/16_light_on_dark.jpg"]
STEPS = {"pen_photo": "samples/2/03_pen_photo.jpg", "notebook": "samples/5/20_notebook.jpg",
         "thin_canvas": "samples/4/07_thin_canvas.png"}
H = 168  # height of every panel


def _panel(image: np.ndarray, caption: str, width: int | None = None) -> np.ndarray:
    """`image` (grey or BGR) scaled to H pixels high (nearest for tiny inputs), with a caption under it."""
    img = cv2.cvtColor(to_u8(image), cv2.COLOR_GRAY2BGR) if image.ndim == 2 else image
    small = max(img.shape[:2]) <= 64
    w = width or max(1, round(img.shape[1] * H / img.shape[0]))
    img = cv2.resize(img, (w, H), interpolation=cv2.INTER_NEAREST if small else cv2.INTER_AREA)
    out = np.full((H + 24, max(w, 8 * len(caption)), 3), PAPER, np.uint8)
    out[:H, :w] = img
    cv2.putText(out, ascii_text(caption), (2, H + 17), FONT, 0.45, INK, 1, cv2.LINE_AA)
    return out


def _row(panels: list[np.ndarray], gap: int = 14) -> np.ndarray:
    height = max(p.shape[0] for p in panels)
    parts = []
    for p in panels:
        pad = np.full((height - p.shape[0], p.shape[1], 3), PAPER, np.uint8)
        parts += [np.vstack([p, pad]), np.full((height, gap, 3), PAPER, np.uint8)]
    return np.hstack(parts[:-1])


def _stack(rows: list[np.ndarray], gap: int = 10) -> np.ndarray:
    width = max(r.shape[1] for r in rows)
    parts = []
    for r in rows:
        parts += [np.hstack([r, np.full((r.shape[0], width - r.shape[1], 3), PAPER, np.uint8)]),
                  np.full((gap, width, 3), PAPER, np.uint8)]
    return np.vstack(parts)


def _bgr(image: np.ndarray) -> np.ndarray:
    """A decoded file as 8-bit BGR for display (alpha shown on white, 16-bit scaled)."""
    if image.dtype != np.uint8:
        image = cv2.normalize(image, None, 0, 255, cv2.NORM_MINMAX).astype(np.uint8)
    if image.ndim == 2:
        return cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
    if image.shape[2] == 4:
        alpha = image[..., 3:].astype(np.float32) / 255
        return (image[..., :3] * alpha + 255 * (1 - alpha)).astype(np.uint8)
    return image


def pipeline() -> np.ndarray:
    predictor = Predictor(inputs=True, topk=1)
    rows = []
    for path, p in zip(PIPELINE, predictor.predict([str(ROOT / f) for f in PIPELINE])):
        shown = _bgr(read_image(str(ROOT / path)))
        if p.box is not None:
            x, y, w, h = p.box
            t = max(2, round(shown.shape[0] / 150))
            cv2.rectangle(shown, (x, y), (x + w, y + h), (40, 40, 220), t)
        rows.append(_row([_panel(shown, Path(path).name, round(H * 4 / 3)), _panel(p.input, "network input 28x28", H),
                          _answer(p.label, p.confidence)]))
    pairs = [_row(rows[i:i + 2], gap=40) for i in range(0, len(rows), 2)]  # two examples side by side
    return _stack(pairs)


def _answer(label: str, confidence: float) -> np.ndarray:
    out = np.full((H + 24, 150, 3), PAPER, np.uint8)
    cv2.putText(out, label, (30, 120), FONT, 4.0, INK, 6, cv2.LINE_AA)
    cv2.putText(out, f"{confidence:.2f}", (40, 160), FONT, 0.7, INK, 1, cv2.LINE_AA)
    return out


def steps(path: str) -> np.ndarray:
    image = read_image(str(ROOT / path))
    trace: dict[str, np.ndarray] = {}
    prepared = analyse(image, trace=trace)
    panels = [_panel(_bgr(image), "input"), _panel(to_gray(image), "1 grey")]
    panels += [_panel(v, k) for k, v in trace.items()]
    panels.append(_panel(prepared.input, "network input", H))
    rows = [_row(panels[i:i + 4]) for i in range(0, len(panels), 4)]
    return _stack(rows)


def main() -> None:
    IMAGES.mkdir(parents=True, exist_ok=True)
    write_png(IMAGES / "pipeline.png", pipeline())
    for name, path in STEPS.items():
        write_png(IMAGES / f"steps_{name}.png", steps(path))
    print(f"wrote {IMAGES}/pipeline.png and steps_*.png")


if __name__ == "__main__":
    main()
