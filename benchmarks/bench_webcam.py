"""Per-frame latency of `cnnedge webcam` and its frame rate on a video file.

    uv run python benchmarks/bench_webcam.py            # --frames 300 --model export/cnn.onnx

1. A 640x480 clip of pen digits on paper (30 digits drifting across the centre, camera blur and noise),
   written with cv2.VideoWriter and decoded once.
2. The per-frame pipeline at batch 1, stage by stage: ROI crop + shrink + preprocessing, onnxruntime,
   overlay, and the total, as p50/p99 over every frame, for several ROI working sizes and thread
   settings. Goal: total p50 <= 2 ms on the project's 2-core CPU. The labels are checked too, so a
   fast but wrong setting cannot look good.
3. Where preprocessing spends its time on these ROI crops (cProfile, own time per function).
4. Small digits: still frames with digits 50-140 px tall, labelled right at working sizes 96 and 128.
5. End to end: `cnnedge webcam --source clip --no-window --format json` (and with --save) as a user
   runs it, in a subprocess: frames per second and the latency it reports.

The machine's load average is printed before and after: figures taken under load are not the CPU's.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import math
import os
import platform
import pstats
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cnnedge import synth  # noqa: E402
from cnnedge.infer.preprocess import analyse  # noqa: E402
from cnnedge.infer.webcam import FrameClassifier, draw_overlay, resolve_roi  # noqa: E402
from cnnedge.infer.modelinfo import default_model  # noqa: E402

W, H = 640, 480


def make_clip(path: Path, n_frames: int, seed: int = 0) -> list[str | None]:
    """A pen digit per 10 frames, drifting across the centre of a page; returns the digit per frame."""
    rng = np.random.default_rng(seed)
    page = synth.paper((H, W), rng, shadow=False, lighting=0.2)
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 30.0, (W, H))
    labels: list[str | None] = []
    while len(labels) < n_frames:
        d = int(rng.integers(10))
        strokes = synth.digit_strokes(d, rng)
        height, width, a = rng.uniform(110, 170), rng.uniform(7, 14), rng.uniform(0, 2 * math.pi)
        for j in range(min(10, n_frames - len(labels))):
            t = j / 4.5 - 1
            centre = (W / 2 + 25 * math.cos(a) * t, H / 2 + 18 * math.sin(a) * t)
            cov = synth.draw_strokes((H, W), strokes, centre, height, width, rng, supersample=2)
            img = page * (1 - cov[..., None]) + np.float32([0.3, 0.12, 0.08]) * cov[..., None]
            writer.write(synth.camera(img, rng, blur=(0.3, 0.8), noise=(0.005, 0.015), jpeg=None))
            labels.append(str(d))
    writer.release()
    return labels


def read_frames(path: Path) -> list[np.ndarray]:
    cap = cv2.VideoCapture(str(path))
    frames = []
    while True:
        ok, frame = cap.read()
        if not ok:
            return frames
        frames.append(frame)


def pct(values, q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def stages(model: str, frames, labels, settings, repeats: int) -> list[dict]:
    """Per-stage timings for each (work_size, onnxruntime threads, OpenCV threads) setting. The settings
    take turns, pass after pass, so that a change in the machine's load hits them all alike."""
    roi = resolve_roi(None, W, H)
    runs = []
    for work_size, ort_threads, cv_threads, _ in settings:
        clf = FrameClassifier(model, "cpu", smooth=1, work_size=work_size, threads=ort_threads)
        runs.append({"clf": clf, "cv": cv_threads, "prep": [], "infer": [], "overlay": [], "total": [], "right": 0})
    for r in runs:  # warm-up: first-call allocations, caches
        cv2.setNumThreads(r["cv"])
        for f in frames[:20]:
            r["clf"].classify(f.copy(), 0, roi)
    for _ in range(repeats):
        for r in runs:
            cv2.setNumThreads(r["cv"])
            for i, (frame, label) in enumerate(zip(frames, labels)):
                frame = frame.copy()  # the pipeline draws on the frame it gets
                t0 = time.perf_counter()
                res = r["clf"].classify(frame, i, roi)
                t1 = time.perf_counter()
                draw_overlay(frame, res, 30.0, show_input=True)
                t2 = time.perf_counter()
                r["prep"].append(res.prep_ms)
                r["infer"].append(res.infer_ms)
                r["overlay"].append(1e3 * (t2 - t1))
                r["total"].append(1e3 * (t2 - t0))
                r["right"] += res.label == label
    for r in runs:
        r["accuracy"] = r["right"] / (repeats * len(frames))
    return runs


def hot_spots(frames, work_size: int, top: int = 8) -> None:
    cv2.setNumThreads(1)
    x, y, w, h = resolve_roi(None, W, H)
    s = min(1.0, work_size / max(w, h))
    crops = [cv2.resize(f[y: y + h, x: x + w], (round(w * s), round(h * s)), interpolation=cv2.INTER_AREA) for f in frames]
    profile = cProfile.Profile()
    profile.enable()
    for crop in crops:
        analyse(crop, "digit", 28)
    profile.disable()
    stats = pstats.Stats(profile)
    rows = sorted(stats.stats.items(), key=lambda kv: -kv[1][2])[:top]  # by own time
    print(f"\npreprocessing hot spots on {len(crops)} ROI crops of {crops[0].shape[1]}x{crops[0].shape[0]} "
          f"(cProfile own time per crop; profiling adds overhead):")
    for (file, line, name), (cc, nc, tt, ct, callers) in rows:
        where = f"{Path(file).name}:{line} {name}" if file != "~" else name
        print(f"  {1e3 * tt / len(crops):6.3f} ms  {nc / len(crops):5.1f} calls  {where}")


def end_to_end(clip: Path, save: Path | None) -> dict:
    cmd = [sys.executable, "-m", "cnnedge", "webcam", "--source", str(clip), "--no-window", "--format", "json"]
    if save is not None:
        cmd += ["--save", str(save)]
    t = time.perf_counter()
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=True)
    wall = time.perf_counter() - t
    summary = json.loads(r.stdout.splitlines()[-1])["summary"]
    summary["wall"] = wall
    return summary


def small_digits(model: str, n: int = 200, seed: int = 5) -> None:
    """Why the working size is not smaller: the share of still frames labelled right when the digit is
    small in the frame, per working size (a smaller size is faster but loses small digits)."""
    rng = np.random.default_rng(seed)
    page = synth.paper((H, W), rng, shadow=False, lighting=0.2)
    roi = resolve_roi(None, W, H)
    print("\nstill frames of one digit, labelled right (200 per row):")
    for low, high in ((50, 70), (70, 100), (100, 140)):
        frames = []
        for _ in range(n):
            d, height = int(rng.integers(10)), rng.uniform(low, high)
            centre = (W / 2 + rng.uniform(-30, 30), H / 2 + rng.uniform(-30, 30))
            cov = synth.draw_strokes((H, W), synth.digit_strokes(d, rng), centre, height,
                                     max(2.0, height * rng.uniform(0.05, 0.09)), rng, supersample=2)
            img = page * (1 - cov[..., None]) + np.float32([0.3, 0.12, 0.08]) * cov[..., None]
            frames.append((synth.camera(img, rng, blur=(0.3, 0.8), noise=(0.005, 0.015), jpeg=None), str(d)))
        cells = []
        for work_size in (96, 128):
            clf = FrameClassifier(model, "cpu", smooth=1, work_size=work_size)
            right = sum(clf.classify(f, i, roi).label == d for i, (f, d) in enumerate(frames))
            cells.append(f"work {work_size}: {right}/{n}")
        print(f"  digits {low}-{high} px tall   " + "   ".join(cells))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--frames", type=int, default=300)
    ap.add_argument("--repeats", type=int, default=3, help="passes over the clip per setting")
    ap.add_argument("--model", default=str(default_model()))
    args = ap.parse_args()

    print(f"cpu: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
          f"load average before: {', '.join(f'{v:.2f}' for v in os.getloadavg())}")
    with tempfile.TemporaryDirectory() as tmp:
        clip = Path(tmp) / "clip.mp4"
        labels = make_clip(clip, args.frames)
        frames = read_frames(clip)
        assert len(frames) == len(labels), (len(frames), len(labels))
        print(f"clip: {len(frames)} frames {W}x{H}, default ROI {resolve_roi(None, W, H)}")

        print("\nper frame, batch 1 (ms)                       prep p50/p99    infer p50/p99  overlay p50/p99  "
              "total p50/p99   accuracy")
        settings = [(128, 1, 1, "default"), (128, 2, 1, "onnxruntime 2 threads"), (128, 1, 2, "OpenCV 2 threads"),
                    (96, 1, 1, ""), (160, 1, 1, ""), (10_000, 1, 1, "ROI not shrunk (288 px)")]
        for (work_size, ort_threads, cv_threads, note), r in zip(settings, stages(args.model, frames, labels, settings,
                                                                                    args.repeats)):
            cells = "  ".join(f"{pct(r[k], 50):6.3f} /{pct(r[k], 99):6.3f}" for k in ("prep", "infer", "overlay", "total"))
            name = f"work {work_size if work_size < 10_000 else 'full'}, ort {ort_threads}, cv {cv_threads}"
            print(f"  {name:<24} {note:<22} {cells}   {100 * r['accuracy']:5.1f}%")

        hot_spots(frames, 128)
        small_digits(args.model)

        print("\nend to end: cnnedge webcam --source clip.mp4 --no-window --format json")
        for save in (None, Path(tmp) / "annotated.mp4"):
            s = end_to_end(clip, save)
            lat = s["latency_ms"]
            print(f"  {'with --save' if save else 'no overlay ':<12} {s['frames']} frames, {s['fps']:.1f} FPS "
                  f"(processing loop), latency p50 {lat['p50']:.2f} ms p99 {lat['p99']:.2f} ms, "
                  f"{s['with_digit']} with a digit; {s['wall']:.2f} s wall incl. start-up")
    print(f"\nload average after: {', '.join(f'{v:.2f}' for v in os.getloadavg())}")


if __name__ == "__main__":
    main()
