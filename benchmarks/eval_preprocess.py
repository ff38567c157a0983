"""Accuracy through `cnnedge predict` on realistic synthetic handwriting, per style.

    uv run python benchmarks/eval_preprocess.py                 # 300 images per style (30 per digit)
    uv run python benchmarks/eval_preprocess.py --per-digit 10 --styles paper,thin,app28
    uv run python benchmarks/eval_preprocess.py --model /tmp/cnn.onnx --images /tmp/styles --json after.json \
        --before before.json                                    # the same files, a before/after table

Every style of cnnedge.synth (pen photos, thin strokes on big canvases, RGBA marker, light on dark,
off-centre with specks and page edges, 16-bit, pencil, Hershey fonts, drawing apps' 28x28 exports,
canvas drawings, large digits on ruled paper, tilted pages on a dark table, digits turned by 20-30
degrees, the ways of writing MNIST under-represents) plus "sideways" (pen photos stored turned with an
EXIF orientation, as phones do) is rendered with a fixed seed, written as files in ImageFolder layout
and classified by `Predictor` end to end (decode, preprocess, onnxruntime). The same files also go
through a naive pipeline (grey, invert if the image is light, resize to 28x28) to show what the
preprocessing is worth. Also reports the photos in $CNNEDGE_DATA/handwritten_digits and samples/.

With --images the files are kept there (and reused when present), so that another checkout, the code
as it was before a change, can classify exactly the same files (copy this script into it and run it
with --json); --before then prints that run's accuracy next to this one's.
"""

from __future__ import annotations

import argparse
import json
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
from cnnedge.infer.modelinfo import default_model  # noqa: E402

EXTRA_STYLES = ("sideways",)  # pen photos stored turned, with an EXIF orientation


def write_style(folder: Path, style: str, per_digit: int, seed: int) -> None:
    from cnnedge.synth import render_digit, sideways_jpeg

    rng = np.random.default_rng([seed, zlib.crc32(style.encode())])
    for i in range(per_digit):
        for d in range(10):
            (folder / str(d)).mkdir(parents=True, exist_ok=True)
            if style == "sideways":
                photo = render_digit(d, "paper", rng)
                orientation = int(rng.choice([6, 6, 8, 3]))  # phones held upright write 6
                (folder / str(d) / f"{style}_{i:03d}.jpg").write_bytes(sideways_jpeg(photo, orientation))
            else:
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


def evaluate(predictor: Predictor, folder: Path, naive: bool = True) -> dict:
    t = time.perf_counter()
    preds = predictor.predict(folder)
    seconds = time.perf_counter() - t
    labels = [int(p.truth) for p in preds]
    ok = [p.label is not None and p.label == p.truth for p in preds]
    cm = confusion_matrix(labels, [p.index if p.index is not None else int(p.truth) for p in preds], 10)
    off = [(int(cm[i, j]), f"{i}->{j}") for i in range(10) for j in range(10) if i != j and cm[i, j]]
    return {
        "images": len(preds), "accuracy": float(np.mean(ok)), "errors": sum(p.error is not None for p in preds),
        "naive": naive_accuracy(predictor, [Path(p.path) for p in preds], labels) if naive else None,
        "ms_per_image": 1000 * seconds / max(len(preds), 1),
        "confusions": ", ".join(f"{name} x{c}" for c, name in sorted(off, reverse=True)[:4]),
        "wrong": [Path(p.path).name for p, good in zip(preds, ok) if not good],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(default_model()))
    ap.add_argument("--per-digit", type=int, default=30, help="images per digit and style")
    ap.add_argument("--styles", default=None, help="comma-separated (default: every style)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--images", default=None, help="keep the rendered files here (reused when present)")
    ap.add_argument("--json", default=None, help="write the per-style results here")
    ap.add_argument("--before", default=None, help="a --json file of an earlier run, shown next to this one")
    args = ap.parse_args()

    if args.styles:
        styles = [s for s in args.styles.split(",") if s]
    else:
        from cnnedge.synth import STYLES

        styles = [*STYLES, *EXTRA_STYLES]
    before = json.loads(Path(args.before).read_text())["styles"] if args.before else {}
    predictor = Predictor(args.model, "cpu")
    print(f"{args.per_digit * 10} images per style, seed {args.seed}, model {args.model}\n")
    was = f" {'before':>7}" if before else ""
    print(f"{'style':<11} {'images':>6}{was} {'predict':>8} {'naive':>7} {'errors':>6} {'ms/img':>7}  most frequent confusions")
    results = {}
    with tempfile.TemporaryDirectory(prefix="cnnedge-eval-") as tmp:
        root = Path(args.images) if args.images else Path(tmp)
        for style in styles:
            folder = root / f"{style}-{args.per_digit}-{args.seed}"
            if not folder.is_dir():
                write_style(folder, style, args.per_digit, args.seed)
            r = results[style] = evaluate(predictor, folder)
            was = f" {100 * before[style]['accuracy']:>6.1f}%" if style in before else (" " * 8 if before else "")
            print(f"{style:<11} {r['images']:>6}{was} {100 * r['accuracy']:>7.1f}% {100 * r['naive']:>6.1f}% "
                  f"{r['errors']:>6} {r['ms_per_image']:>7.1f}  {r['confusions']}")
    for name, group in (("handwriting", [s for s in results if s != "font"]), ("all styles", list(results))):
        if group:
            n = sum(results[s]["images"] for s in group)
            acc = sum(results[s]["accuracy"] * results[s]["images"] for s in group) / n
            naive = sum(results[s]["naive"] * results[s]["images"] for s in group) / n
            print(f"{name:<11} {n:>6}{' ' * 8 if before else ''} {100 * acc:>7.1f}% {100 * naive:>6.1f}%")

    data = os.environ.get("CNNEDGE_DATA")
    for name, folder in (("real photos", Path(data) / "handwritten_digits" if data else None), ("samples", ROOT / "samples")):
        if folder is not None and folder.is_dir():
            r = results[name] = evaluate(predictor, folder)
            right = round(r["accuracy"] * r["images"])
            print(f"\n{name} ({folder}): {right}/{r['images']} (naive pipeline: {100 * r['naive']:.0f}%)"
                  + (f"  wrong: {', '.join(r['wrong'])}" if r["wrong"] else ""))
    predictor.close()
    if args.json:
        Path(args.json).write_text(json.dumps({"model": args.model, "per_digit": args.per_digit, "seed": args.seed,
                                               "styles": results}, indent=1) + "\n")


if __name__ == "__main__":
    main()
