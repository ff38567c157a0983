"""The Python API behind predict, enroll and serve: classify images with onnxruntime (or OpenCV DNN), OpenCV
and numpy.

    from cnnedge import Predictor
    predictor = Predictor()                     # the shipped model; or Predictor("export/my.onnx")
    predictor = Predictor(runtime="opencv")     # OpenCV DNN runs the network: boards without onnxruntime
    for p in predictor.predict(["photo.jpg", "samples/", numpy_image, png_bytes]):
        print(p.path, p.label, p.confidence, p.error)

Files are read, decoded and preprocessed by a thread pool (OpenCV and file I/O release the GIL) while
the main thread runs the network on full batches, so decoding overlaps inference. Everything the
preprocessing needs (input size, normalisation, mode, class names) comes from the ONNX metadata.
With a gallery from `cnnedge enroll` (cnnedge.infer.gallery), images get the class of the nearest prototype.
"""

from __future__ import annotations

import os
import re
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import cv2
import numpy as np

from cnnedge.atomic import prepare_folder, sync_folder, write_unsynced
from cnnedge.errors import CnnedgeError, ImageError
from cnnedge.infer.files import read_bytes, scan_folder, shown_path
from cnnedge.infer.gallery import Gallery
from cnnedge.infer.modelinfo import EMBEDDING_NAME, LOGITS_NAME, default_model
from cnnedge.infer.preprocess import analyse_batch, decode_for
from cnnedge.infer.backend import softmax, topk as top_k
from cnnedge.infer.runtime import open_runtime

CHUNK = 32  # images per thread-pool task: big enough to amortise the task overhead
ENCODED = (bytes, bytearray, memoryview)  # an image file's contents (an upload to `cnnedge serve`)


@dataclass
class Prediction:
    path: str | None  # None for arrays and bytes given to the API
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
    input: np.ndarray | None = field(default=None, repr=False)  # the network input, when the Predictor keeps inputs
    exception: ImageError | None = field(default=None, repr=False)  # the error behind `error` (its kind)

    def to_dict(self) -> dict:
        """The JSON result object of `cnnedge predict --format json` and of `cnnedge serve`."""
        d = {
            "path": self.path,
            "label": self.label,
            "confidence": self.confidence,
            "topk": [{"label": name, "probability": p} for name, p in self.topk],
            "box": None if self.box is None else dict(zip(("x", "y", "w", "h"), self.box)),
            "error": self.error,
            "truth": self.truth,
        }
        if self.metric is not None:
            for t in d["topk"]:
                t["distance"] = self.distances[t["label"]]
            d.update(metric=self.metric, distances=self.distances)
        return d


# ------------------------------------------------------------------------------------ predictor


class Predictor:
    """Preprocessing + inference for a cnnedge ONNX model. Use it from one thread at a time; create one per
    process and reuse it (the session is the expensive part).

    `runtime`: "onnxruntime" or "opencv" (OpenCV DNN, CPU only); None: onnxruntime where it is installed,
    else OpenCV. With `gallery` (a file from `cnnedge enroll`, or a Gallery) the labels are the gallery's
    classes, found by the nearest prototype under `metric` (default: the gallery's); `embeddings=True` keeps
    each image's embedding in `Prediction.embedding`, `inputs=True` its network input in `Prediction.input`."""

    def __init__(self, model: str | os.PathLike | None = None, provider: str = "auto", batch_size: int = 256,
                 workers: int | None = None, topk: int = 3, threads: int | None = None,
                 gallery: str | os.PathLike | Gallery | None = None, metric: str | None = None,
                 embeddings: bool = False, inputs: bool = False, runtime: str | None = None):
        if batch_size < 1:
            raise CnnedgeError(f"--batch-size must be at least 1, not {batch_size}")
        if topk < 1:
            raise CnnedgeError(f"--topk must be at least 1, not {topk}")
        if metric is not None and gallery is None:
            raise CnnedgeError("--metric needs --gallery (a file from `cnnedge enroll`)")
        if gallery is not None and not isinstance(gallery, Gallery):
            gallery = Gallery.load(gallery)  # before the model: a bad gallery fails fast
        model = default_model() if model is None else model
        self.runtime = open_runtime(model, runtime, provider, threads)
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
        self.keep_inputs = inputs
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

    def header(self) -> dict:
        """What every JSON answer says about where its results come from: model, runtime, provider (and gallery)."""
        d = {"model": shown_path(self.model), "runtime": self.runtime.name, "provider": self.provider}
        if self.gallery is not None:
            d.update(gallery=shown_path(self.gallery.source), metric=self.metric)
        return d

    def preprocess(self, image: np.ndarray):
        """A decoded image -> the `Prepared` network input (see cnnedge.infer.preprocess.analyse); raises
        ImageError when there is none."""
        prepared = analyse_batch([image], self.info.preprocess, self.size)[0]
        if isinstance(prepared, ImageError):
            raise prepared
        return prepared

    def _prepare_chunk(self, chunk: list) -> list:
        """Decode and preprocess a chunk of paths, encoded files (bytes) or arrays -> [(input or None,
        ImageError or None, box)]."""
        images: list = []
        factors = [1] * len(chunk)  # files decoded shrunk (see decode_for): their boxes are scaled back
        errors: dict[int, ImageError] = {}
        for i, item in enumerate(chunk):
            if isinstance(item, np.ndarray):
                images.append(item)
                continue
            try:
                image, factors[i] = decode_for(item if isinstance(item, ENCODED) else read_bytes(item), self.info.preprocess)
                images.append(image)
            except ImageError as e:
                images.append(None)
                errors[i] = _bare(e)
        out = []
        for i, prepared in enumerate(analyse_batch(images, self.info.preprocess, self.size)):
            if i in errors:
                out.append((None, errors[i], None))
            elif isinstance(prepared, ImageError):
                out.append((None, _bare(prepared), None))
            else:
                box = prepared.box if prepared.box is None else tuple(factors[i] * v for v in prepared.box)
                out.append((prepared.input, None, box))
        return out

    def _truth(self, path: str | None) -> str | None:
        if path is None:
            return None
        parent = Path(path).parent.name
        return parent if parent in self.class_names else None

    def predict(self, images, topk: int | None = None) -> list[Prediction]:
        """Predictions for an image path, an image file's contents (bytes), a decoded image (numpy array:
        grey, BGR or BGRA), a folder, a stack of images (N, H, W) or (N, H, W, C), or a list of them, in
        input order. Inputs that fail carry `error` instead of a label."""
        if isinstance(images, np.ndarray):
            stack = images.ndim == 4 or (images.ndim == 3 and images.shape[2] not in (1, 3, 4))
            images = list(images) if stack else [images]
        elif isinstance(images, (str, os.PathLike, *ENCODED)):
            images = [images]
        items = []
        for item in images:
            if isinstance(item, (str, os.PathLike)) and Path(item).is_dir():
                items += [str(p) for p in scan_folder(Path(item))]
            else:
                items.append(item if isinstance(item, (np.ndarray, *ENCODED)) else str(item))
        return list(self.predict_iter(items, topk))

    def predict_iter(self, items: Iterable, topk: int | None = None, save_crops: str | os.PathLike | None = None,
                     on_batch=None) -> Iterator[Prediction]:
        """Stream predictions for paths or arrays, in input order. Decoding and preprocessing run in the
        thread pool, inference in the calling thread on batches of `batch_size`; crops (`save_crops`) are
        written by the pool too, while the next batch runs."""
        k = topk or self.topk
        crops: deque = deque()  # futures of the crop writes in flight
        if save_crops is not None:
            save_crops = str(save_crops)
            prepare_folder(save_crops)
        chunk_size = max(1, min(CHUNK, self.batch_size))
        if isinstance(items, (list, tuple)):  # a short list (a server's batch): spread it over the whole pool
            chunk_size = max(1, min(chunk_size, -(-len(items) // self.workers)))
        items = iter(items)
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
                predictions = self._infer(buffered, k)
                if save_crops is not None:
                    batch = [(index + i, p.path, p.label, b[1]) for i, (p, b) in enumerate(zip(predictions, buffered))
                             if p.label is not None]
                    crops.append(self.pool.submit(_save_crops, save_crops, batch))
                    while crops and crops[0].done():
                        crops.popleft().result()  # a write error (a full disk) stops the run here
                yield from predictions
                index += len(buffered)
                if on_batch is not None:
                    on_batch(len(buffered))
                buffered, ready = [], 0
        if save_crops is not None:
            for future in crops:
                future.result()
            sync_folder(save_crops)  # once for the folder, not once per crop

    def _infer(self, buffered: list[tuple], k: int) -> list[Prediction]:
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
            path = None if isinstance(item, (np.ndarray, *ENCODED)) else str(item)
            p = Prediction(path=path, error=None if error is None else str(error), truth=self._truth(path), box=box,
                           metric=self.metric, exception=error)
            if i in row:
                r = row[i]
                p.index = int(idx[r, 0])
                p.label = self.class_names[p.index]
                p.confidence = float(val[r, 0])
                p.topk = [(self.class_names[int(j)], float(v)) for j, v in zip(idx[r], val[r])]
                if embeddings is not None:
                    p.embedding = embeddings[r]
                if self.keep_inputs:
                    p.input = x
                if dist is not None:
                    p.distances = {name: float(v) for name, v in zip(self.class_names, dist[r])}
            out.append(p)
        return out


def _bare(e: ImageError) -> ImageError:
    """The same error without its traceback and context, which hold the frames and their decoded images."""
    return type(e)(str(e))


def _save_crops(folder: str, crops: list[tuple[int, str | None, str, np.ndarray]]) -> None:
    """A batch of network inputs as PNGs, (index, path, label, input) each. Debugging output, thousands of
    small files: each is renamed into place whole, without an fsync of its own (that made --save-crops 19x
    slower); the folder is synced once at the end of the run."""
    for index, path, label, x in crops:
        stem = re.sub(r"[^\w.-]+", "_", os.path.splitext(os.path.basename(path))[0])[:60] if path else "array"
        ok, png = cv2.imencode(".png", np.clip(x * 255 + 0.5, 0, 255).astype(np.uint8))
        safe_label = re.sub(r"[^\w.-]+", "_", label)
        if ok:
            write_unsynced(os.path.join(folder, f"{index:06d}_{stem}_pred-{safe_label}.png"), png.tobytes())
