"""End-to-end throughput of `cnnedge predict` (files -> decode -> preprocess -> onnxruntime -> top-k).

    CNNEDGE_DATA=../shared/data uv run python benchmarks/bench_predict.py

1. 10,000 28x28 PNGs (the MNIST test set when CNNEDGE_DATA has it, else synthetic MNIST-like digits)
   through `Predictor`, against the per-image loop most PyTorch code uses: PIL open + torchvision
   transforms + the same checkpoint in eager mode. Goals: >= 3,000 images/s and >= 5x the loop.
2. 640x480 phone-photo-like JPEGs (synthetic pen on paper) through `Predictor`: images/s.
3. `--save-crops`: the 10,000 PNGs of [1] again, writing every 28x28 network input as a PNG, against the
   same run without it. Goal: at most 1.5x the time (an fsync per crop made it 19x).

Both read files from a temporary folder that the OS has cached (each run is preceded by a warm-up).
Accuracy is printed too, so a fast but wrong pipeline cannot look good.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cnnedge.infer.files import read_idx  # noqa: E402
from cnnedge.infer.predictor import Predictor  # noqa: E402
from cnnedge.synth import render_digit  # noqa: E402
from cnnedge.infer.modelinfo import default_model  # noqa: E402


def mnist_pngs(folder: Path, n: int) -> tuple[list[str], np.ndarray, str]:
    root = os.environ.get("CNNEDGE_DATA")
    raw = Path(root) / "MNIST" / "raw" if root else None
    if raw is not None and (raw / "t10k-images-idx3-ubyte").exists():
        images = read_idx(raw / "t10k-images-idx3-ubyte")[:n]
        labels = read_idx(raw / "t10k-labels-idx1-ubyte")[:n].astype(int)
        source = "MNIST test set"
    else:
        rng = np.random.default_rng(0)
        labels = np.arange(n) % 10
        images = np.stack([render_digit(int(d), "mnist", rng) for d in labels])
        source = "synthetic MNIST-like digits (set CNNEDGE_DATA for the real test set)"
    paths = []
    for i, (img, y) in enumerate(zip(images, labels)):
        p = folder / f"{i:05d}_{y}.png"
        cv2.imwrite(str(p), img)
        paths.append(str(p))
    return paths, labels, source


def photo_jpegs(folder: Path, n: int) -> tuple[list[str], np.ndarray]:
    rng = np.random.default_rng(1)
    labels = np.arange(n) % 10
    paths = []
    for i, d in enumerate(labels):
        img = render_digit(int(d), "paper", rng)
        img = cv2.resize(img, (640, 480), interpolation=cv2.INTER_AREA)
        p = folder / f"photo_{i:04d}_{d}.jpg"
        cv2.imwrite(str(p), img, [cv2.IMWRITE_JPEG_QUALITY, 90])
        paths.append(str(p))
    return paths, labels


def time_predictor(predictor: Predictor, paths: list[str], repeats: int) -> tuple[float, np.ndarray]:
    list(predictor.predict_iter(paths[: min(len(paths), 512)]))  # warm-up: threads, session, page cache
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        preds = list(predictor.predict_iter(paths))
        best = min(best, time.perf_counter() - t)
    return best, np.array([p.index if p.index is not None else -1 for p in preds])


def time_save_crops(predictor: Predictor, paths: list[str], folder: Path, repeats: int) -> tuple[float, float]:
    """(best seconds without crops, best seconds writing a crop per image into `folder`), runs interleaved."""
    plain, crops = float("inf"), float("inf")
    for i in range(repeats):
        t = time.perf_counter()
        list(predictor.predict_iter(paths))
        plain = min(plain, time.perf_counter() - t)
        target = folder / f"run{i}"
        t = time.perf_counter()
        list(predictor.predict_iter(paths, save_crops=target))
        crops = min(crops, time.perf_counter() - t)
    return plain, crops


def time_torch_loop(checkpoint: str, paths: list[str], n: int) -> tuple[float, np.ndarray]:
    import torch
    from PIL import Image
    from torchvision import transforms

    from cnnedge.train.checkpoint import load_checkpoint, model_from_checkpoint

    ckpt = load_checkpoint(checkpoint)
    model = model_from_checkpoint(ckpt).eval()
    tf = transforms.Compose([transforms.Grayscale(), transforms.Resize((28, 28)), transforms.ToTensor(),
                             transforms.Normalize(ckpt["mean"], ckpt["std"])])
    preds = []
    with torch.inference_mode():
        for p in paths[:50]:  # warm-up
            model(tf(Image.open(p)).unsqueeze(0))
        t = time.perf_counter()
        for p in paths[:n]:
            with Image.open(p) as img:
                x = tf(img).unsqueeze(0)
            preds.append(int(model(x).argmax(1)))
        seconds = time.perf_counter() - t
    return seconds, np.array(preds)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(default_model()))
    ap.add_argument("--checkpoint", default=str(ROOT / "models/cnn.pt"))
    ap.add_argument("--images", type=int, default=10_000)
    ap.add_argument("--photos", type=int, default=300)
    ap.add_argument("--torch-images", type=int, default=2_000, help="images timed in the PyTorch loop (rate)")
    ap.add_argument("--batch-size", type=int, default=512)
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--threads", type=int, default=None, help="onnxruntime intra-op threads")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    print(f"machine: {os.cpu_count()} CPUs; load average {os.getloadavg()[0]:.2f} (other processes slow this down)")
    with tempfile.TemporaryDirectory(prefix="cnnedge-bench-") as tmp:
        tmp = Path(tmp)
        (tmp / "mnist").mkdir()
        (tmp / "photos").mkdir()
        paths, labels, source = mnist_pngs(tmp / "mnist", args.images)
        predictor = Predictor(args.model, "cpu", batch_size=args.batch_size, workers=args.workers,
                              threads=args.threads)
        seconds, preds = time_predictor(predictor, paths, args.repeats)
        rate = len(paths) / seconds
        print(f"\n[1] {len(paths):,} 28x28 PNGs ({source})")
        print(f"    cnnedge Predictor (onnxruntime {predictor.provider}, batch {args.batch_size}, "
              f"{predictor.workers} threads): {seconds:.2f} s = {rate:,.0f} images/s, "
              f"accuracy {100 * np.mean(preds == labels):.2f}%")

        n = min(args.torch_images, len(paths))
        t_seconds, t_preds = time_torch_loop(args.checkpoint, paths, n)
        t_rate = n / t_seconds
        print(f"    PIL + torchvision + PyTorch eager, one image at a time: {n:,} images in {t_seconds:.2f} s = "
              f"{t_rate:,.0f} images/s, accuracy {100 * np.mean(t_preds == labels[:n]):.2f}%")
        print(f"    speed-up: {rate / t_rate:.1f}x   (goals: >= 3,000 images/s, >= 5x)")

        plain, crops = time_save_crops(predictor, paths, tmp / "crops", args.repeats)
        print(f"\n[3] the same {len(paths):,} PNGs with --save-crops: {crops:.2f} s against {plain:.2f} s without "
              f"= {crops / plain:.2f}x   (goal: <= 1.5x)")

        photos, photo_labels = photo_jpegs(tmp / "photos", args.photos)
        seconds, preds = time_predictor(predictor, photos, max(1, args.repeats - 1))
        print(f"\n[2] {len(photos)} 640x480 JPEG photos of pen on paper (synthetic)")
        print(f"    cnnedge Predictor: {seconds:.2f} s = {len(photos) / seconds:,.1f} images/s, "
              f"accuracy {100 * np.mean(preds == photo_labels):.2f}%")
        predictor.close()


if __name__ == "__main__":
    main()
