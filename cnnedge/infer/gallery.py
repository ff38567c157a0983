"""Few-shot classes without training (torch-free): `cnnedge enroll` and `cnnedge predict --gallery`.

    cnnedge enroll greek/train --out export/greek.gallery.npz        # a few images per new class
    cnnedge predict greek/test --gallery export/greek.gallery.npz     # nearest class prototype

Enrolling runs each image through the model's preprocessing and its `embedding` output (the same
Predictor as `cnnedge predict`) and stores every embedding with its class; a class's prototype is the mean
of its embeddings. An image is then labelled with the class of the nearest prototype, by SSD (sum of
squared differences, as in seed 003) or cosine distance.

The gallery is a plain .npz (no pickles) and is treated as untrusted input: every array is checked on
load, and it is refused unless it was enrolled with the same weights as the model it is used with.
"""

from __future__ import annotations

import io
import json
import math
import os
import zipfile
import zlib
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from cnnedge.errors import CnnedgeError
from cnnedge.choices import METRICS, PREPROCESS_MODES
from cnnedge.infer.modelinfo import EMBEDDING_NAME
from cnnedge.infer.backend import softmax

# Cosine: chosen on the enrolled Greek images alone (leave-one-out 51/54 against SSD's 48-49/54 with two
# trainings of the digits model), then confirmed on the test set (README, `cnnedge enroll`).
DEFAULT_METRIC = "cosine"
FORMAT = "cnnedge-gallery"
VERSION = 1
KEYS = ("embeddings", "labels", "files", "prototypes", "class_names", "meta")
MAX_GALLERY_BYTES = 1 << 30  # uncompressed; also what a crafted (zip bomb) file is held to
# Confidences are softmax(-distance / T) in float32: a T of 1e-40 sends every class to -inf and the
# confidences to NaN. Within these bounds they stay finite for any distance an embedding gives.
TEMPERATURE_RANGE = (1e-6, 1e6)


# ------------------------------------------------------------------------------------ distances


def _distance(dot: np.ndarray, aa: np.ndarray, bb: np.ndarray, metric: str) -> np.ndarray:
    """A metric from dot products and squared norms, so that matrices and row pairs share one formula."""
    if metric == "ssd":
        return np.maximum(aa + bb - 2 * dot, 0.0)
    return 1.0 - dot / np.maximum(np.sqrt(aa * bb), 1e-12)  # an all-zero embedding is at distance 1


def distances(embeddings: np.ndarray, prototypes: np.ndarray, metric: str) -> np.ndarray:
    """(N, K) distances of N embeddings to K prototypes (float64: SSD by expansion loses digits in float32)."""
    e, p = np.asarray(embeddings, np.float64), np.asarray(prototypes, np.float64)
    return _distance(e @ p.T, (e * e).sum(1)[:, None], (p * p).sum(1)[None], metric)


def class_means(embeddings: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    """(K, D): the mean embedding of each class."""
    sums = np.zeros((k, embeddings.shape[1]), np.float64)
    np.add.at(sums, labels, embeddings)
    return sums / np.bincount(labels, minlength=k)[:, None]


def for_metric(embeddings: np.ndarray, metric: str) -> np.ndarray:
    """Cosine compares directions: embeddings are scaled to unit length before a class mean is taken, so
    that every image weighs the same in its prototype. SSD uses them as they are (seed 003)."""
    e = np.asarray(embeddings, np.float64)
    return e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12) if metric == "cosine" else e


def prototypes(embeddings: np.ndarray, labels: np.ndarray, k: int, metric: str) -> np.ndarray:
    """(K, D) class prototypes for `metric`."""
    return class_means(for_metric(embeddings, metric), labels, k)


def leave_one_out(embeddings: np.ndarray, labels: np.ndarray, k: int, metric: str) -> np.ndarray:
    """(N, K) distances of each enrolled example to every prototype, its own class's prototype computed
    without it: how new images of the enrolled classes would fare. Rows of single-image classes are NaN."""
    e = for_metric(embeddings, metric)
    counts = np.bincount(labels, minlength=k)
    means = class_means(e, labels, k)
    d = distances(e, means, metric)
    n = counts[labels][:, None].astype(np.float64)
    own = (means[labels] * n - e) / np.maximum(n - 1, 1)
    d[np.arange(len(e)), labels] = _distance((e * own).sum(1), (e * e).sum(1), (own * own).sum(1), metric)
    d[counts[labels] < 2] = np.nan
    return d


def fit_temperature(loo: np.ndarray, labels: np.ndarray) -> float | None:
    """T for confidences softmax(-distance / T), by maximum likelihood of the held-out examples' classes
    (temperature scaling on the leave-one-out distances); None when nothing was held out (one image per class)."""
    ok = ~np.isnan(loo).any(1)
    d, y = loo[ok], labels[ok]
    if not len(d):
        return None
    rows = np.arange(len(d))
    scale = float(np.median(d[rows, y])) or float(np.median(d)) or 1.0
    margin = d - d.min(1, keepdims=True)  # shifted so that exp() cannot overflow
    grid = scale * np.logspace(-2, 1, 61)
    nll = [np.mean(np.log(np.exp(-margin / t).sum(1)) + margin[rows, y] / t) for t in grid]
    return float(grid[int(np.argmin(nll))])


# -------------------------------------------------------------------------------------- model


def model_identity(runtime) -> dict:
    """What a gallery records about the model it was enrolled with, to refuse it with any other weights."""
    outputs = runtime.output_shapes
    if EMBEDDING_NAME not in outputs:
        raise CnnedgeError(f"{runtime.path}: the model has no {EMBEDDING_NAME!r} output; export it again with "
                           f"`cnnedge export` to enroll classes")
    shape = outputs[EMBEDDING_NAME]
    info = runtime.info
    return {
        "name": runtime.path.name,
        "sha256": runtime.sha256,
        "checkpoint_sha256": info.checkpoint_sha256,
        "precision": info.precision,
        "arch": info.arch,
        "embedding_layer": info.embedding_layer,
        "embedding_dim": shape[-1] if len(shape) == 2 and isinstance(shape[-1], int) else None,
    }


# ------------------------------------------------------------------------------------ gallery


@dataclass
class Gallery:
    class_names: list[str]
    embeddings: np.ndarray  # (N, D) float32, one row per enrolled image
    labels: np.ndarray  # (N,) int64 index into class_names
    files: list[str]  # each image's path relative to the enrolled folder
    meta: dict  # metric, temperature, model, preprocess, source, created, cnnedge_version
    source: str = "gallery"  # where it was loaded from, for messages
    prototypes: np.ndarray = field(init=False)  # (K, D) float32 class means, as stored in the file
    _by_metric: dict = field(init=False, repr=False)  # the prototypes each metric compares with

    def __post_init__(self):
        k = len(self.class_names)
        self.prototypes = class_means(self.embeddings, self.labels, k).astype(np.float32)
        self._by_metric = {m: prototypes(self.embeddings, self.labels, k, m) for m in METRICS}

    @property
    def dim(self) -> int:
        return int(self.embeddings.shape[1])

    def resolve_metric(self, metric: str | None) -> str:
        """The metric to use: the one asked for, else the one the gallery was enrolled with."""
        metric = metric or self.meta["metric"]
        if metric not in METRICS:
            raise CnnedgeError(f"unknown metric {metric!r}; choose one of {', '.join(METRICS)}")
        return metric

    def classify(self, embeddings: np.ndarray, metric: str) -> tuple[np.ndarray, np.ndarray]:
        """(N, K) distances to each class prototype, and the confidences softmax(-distance / T)."""
        if embeddings.ndim != 2 or embeddings.shape[1] != self.dim:
            raise CnnedgeError(f"{self.source}: the model gives embeddings of shape {embeddings.shape[1:]}, the "
                               f"gallery holds {self.dim}-d ones; enroll again with this model")
        d = distances(embeddings, self._by_metric[metric], metric)
        return d, softmax((-d / self.meta["temperature"][metric]).astype(np.float32))

    def check_model(self, runtime) -> None:
        """Refuse a model other than the one the gallery was enrolled with: embeddings of other weights
        live in another space, and nearest prototypes would be silently wrong."""
        ident, mine = model_identity(runtime), self.meta["model"]
        again = f"enroll again with `cnnedge enroll DIR --out {self.source} --model {runtime.path}`"
        dim = ident["embedding_dim"]
        if dim is not None and dim != self.dim:
            raise CnnedgeError(f"{self.source}: {self.dim}-d embeddings, but {runtime.path} gives {dim}-d ones; "
                               f"{again}")
        same_file = ident["sha256"] == mine["sha256"]
        # The same checkpoint re-exported at the same precision has the same weights (only the date differs).
        same_weights = bool(ident["checkpoint_sha256"]) and all(
            ident[k] == mine[k] for k in ("checkpoint_sha256", "precision"))
        if not (same_file or same_weights):
            raise CnnedgeError(f"{self.source} was enrolled with {mine['name']} (sha256 {mine['sha256'][:12]}), "
                               f"not with {runtime.path} (sha256 {ident['sha256'][:12]}): other weights give "
                               f"other embeddings; {again}")

    # ------------------------------------------------------------------------------------ file

    def save(self, path: str | os.PathLike) -> None:
        from cnnedge.atomic import write_bytes

        buf = io.BytesIO()
        np.savez(buf, embeddings=self.embeddings.astype(np.float32), labels=self.labels.astype(np.int64),
                 files=np.array(self.files, dtype=str), prototypes=self.prototypes,
                 class_names=np.array(self.class_names, dtype=str), meta=np.array(json.dumps(self.meta)))
        try:
            write_bytes(path, buf.getvalue())
        except OSError as e:
            raise CnnedgeError(f"--out {path}: cannot write ({e.strerror or e})") from None

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Gallery":
        """Read and check a gallery file; anything unexpected is one CnnedgeError naming the problem."""
        path = Path(path)

        def bad(why: str) -> CnnedgeError:
            return CnnedgeError(f"{path}: {why}; make a gallery with `cnnedge enroll DIR --out FILE.gallery.npz`")

        if not path.is_file():
            raise CnnedgeError(f"{path}: {'no such gallery file' if not path.exists() else 'not a file'} "
                               f"(make one with `cnnedge enroll DIR --out FILE.gallery.npz`)")
        try:
            npz = np.load(path, allow_pickle=False)
        except (ValueError, OSError, EOFError, zipfile.BadZipFile):
            raise bad("not a gallery (.npz archive), or a truncated one") from None
        if not isinstance(npz, np.lib.npyio.NpzFile):
            raise bad("a single .npy array, not a gallery (.npz archive)")
        with npz:
            if sum(i.file_size for i in npz.zip.infolist()) > MAX_GALLERY_BYTES:
                raise bad(f"unpacks to more than {MAX_GALLERY_BYTES:,} bytes")
            missing = [k for k in KEYS if k not in npz.files]
            if missing:
                raise bad(f"missing {', '.join(missing)}")
            arrays = {}
            for key in KEYS:
                try:
                    arrays[key] = npz[key]
                except ValueError as e:
                    if "allow_pickle" in str(e):
                        raise bad(f"{key!r} is an object array (pickled Python objects are refused)") from None
                    raise bad(f"{key!r} is damaged ({e})") from None
                except (OSError, EOFError, zipfile.BadZipFile, zlib.error) as e:
                    raise bad(f"{key!r} is damaged or truncated ({e})") from None
        return cls._checked(arrays, path, bad)

    @classmethod
    def _checked(cls, a: dict, path: Path, bad) -> "Gallery":
        e, labels, files, protos, names = (a[k] for k in KEYS[:5])
        if e.dtype != np.float32 or e.ndim != 2 or e.shape[0] < 1 or e.shape[1] < 1:
            raise bad(f"'embeddings' must be a non-empty N x D float32 array, not {e.dtype} {e.shape}")
        if not np.isfinite(e).all():
            raise bad("'embeddings' holds NaN or infinite values")
        n, dim = e.shape
        if names.dtype.kind != "U" or names.ndim != 1 or len(names) < 2:
            raise bad(f"'class_names' must be at least 2 strings, not {names.dtype} {names.shape}")
        k = len(names)
        if len(set(names.tolist())) != k or not all(names.tolist()):
            raise bad("'class_names' must be distinct and non-empty")
        if labels.dtype.kind not in "iu" or labels.shape != (n,):
            raise bad(f"'labels' must be {n} integers (one per embedding), not {labels.dtype} {labels.shape}")
        labels = labels.astype(np.int64)
        if labels.min() < 0 or labels.max() >= k:
            raise bad(f"'labels' must be class indices 0..{k - 1}")
        if np.bincount(labels, minlength=k).min() == 0:
            raise bad("a class has no enrolled embedding")
        if files.dtype.kind != "U" or files.shape != (n,):
            raise bad(f"'files' must be {n} strings (one per embedding), not {files.dtype} {files.shape}")
        if protos.dtype != np.float32 or protos.shape != (k, dim):
            raise bad(f"'prototypes' must be a {k} x {dim} float32 array, not {protos.dtype} {protos.shape}")
        meta = cls._checked_meta(a["meta"], bad)
        gallery = cls(names.tolist(), e, labels, files.tolist(), meta, str(path))
        if not np.allclose(gallery.prototypes, protos, rtol=1e-4, atol=1e-5):
            raise bad("'prototypes' are not the class means of 'embeddings' (the file was altered)")
        return gallery

    @staticmethod
    def _checked_meta(raw: np.ndarray, bad) -> dict:
        if raw.dtype.kind != "U" or raw.shape != ():
            raise bad("'meta' must be one JSON string")
        try:
            meta = json.loads(str(raw))
        except (ValueError, RecursionError):
            raise bad("'meta' is not valid JSON") from None
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise bad("'meta' does not describe a cnnedge gallery")
        if meta.get("version") != VERSION:
            raise bad(f"gallery format version {meta.get('version')!r}, this cnnedge reads version {VERSION}")
        if meta.get("metric") not in METRICS:
            raise bad(f"'meta' metric must be one of {', '.join(METRICS)}")
        t = meta.get("temperature")
        low, high = TEMPERATURE_RANGE
        if not isinstance(t, dict) or not all(isinstance(t.get(m), (int, float)) and not isinstance(t.get(m), bool)
                                              and math.isfinite(t[m]) and low <= t[m] <= high for m in METRICS):
            raise bad(f"'meta' temperature must give a number from {low:g} to {high:g} per metric")
        model = meta.get("model")
        if not isinstance(model, dict) or not all(isinstance(model.get(k), str) for k in
                                                  ("name", "sha256", "checkpoint_sha256", "precision")):
            raise bad("'meta' does not record the model it was enrolled with")
        if meta.get("preprocess") not in PREPROCESS_MODES:
            raise bad(f"'meta' preprocess must be one of {', '.join(PREPROCESS_MODES)}")
        return meta


def build(class_names: list[str], embeddings: np.ndarray, labels: np.ndarray, files: list[str], runtime,
          source: str, metric: str = DEFAULT_METRIC) -> tuple[Gallery, dict[str, np.ndarray]]:
    """A gallery from enrolled embeddings, and the leave-one-out distances per metric behind its temperatures."""
    from cnnedge import __version__

    k = len(class_names)
    loo = {m: leave_one_out(embeddings, labels, k, m) for m in METRICS}
    temperature = {}
    for m in METRICS:
        t = fit_temperature(loo[m], labels)
        if t is None:  # nothing to fit on: the median distance between prototypes, a deliberately modest scale
            means = prototypes(embeddings, labels, k, m)
            between = distances(means, means, m)[~np.eye(k, dtype=bool)]
            t = float(np.median(between)) or 1.0
        temperature[m] = float(np.clip(t, *TEMPERATURE_RANGE))
    meta = {"format": FORMAT, "version": VERSION, "metric": metric, "temperature": temperature,
            "model": model_identity(runtime), "preprocess": runtime.info.preprocess, "source": source,
            "created": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"), "cnnedge_version": __version__}
    return Gallery(class_names, embeddings.astype(np.float32), labels.astype(np.int64), files, meta), loo
