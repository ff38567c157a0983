"""Accuracy of the shipped model through `cnnedge predict` on realistic synthetic handwriting, per style.

    uv run python benchmarks/eval_preprocess.py                 # 300 images per style (30 per digit)
    uv run python benchmarks/eval_preprocess.py --per-digit 10 --styles paper,thin

Every style of cnnedge.synth (pen photos, thin strokes on big canvases, RGBA marker, light on dark,
off-centre with specks and page edges, 16-bit, pencil, Hershey fonts) is rendered with a fixed seed,
written as files in ImageFolder layout and classified by `Predictor` end to end (decode, preprocess,
onnxruntime). The same files also go through a naive pipeline (grey, invert if the image is light,
resize to 28x28) to show what the preprocessing is worth. Also reports the photos in
$CNNEDGE_DATA/handwritten_digits when present.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import zlib
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cnnedge.metrics import confusion_matrix  # noqa: E402
from cnnedge.infer.predictor import Predictor  # noqa: E402
from cnnedge.infer.files import read_image  # noqa: E402
from cnnedge.infer.preprocess import to_gray  # noqa: E402
from cnnedge.synth import STYLES, render_digit  # noqa: E402
from cnnedge.infer.modelinfo import default_model  # noqa: E402


def write_style(folder: Path, style: str, per_digit: int, seed: int) -> None:
    rng = np.random.default_rng([seed, zlib.crc32(style.encode())])
    for i in range(per_digit):
        for d in range(10):
            (folder / str(d)).mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(folder / str(d) / f"{style}_{i:03d}.png"), render_digit(d, style, rng))


def naive_accuracy(predictor: Predictor, paths: list[Path], labels: list[int]) -> float:
    """Grey, invert when the background is light, resize to the input size: what most demos do."""
    size = predictor.size
    xs = []
    for p in paths:
        g = to_gray(read_image(p))
        if g.mean() > 0.5:
            g = 1.0 - g
        xs.append(cv2.resize(g, (size, size), interpolation=cv2.INTER_AREA))
    pred = predictor.runtime.probabilities(np.stack(xs)).argmax(1)
    return float(np.mean(pred == np.asarray(labels)))


def evaluate(predictor: Predictor, folder: Path) -> tuple[float, float, int, int, np.ndarray, float]:
    t = time.perf_counter()
    preds = predictor.predict(folder)
    seconds = time.perf_counter() - t
    labels = [int(p.truth) for p in preds]
    ok = [p.label is not None and p.label == p.truth for p in preds]
    errors = sum(p.error is not None for p in preds)
    cm = confusion_matrix(labels, [p.index if p.index is not None else int(p.truth) for p in preds], 10)
    naive = naive_accuracy(predictor, [Path(p.path) for p in preds], labels)
    return float(np.mean(ok)), naive, len(preds), errors, cm, seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(default_model()))
    ap.add_argument("--per-digit", type=int, default=30, help="images per digit and style")
    ap.add_argument("--styles", default=",".join(STYLES))
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()

    predictor = Predictor(args.model, "cpu")
    styles = [s for s in args.styles.split(",") if s]
    print(f"{args.per_digit * 10} images per style, seed {args.seed}, model {args.model}\n")
    print(f"{'style':<11} {'images':>6} {'predict':>8} {'naive':>7} {'errors':>6} {'ms/img':>7}  most frequent confusions")
    totals = []
    with tempfile.TemporaryDirectory(prefix="cnnedge-eval-") as tmp:
        for style in styles:
            folder = Path(tmp) / style
            write_style(folder, style, args.per_digit, args.seed)
            acc, naive, n, errors, cm, seconds = evaluate(predictor, folder)
            totals.append((style, acc, naive, n))
            off = [(int(cm[i, j]), f"{i}->{j}") for i in range(10) for j in range(10) if i != j and cm[i, j]]
            worst = ", ".join(f"{name} x{c}" for c, name in sorted(off, reverse=True)[:4])
            print(f"{style:<11} {n:>6} {100 * acc:>7.1f}% {100 * naive:>6.1f}% {errors:>6} "
                  f"{1000 * seconds / n:>7.1f}  {worst}")
    hand = [t for t in totals if t[0] != "font"]
    for name, group in (("handwriting", hand), ("all styles", totals)):
        if group:
            n = sum(t[3] for t in group)
            acc = sum(t[1] * t[3] for t in group) / n
            naive = sum(t[2] * t[3] for t in group) / n
            print(f"{name:<11} {n:>6} {100 * acc:>7.1f}% {100 * naive:>6.1f}%")

    root = os.environ.get("CNNEDGE_DATA")
    photos = Path(root) / "handwritten_digits" if root else None
    if photos is not None and photos.is_dir():
        acc, naive, n, errors, _, _ = evaluate(predictor, photos)
        print(f"\nreal photos ({photos}): {100 * acc:.0f}% of {n} (naive pipeline: {100 * naive:.0f}%)")
    predictor.close()


if __name__ == "__main__":
    main()
