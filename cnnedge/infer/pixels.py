"""`cnnedge pixels`: what the network sees of an image, as seed 004 drew it: the network input enlarged,
every pixel's value written in its cell (torch-free: the model's own preprocessing, OpenCV drawing)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cnnedge.errors import CnnedgeError, ImageError
from cnnedge.infer.files import read_bytes, shown_path
from cnnedge.infer.grid import pixel_view, write_png
from cnnedge.infer.predictor import Predictor
from cnnedge.infer.preprocess import decode_for


def run(image: str, out: str | None = None, model: str | None = None, cell: int = 34) -> tuple[Path, str]:
    """Write the pixel view of `image`'s network input; return the file and the model's prediction."""
    target = Path(out) if out else Path(Path(image).stem + ".pixels.png")
    if target.suffix.lower() != ".png" or target.is_dir():
        raise CnnedgeError(f"--out {target}: give a .png file to write")
    with Predictor(model, "cpu", workers=1) as predictor:
        try:
            prepared = predictor.preprocess(decode_for(read_bytes(image), predictor.info.preprocess)[0])  # as predict decodes it
        except ImageError as e:
            raise CnnedgeError(f"{image}: {e}") from None
        x = np.repeat(prepared.input[None, None], predictor.channels, axis=1)
        probs = predictor.runtime.probabilities(x)[0]
    label, confidence = predictor.class_names[int(probs.argmax())], float(probs.max())
    size = prepared.input.shape[0]
    how = "used as is" if prepared.passthrough else f"{predictor.info.preprocess} preprocessing"
    title = (f"{shown_path(image)}: {size}x{size} network input ({how}), values in [0, 1]; "
             f"{shown_path(predictor.model)} says {label} ({100 * confidence:.0f}%)")
    write_png(target, pixel_view(prepared.input, cell, title))
    return target, f"{label} ({100 * confidence:.1f}%)"
