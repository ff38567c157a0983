"""Datasets as in-memory tensors: torchvision's MNIST family, or an ImageFolder tree of your own.

The whole dataset is decoded once (torchvision reads the idx files straight into a uint8 tensor;
ImageFolder images go through the same OpenCV preprocessing as predict), so the training loop
only indexes tensors: no per-sample PIL, no DataLoader workers.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from cnnedge.errors import CnnedgeError
from cnnedge.train.options import DATASETS, IMAGEFOLDER_PREFIX, MNIST_FILES, dataset_root


@dataclass
class Data:
    name: str
    x_train: torch.Tensor  # float32 (N, 1, H, W) in [0, 1], white on black
    y_train: torch.Tensor  # int64 (N,)
    x_test: torch.Tensor | None
    y_test: torch.Tensor | None
    class_names: list[str]
    preprocess: str
    source: str


def _expected_files(cls, split_train: bool) -> list[str]:
    resources = cls.resources
    if isinstance(resources, dict):  # QMNIST keys its resources by split
        resources = resources["train" if split_train else "test"]
    return [os.path.splitext(os.path.basename(url))[0] for url, _ in resources]


def read_mnist_idx(root: Path) -> Data | None:
    """MNIST straight from its idx files in torchvision's raw layout, with numpy; None when a file is missing.
    Importing torchvision costs more than the whole data loading (1-3 s), so the default dataset skips it;
    the other datasets (their class names, QMNIST's own format) and downloads go through torchvision."""
    from cnnedge.infer.files import read_idx

    raw = root / "MNIST" / "raw"
    if not all((raw / n).is_file() for n in MNIST_FILES):
        return None
    x_train, y_train, x_test, y_test = (torch.from_numpy(read_idx(raw / n).copy()) for n in MNIST_FILES)
    for x, y in ((x_train, y_train), (x_test, y_test)):
        if x.ndim != 3 or y.ndim != 1 or len(x) != len(y):
            raise CnnedgeError(f"{raw}: {len(x):,} images of shape {tuple(x.shape[1:])} and {len(y):,} labels do not match")
    as_float = lambda x: x.unsqueeze(1).float().div_(255.0)
    return Data("mnist", as_float(x_train), y_train.long(), as_float(x_test), y_test.long(),
                [str(i) for i in range(10)], DATASETS["mnist"][1], str(root / "MNIST"))


def load_torchvision(name: str, root: Path, download: bool) -> Data:
    if name == "mnist" and (data := read_mnist_idx(root)) is not None:
        return data
    import torchvision.datasets as tvd

    class_name, mode = DATASETS[name]
    cls = getattr(tvd, class_name)
    splits = {}
    for train in (True, False):
        kwargs = {"what": "train" if train else "test10k"} if class_name == "QMNIST" else {"train": train}
        try:
            splits[train] = cls(str(root), download=download, **kwargs)
        except RuntimeError as e:
            if download:
                raise CnnedgeError(f"{name}: download into {root} failed ({str(e)[:160]})") from None
            folder = Path(root) / class_name / "raw"
            files = ", ".join(_expected_files(cls, train))
            raise CnnedgeError(
                f"{name} not found: expected {files} in {folder} "
                "(set --data-dir or CNNEDGE_DATA, or pass --download when online)"
            ) from None
        except OSError as e:  # URLError from an offline --download is an OSError
            raise CnnedgeError(f"{name}: download into {root} failed ({e})") from None
    train, test = splits[True], splits[False]
    digits = class_name in ("MNIST", "QMNIST")
    class_names = [str(i) for i in range(10)] if digits else list(train.classes)
    targets = lambda ds: (ds.targets[:, 0] if ds.targets.ndim == 2 else ds.targets).long()  # QMNIST: extra columns
    as_float = lambda ds: ds.data.unsqueeze(1).float().div_(255.0)
    return Data(name, as_float(train), targets(train), as_float(test), targets(test), class_names, mode,
                str(Path(root) / class_name))


def load_imagefolder(path: Path, size: int = 28, mode: str = "digit") -> Data:
    """ImageFolder tree (one folder per class). With train/ and test/ subfolders, both are used."""
    from cnnedge.errors import ImageError
    from cnnedge.infer.files import printable, quiet_native_stderr, read_bytes, scan_folder
    from cnnedge.infer.modelinfo import MAX_CLASSES
    from cnnedge.infer.preprocess import analyse_batch, decode_for
    from cnnedge.report import warn

    try:
        split = (path / "train").is_dir()
    except OSError as e:  # an unreadable folder
        raise CnnedgeError(f"imagefolder {path}: {e.strerror or e}") from None
    train_dir, test_dir = (path / "train", path / "test") if split else (path, None)

    def read_split(folder: Path, classes: list[str] | None):
        # Sorted names as in torchvision's ImageFolder (not imported: seconds); hidden folders are no classes.
        try:
            found = sorted(d.name for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))
        except OSError as e:
            raise CnnedgeError(f"imagefolder {folder}: {e.strerror or e}") from None
        if not found:
            raise CnnedgeError(f"imagefolder {folder}: no class folders (one subfolder of images per class)")
        odd = next((c for c in found if not c.isprintable()), None)
        if odd is not None:  # the name becomes a class name, printed in tables and stored in the model
            raise CnnedgeError(f"imagefolder {folder}: class folder {printable(odd)!r}: control characters or "
                               "bytes that are not UTF-8 in its name; rename it")
        if classes is None and len(found) > MAX_CLASSES:  # refused before a single image is decoded
            raise CnnedgeError(f"imagefolder {folder}: {len(found):,} class folders; cnnedge trains at most "
                               f"{MAX_CLASSES:,} classes")
        class_to_idx = {c: i for i, c in enumerate(found)}
        if classes is not None:
            class_to_idx = {c: classes.index(c) for c in found if c in classes}
            for c in set(found) - set(classes):
                warn(f"{folder / c}: class not in the training split, skipped")
        # Not torchvision's make_dataset: it follows symlinked folders, and a link loop repeats the images.
        samples, unreadable, empty = [], [], []
        for c, label in sorted(class_to_idx.items()):
            files = scan_folder(folder / c, recursive=True, errors=unreadable)
            if not files and not any(Path(f).is_relative_to(folder / c) for f, _ in unreadable):
                empty.append(c)
            samples += [(f, label) for f in files]
        for where, why in unreadable:
            warn(f"{printable(where)}: {why}")
        images, labels = [], []
        with quiet_native_stderr():  # bad files get our one line each, not the decoders' own complaints
            for file, label in samples:
                try:
                    prepared = analyse_batch([decode_for(read_bytes(file), mode)[0]], mode, size)[0]  # what predict feeds
                    if isinstance(prepared, ImageError):
                        raise prepared
                    images.append(torch.from_numpy(prepared.input))
                    labels.append(label)
                except ImageError as e:
                    warn(f"{printable(str(file))}: {e}; skipped")
        if not images:
            raise CnnedgeError(f"imagefolder {folder}: no readable images in class subfolders")
        for c in empty:
            warn(f"{printable(str(folder / c))}: empty class folder: " + (
                f"the model gets class {c!r} without one example of it" if classes is None else "nothing to test"))
        if classes is None and len(set(labels)) < 2:
            only = found[labels[0]]
            raise CnnedgeError(f"imagefolder {folder}: only class {only!r} has images; a classifier needs at least "
                               "2 classes (a one-class model answers the same for everything)")
        return torch.stack(images).unsqueeze(1), torch.tensor(labels, dtype=torch.long), found

    x_train, y_train, classes = read_split(train_dir, None)
    x_test = y_test = None
    if test_dir is not None and test_dir.is_dir():
        x_test, y_test, _ = read_split(test_dir, classes)
    return Data(f"imagefolder:{path}", x_train, y_train, x_test, y_test, classes, mode, str(path))


def load_data(dataset: str, data_dir: str | os.PathLike | None = None, download: bool = False) -> Data:
    root = dataset_root(dataset, data_dir, download)
    if dataset.startswith(IMAGEFOLDER_PREFIX):
        return load_imagefolder(root)
    return load_torchvision(dataset, root, download)


DIGITS = [str(d) for d in range(10)]
SYNTHETIC_DATASETS = ("mnist", "qmnist")  # what synthetic handwriting (cnnedge.synth) is mixed into


def synthetic_digits(count: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """`count` synthetic hand-written digits in MNIST's format (cnnedge.synth.mnist_digits) as float32
    (count, 1, 28, 28) in [0, 1] and int64 labels. Rendered once (about a millisecond an image) and cached
    in the user cache folder under a key of the renderer's source and the seed, so that a change to the
    renderer renders them anew. The renderer draws image after image from one seeded stream, so the first
    `count` of a larger cached set are the same images: one file serves every count. A cache that cannot
    be written only costs the rendering."""
    import hashlib
    import io

    import numpy as np

    from cnnedge import synth
    from cnnedge.atomic import write_bytes
    from cnnedge.infer.files import user_cache_dir

    key = hashlib.sha256(Path(synth.__file__).read_bytes() + f"|{seed}".encode()).hexdigest()[:16]
    path = user_cache_dir() / "synth" / f"digits-{seed}-{key}.npz"
    try:
        with np.load(path) as cached:
            images, labels = cached["images"][:count], cached["labels"][:count]
        if images.shape != (count, 28, 28) or labels.shape != (count,):
            raise ValueError("fewer images than asked for")
    except (OSError, ValueError, KeyError):  # absent, too small, unreadable or damaged: render them
        images, labels = synth.mnist_digits(count, seed)
        buf = io.BytesIO()
        np.savez(buf, images=images, labels=labels)
        try:
            write_bytes(path, buf.getvalue())
        except CnnedgeError:  # an unwritable cache folder
            pass
    x = torch.from_numpy(np.ascontiguousarray(images)).unsqueeze(1).float().div_(255.0)
    return x, torch.from_numpy(labels.astype(np.int64))


def add_synthetic(data: Data, train_idx: torch.Tensor, fraction: float, seed: int) -> tuple[torch.Tensor, int]:
    """Mix synthetic handwriting into the training split of MNIST or QMNIST (never into validation or test,
    nor into other datasets, an ImageFolder of the user's own digits included): `fraction` x as many images
    as the split holds, appended to data.x_train / y_train. Returns the training indices with the new
    images and how many were added."""
    count = round(fraction * len(train_idx))
    if count <= 0 or data.name not in SYNTHETIC_DATASETS or data.class_names != DIGITS:
        return train_idx, 0
    x, y = synthetic_digits(count, seed)
    start = len(data.x_train)
    data.x_train, data.y_train = torch.cat([data.x_train, x]), torch.cat([data.y_train, y])
    return torch.cat([train_idx, torch.arange(start, start + count)]), count


def split_validation(n: int, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded split of the training indices into (train, validation)."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_val = int(round(n * fraction)) if n > 1 else 0
    return order[n_val:].sort().values, order[:n_val].sort().values


def normalization(x: torch.Tensor) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of the training images, as the network sees them."""
    return x.mean(dim=(0, 2, 3)).tolist(), x.std(dim=(0, 2, 3)).clamp_min(1e-6).tolist()


def augment_batch(x: torch.Tensor, rotate_deg: float = 12.0, scale: float = 0.12, shear: float = 0.15,
                  shift: float = 0.1, stroke: float = 0.3) -> torch.Tensor:
    """Per-sample random affine and stroke-width change on a batch of [0, 1] images, on its device.

    Handwriting varies in slant, size, position and pen width; preprocessing removes most of it, the
    rest is learnt here. One affine_grid/grid_sample call serves the whole batch (torchvision's v2
    transforms draw one set of parameters per call, which would give every image the same warp).
    """
    n = x.shape[0]
    uniform = lambda amount: (torch.rand(n, device=x.device) * 2 - 1) * amount
    angle = uniform(math.radians(rotate_deg))
    zoom = 1 + uniform(scale)
    sh = uniform(shear)
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    theta = torch.stack([
        torch.stack([cos, -sin + sh, uniform(2 * shift)], dim=1),
        torch.stack([sin, cos, uniform(2 * shift)], dim=1),
    ], dim=1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, align_corners=False, padding_mode="zeros")
    # Half-strength dilation or erosion: thicker or thinner pen strokes.
    r = torch.rand(n, 1, 1, 1, device=x.device)
    thicker = 0.5 * (x + max_filter3(x))
    thinner = 0.5 * (x - max_filter3(-x))
    return torch.where(r < stroke / 2, thicker, torch.where(r > 1 - stroke / 2, thinner, x))


def max_filter3(x: torch.Tensor) -> torch.Tensor:
    """The 3x3 maximum around every pixel of every image (max_pool2d, stride 1, padding 1), computed with the
    batch as the channels of one channels-last image: on the CPU torch's vectorised channels-last kernel is
    14x faster than its (N, 1, H, W) one (0.13 against 1.8 ms for 128 MNIST images), with the same values."""
    n, c, h, w = x.shape
    pooled = F.max_pool2d(x.reshape(1, n * c, h, w).contiguous(memory_format=torch.channels_last), 3, 1, 1)
    return pooled.reshape(n, c, h, w)
