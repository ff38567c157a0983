"""`cnnedge predict` and the Python API: classify images with onnxruntime, OpenCV and numpy (no torch).

    from cnnedge import Predictor
    predictor = Predictor("export/cnn.onnx")
    for p in predictor.predict(["photo.jpg", "samples/", numpy_image]):
        print(p.path, p.label, p.confidence, p.error)

Files are read, decoded and preprocessed by a thread pool (OpenCV and file I/O release the GIL) while
the main thread runs the network on full batches, so decoding overlaps inference. Everything the
preprocessing needs (input size, normalisation, mode, class names) comes from the ONNX metadata.
With a gallery from `cnnedge enroll` (cnnedge.gallery), images get the class of the nearest prototype.
"""

from __future__ import annotations

import csv
import glob
import io
import json
import os
import re
import sys
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import cv2
import numpy as np

from cnnedge.errors import CnnedgeError, ExitCode
from cnnedge.gallery import Gallery
from cnnedge.metrics import classification_report, confusion_matrix
from cnnedge.modelinfo import EMBEDDING_NAME, LOGITS_NAME
from cnnedge.preprocess import (IMAGE_EXTENSIONS, ImageError, analyse, as_network_input, is_image_name, mnist_like,
                                natural_key, printable, quiet_native_stderr, read_image, scan_folder)
from cnnedge.runtime import Runtime, softmax, topk as top_k

DEFAULT_MODEL = "export/cnn.onnx"
FORMATS = ("table", "json", "csv")
CHUNK = 32  # images per thread-pool task: big enough to amortise the task overhead


@dataclass
class Prediction:
    path: str | None  # None for arrays given to the API
    label: str | None = None  # None when the input failed
    index: int | None = None
    confidence: float | None = None
    topk: list[tuple[str, float]] = field(default_factory=list)
    error: str | None = None
    truth: str | None = None  # the class folder the file sits in (ImageFolder layout), if any
    box: tuple[int, int, int, int] | None = None  # where preprocessing found the symbol (x, y, w, h)
    metric: str | None = None  # with a gallery: the distance used, and the distance to every class
    distances: dict[str, float] | None = None
    embedding: np.ndarray | None = field(default=None, repr=False)  # when the Predictor keeps embeddings

    def to_dict(self) -> dict:
        d = {
            "path": self.path,
            "label": self.label,
            "confidence": self.confidence,
            "topk": [{"label": name, "probability": p} for name, p in self.topk],
            "error": self.error,
            "truth": self.truth,
        }
        if self.metric is not None:
            for t in d["topk"]:
                t["distance"] = self.distances[t["label"]]
            d.update(metric=self.metric, distances=self.distances)
        return d


# -------------------------------------------------------------------------------------- inputs


def collect_inputs(args: Iterable[str | os.PathLike], recursive: bool = False) -> tuple[list[str], list[tuple[str, str]]]:
    """Files, folders and glob patterns -> (image paths in order without duplicates, [(arg, problem)]).
    Files named explicitly are kept whatever their extension: if they are not images, decoding says so."""
    paths: list[str] = []
    problems: list[tuple[str, str]] = []
    for arg in args:
        arg = str(arg)
        p = Path(arg)
        if p.is_dir():
            found = scan_folder(p, recursive)
            if not found:
                problems.append((arg, f"no {'/'.join(e[1:] for e in IMAGE_EXTENSIONS)} images in this folder"
                                      + ("" if recursive else " or its subfolders (try --recursive)")))
            paths += [str(f) for f in found]
        elif p.exists() or p.is_symlink():
            paths.append(arg)
        elif glob.has_magic(arg):
            matches = sorted(glob.glob(arg, recursive=recursive), key=lambda m: natural_key(Path(m)))
            if not matches:
                problems.append((arg, "no file matches this pattern"))
            for m in matches:
                if Path(m).is_dir():
                    paths += [str(f) for f in scan_folder(Path(m), recursive)]
                elif is_image_name(Path(m)):
                    paths.append(m)
        else:
            problems.append((arg, "no such file or directory"))
    seen: set[str] = set()
    unique = []
    for path in paths:
        key = os.path.normpath(os.path.abspath(path))
        if key not in seen:
            seen.add(key)
            unique.append(path)
    return unique, problems


# ------------------------------------------------------------------------------------ predictor


class Predictor:
    """Preprocessing + onnxruntime inference for a cnnedge ONNX model. Use it from one thread at a time;
    create one per process and reuse it (the session is the expensive part).

    With `gallery` (a file from `cnnedge enroll`, or a Gallery) the labels are the gallery's classes, found
    by the nearest prototype under `metric` (default: the gallery's); `embeddings=True` keeps each image's
    embedding in `Prediction.embedding`."""

    def __init__(self, model: str | os.PathLike = DEFAULT_MODEL, provider: str = "auto", batch_size: int = 256,
                 workers: int | None = None, topk: int = 3, threads: int | None = None,
                 gallery: str | os.PathLike | Gallery | None = None, metric: str | None = None,
                 embeddings: bool = False):
        if batch_size < 1:
            raise CnnedgeError(f"--batch-size must be at least 1, not {batch_size}")
        if topk < 1:
            raise CnnedgeError(f"--topk must be at least 1, not {topk}")
        if metric is not None and gallery is None:
            raise CnnedgeError("--metric needs --gallery (a file from `cnnedge enroll`)")
        if gallery is not None and not isinstance(gallery, Gallery):
            gallery = Gallery.load(gallery)  # before the model: a bad gallery fails fast
        self.runtime = Runtime(model, provider, threads)
        self.info = self.runtime.info
        self.model = str(model)
        self.provider = self.runtime.provider
        self.class_names = self.info.class_names
        self.gallery = gallery
        self.metric = None
        if gallery is not None:
            gallery.check_model(self.runtime)
            self.metric = gallery.resolve_metric(metric)
            self.class_names = gallery.class_names
        self.keep_embeddings = embeddings or gallery is not None
        self.batch_size = batch_size
        self.topk = topk
        self.workers = max(1, workers or min(8, os.cpu_count() or 1))
        channels, height, width = self.info.input_shape
        if height != width:
            raise CnnedgeError(f"{model}: non-square input {height}x{width} is not supported by the preprocessing")
        self.size = height
        self.channels = channels
        self._pool: ThreadPoolExecutor | None = None

    # The pool lives as long as the predictor: threads are cheap to keep, slow to start per call.
    @property
    def pool(self) -> ThreadPoolExecutor:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="cnnedge-prep")
        return self._pool

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def preprocess(self, image: np.ndarray):
        """A decoded image -> the `Prepared` network input (see cnnedge.preprocess.analyse)."""
        return analyse(image, self.info.preprocess, self.size)

    def _prepare(self, image: np.ndarray) -> tuple[np.ndarray | None, str | None, tuple | None]:
        try:
            prepared = self.preprocess(image)
            return prepared.input, None, prepared.box
        except ImageError as e:
            return None, str(e), None
        except (cv2.error, ValueError, MemoryError) as e:  # pathological inputs OpenCV or numpy reject
            return None, f"cannot be processed ({type(e).__name__}: {' '.join(str(e).split())[:120]})", None

    def _prepare_chunk(self, chunk: list) -> list:
        """Decode and preprocess a chunk of paths or arrays -> [(input or None, error or None, box)]."""
        out: list = [None] * len(chunk)
        images: list = [None] * len(chunk)
        for i, item in enumerate(chunk):
            if isinstance(item, np.ndarray):
                images[i] = item
                continue
            try:
                images[i] = read_image(item)
            except ImageError as e:
                out[i] = (None, str(e), None)
        # Fast path: 8-bit grey files that already are MNIST-style inputs, checked as one stack.
        s = self.size
        fast = [i for i, im in enumerate(images) if im is not None and im.dtype == np.uint8 and im.shape == (s, s)]
        if fast:
            stack = np.stack([images[i] for i in fast]).astype(np.float32) * np.float32(1 / 255)
            ok = mnist_like(stack)
            ready = as_network_input(stack[ok])
            for j, i in enumerate(np.asarray(fast)[ok]):
                out[i] = (ready[j], None, (0, 0, s, s))
        for i, im in enumerate(images):
            if out[i] is None:
                out[i] = self._prepare(im)
        return out

    def _truth(self, path: str | None) -> str | None:
        if path is None:
            return None
        parent = Path(path).parent.name
        return parent if parent in self.class_names else None

    def predict(self, images, topk: int | None = None) -> list[Prediction]:
        """Predictions for an image path, a decoded image (numpy array: grey, BGR or BGRA), a folder, a
        stack of images (N, H, W) or (N, H, W, C), or a list of them, in input order. Inputs that fail carry
        `error` instead of a label."""
        if isinstance(images, np.ndarray):
            stack = images.ndim == 4 or (images.ndim == 3 and images.shape[2] not in (1, 3, 4))
            images = list(images) if stack else [images]
        elif isinstance(images, (str, os.PathLike)):
            images = [images]
        items = []
        for item in images:
            if isinstance(item, (str, os.PathLike)) and Path(item).is_dir():
                items += [str(p) for p in scan_folder(Path(item))]
            else:
                items.append(item if isinstance(item, np.ndarray) else str(item))
        return list(self.predict_iter(items, topk))

    def predict_iter(self, items: Iterable, topk: int | None = None, save_crops: str | os.PathLike | None = None,
                     on_batch=None) -> Iterator[Prediction]:
        """Stream predictions for paths or arrays, in input order. Decoding and preprocessing run in the
        thread pool, inference in the calling thread on batches of `batch_size`."""
        k = topk or self.topk
        items = iter(items)
        chunk_size = max(1, min(CHUNK, self.batch_size))
        pending: deque = deque()
        buffered: list[tuple] = []  # (item, input or None, error, box) in input order
        ready = 0
        index = 0

        def submit() -> bool:
            chunk = []
            for item in items:
                chunk.append(item)
                if len(chunk) == chunk_size:
                    break
            if chunk:
                pending.append((chunk, self.pool.submit(self._prepare_chunk, chunk)))
            return bool(chunk)

        for _ in range(2 * self.workers + 1):
            if not submit():
                break
        while pending:
            chunk, future = pending.popleft()
            submit()  # keep the pool busy while this chunk is consumed
            for item, (x, error, box) in zip(chunk, future.result()):
                buffered.append((item, x, error, box))
                ready += x is not None
            if ready >= self.batch_size or not pending:
                for p in self._infer(buffered, k, index, save_crops):
                    yield p
                index += len(buffered)
                if on_batch is not None:
                    on_batch(len(buffered))
                buffered, ready = [], 0

    def _infer(self, buffered: list[tuple], k: int, start: int, save_crops) -> list[Prediction]:
        good = [i for i, b in enumerate(buffered) if b[1] is not None]
        probs = np.zeros((0, len(self.class_names)), np.float32)
        dist = embeddings = None
        if good:
            x = np.stack([buffered[i][1] for i in good])
            if self.channels != 1:
                x = np.repeat(x[:, None], self.channels, axis=1)
            batches = range(0, len(x), self.batch_size)
            if not self.keep_embeddings:
                probs = np.concatenate([self.runtime.probabilities(x[s: s + self.batch_size]) for s in batches])
            else:
                outs = [self.runtime.run(x[s: s + self.batch_size], (LOGITS_NAME, EMBEDDING_NAME)) for s in batches]
                embeddings = np.concatenate([o[1] for o in outs]).astype(np.float32, copy=False)
                if self.gallery is None:
                    probs = softmax(np.concatenate([o[0] for o in outs]).astype(np.float32, copy=False))
                else:
                    dist, probs = self.gallery.classify(embeddings, self.metric)
        idx, val = top_k(probs, k) if len(good) else (None, None)
        if dist is not None:  # rank by distance itself: confidences of far classes can all round to 0
            idx = top_k(-dist, k)[0]
            val = np.take_along_axis(probs, idx, axis=1)
        row = {i: r for r, i in enumerate(good)}
        out = []
        for i, (item, x, error, box) in enumerate(buffered):
            path = None if isinstance(item, np.ndarray) else str(item)
            p = Prediction(path=path, error=error, truth=self._truth(path), box=box, metric=self.metric)
            if i in row:
                r = row[i]
                p.index = int(idx[r, 0])
                p.label = self.class_names[p.index]
                p.confidence = float(val[r, 0])
                p.topk = [(self.class_names[int(j)], float(v)) for j, v in zip(idx[r], val[r])]
                if embeddings is not None:
                    p.embedding = embeddings[r]
                if dist is not None:
                    p.distances = {name: float(v) for name, v in zip(self.class_names, dist[r])}
                if save_crops is not None:
                    _save_crop(Path(save_crops), start + i, path, p.label, x)
            out.append(p)
        return out


def _save_crop(folder: Path, index: int, path: str | None, label: str, x: np.ndarray) -> None:
    from cnnedge.atomic import write_bytes

    stem = re.sub(r"[^\w.-]+", "_", Path(path).stem)[:60] if path else "array"
    ok, png = cv2.imencode(".png", np.clip(x * 255 + 0.5, 0, 255).astype(np.uint8))
    safe_label = re.sub(r"[^\w.-]+", "_", label)
    target = folder / f"{index:06d}_{stem}_pred-{safe_label}.png"
    try:
        if ok:
            write_bytes(target, png.tobytes())
    except OSError as e:
        raise CnnedgeError(f"--save-crops {folder}: cannot write {target.name} ({e.strerror or e})") from None


# ---------------------------------------------------------------------------------------- report


@dataclass
class Summary:
    images: int
    errors: int
    seconds: float
    report: dict | None  # classification_report over the inputs in class folders, else None

    @property
    def images_per_second(self) -> float:
        done = self.images - self.errors
        return done / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict:
        d = {"images": self.images, "errors": self.errors, "seconds": round(self.seconds, 4),
             "images_per_second": round(self.images_per_second, 1),
             "accuracy": self.report["accuracy"] if self.report else None}
        if self.report:
            d["labelled"] = self.report["labelled"]
            d["per_class_accuracy"] = self.report["per_class_accuracy"]
            d["confusion_matrix"] = self.report["confusion_matrix"]
            d["class_names"] = self.report["class_names"]
        return d


def summarise(predictions: list[Prediction], class_names: list[str], seconds: float) -> Summary:
    errors = sum(p.error is not None for p in predictions)
    labelled = [p for p in predictions if p.truth is not None and p.label is not None]
    report = None
    if labelled:
        cm = confusion_matrix([class_names.index(p.truth) for p in labelled], [p.index for p in labelled],
                              len(class_names))
        report = {**classification_report(cm, class_names), "labelled": len(labelled)}
    return Summary(len(predictions), errors, seconds, report)


def _bar(p: float, width: int = 10) -> str:
    full = int(round(p * width))
    return "█" * full + "·" * (width - full)


def render_table(predictions: list[Prediction], summary: Summary, model: str, provider: str, k: int) -> None:
    from rich.markup import escape
    from rich.table import Table

    from cnnedge.report import confusion_table, console, per_class_table

    show_truth = any(p.truth is not None for p in predictions)
    metric = next((p.metric for p in predictions if p.metric), None)  # a gallery: distances, not probabilities
    table = Table(title=f"{escape(model)} on {provider}", title_justify="left")
    table.add_column("file", overflow="fold")
    if show_truth:
        table.add_column("true")
    table.add_column("prediction", justify="center")
    table.add_column("confidence", justify="right")
    table.add_column(f"top {k}" if metric is None else f"nearest {k} ({metric} distance)")
    cwd = os.getcwd()
    for p in predictions:
        if p.label is None:
            continue  # failed inputs were reported on stderr
        name = printable(p.path) if p.path is not None else "<array>"
        if p.path is not None and os.path.isabs(name):
            with_cwd = os.path.relpath(name, cwd)
            name = name if with_cwd.startswith("..") else with_cwd
        colour = "" if p.truth is None else ("green" if p.truth == p.label else "bold red")
        pred = f"[{colour}]{escape(p.label)}[/]" if colour else escape(p.label)
        if metric is None:
            bars = "  ".join(f"{escape(n)} [cyan]{_bar(v)}[/] {100 * v:3.0f}%" for n, v in p.topk)
        else:
            bars = "  ".join(f"{escape(n)} {p.distances[n]:.4g}" for n, _ in p.topk)
        cells = [escape(name)] + ([escape(p.truth or "")] if show_truth else []) + [pred, f"{p.confidence:.3f}", bars]
        table.add_row(*cells)
    if table.row_count:
        console.print(table)
    if summary.report:
        names = summary.report["class_names"]
        cm = np.asarray(summary.report["confusion_matrix"])
        present = [i for i in range(len(names)) if cm[i].sum() or cm[:, i].sum()]
        sub = cm[np.ix_(present, present)]
        sub_names = [names[i] for i in present]
        console.print(per_class_table(sub, sub_names))
        console.print(confusion_table(sub, sub_names))
    line = (f"{summary.images} images, {summary.errors} errors, {summary.images_per_second:,.0f} images/s "
            f"({summary.seconds:.2f} s), provider {provider}")
    if summary.report:
        correct = int(round(summary.report["accuracy"] * summary.report["labelled"]))
        line += f", accuracy {100 * summary.report['accuracy']:.2f}% ({correct}/{summary.report['labelled']} in class folders)"
    console.print(line, markup=False)


def render_json(predictions: list[Prediction], summary: Summary, model: str, provider: str,
                gallery: str | None = None, metric: str | None = None) -> str:
    doc = {"model": model, "provider": provider}
    if gallery is not None:
        doc.update(gallery=gallery, metric=metric)
    doc.update(results=[p.to_dict() for p in predictions], summary=summary.to_dict())
    return json.dumps(doc, indent=2)


def render_csv(predictions: list[Prediction]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["path", "label", "confidence", "topk", "error", "truth"])
    for p in predictions:
        w.writerow([printable(p.path) if p.path is not None else "<array>", p.label or "",
                    "" if p.confidence is None else f"{p.confidence:.6f}",
                    ";".join(f"{n}:{v:.6f}" for n, v in p.topk), p.error or "", p.truth or ""])
    return buf.getvalue()


# -------------------------------------------------------------------------------------------- CLI


def run(inputs: list[str], model: str = DEFAULT_MODEL, provider: str = "auto", recursive: bool = False,
        batch_size: int = 256, topk: int = 3, fmt: str = "table", save_crops: str | None = None,
        workers: int | None = None, gallery: str | None = None, metric: str | None = None) -> int:
    """The `cnnedge predict` command; returns the exit code (0 all fine, 1 some inputs failed)."""
    from cnnedge.report import err_console, warn

    if fmt not in FORMATS:
        raise CnnedgeError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if not inputs:
        raise CnnedgeError("no inputs: give image files, folders or glob patterns")
    paths, problems = collect_inputs(inputs, recursive)
    for arg, problem in problems:
        warn(f"{printable(arg)}: {problem}")
    if not paths:
        raise CnnedgeError("no images to predict" + (f" ({len(problems)} input(s) reported above)" if problems else ""))
    if save_crops is not None and Path(save_crops).exists() and not Path(save_crops).is_dir():
        raise CnnedgeError(f"--save-crops {save_crops}: exists and is not a folder")

    predictor = Predictor(model, provider, batch_size=batch_size, workers=workers, topk=topk, gallery=gallery,
                          metric=metric)
    predictions: list[Prediction] = []
    start = time.perf_counter()
    with predictor, quiet_native_stderr(), _progress(len(paths), err_console) as advance:
        for p in predictor.predict_iter(paths, save_crops=save_crops, on_batch=advance):
            if p.error is not None:
                warn(f"{printable(p.path)}: {p.error}; skipped")
            predictions.append(p)
    seconds = time.perf_counter() - start
    summary = summarise(predictions, predictor.class_names, seconds)
    if fmt == "table":
        title = model if gallery is None else f"{model} + {gallery}"
        render_table(predictions, summary, title, predictor.provider, topk)
    else:
        text = (render_json(predictions, summary, model, predictor.provider, gallery, predictor.metric)
                if fmt == "json" else render_csv(predictions))
        sys.stdout.write(text if text.endswith("\n") else text + "\n")
        sys.stdout.flush()
    return int(ExitCode.PARTIAL) if summary.errors or problems else int(ExitCode.OK)


class _progress:
    """A transient rich progress bar on stderr for long runs on a terminal; a no-op otherwise."""

    def __init__(self, total: int, console):
        self.total, self.console, self.bar = total, console, None

    def __enter__(self):
        if self.total >= 2000 and self.console.is_terminal:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

            self.bar = Progress("predict", BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                                console=self.console, transient=True)
            self.bar.start()
            self.task = self.bar.add_task("predict", total=self.total)
            return lambda n: self.bar.advance(self.task, n)
        return lambda n: None

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.stop()
