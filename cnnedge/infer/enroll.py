"""`cnnedge enroll`: new classes without training (torch-free). Each image of a class folder goes through the
model's preprocessing and its `embedding` output (the same Predictor as `cnnedge predict`); the embeddings
and class prototypes are stored as a gallery (cnnedge.infer.gallery) for `predict --gallery`.

    cnnedge enroll greek/train --out export/greek.gallery.npz
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from rich.markup import escape
from rich.table import Table

from cnnedge.errors import CnnedgeError, ExitCode
from cnnedge.infer.files import natural_key, printable, quiet_native_stderr, scan_folder
from cnnedge.choices import METRICS
from cnnedge.infer.gallery import build
from cnnedge.infer.predictor import Predictor
from cnnedge.report import console, warn


def _class_folders(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise CnnedgeError(f"{folder}: {'no such folder' if not folder.exists() else 'not a folder'} "
                           f"(give a folder with one subfolder of images per class)")
    try:
        classes = sorted((d for d in folder.iterdir() if d.is_dir() and not d.name.startswith(".")), key=natural_key)
        split = (folder / "train").is_dir() and any(d.is_dir() for d in (folder / "train").iterdir())
    except OSError as e:  # an unreadable folder
        raise CnnedgeError(f"{folder}: {e.strerror or e}") from None
    if split:
        raise CnnedgeError(f"{folder}: holds a train/ split with class folders; enroll {folder / 'train'} "
                           f"(and predict on the other split)")
    if len(classes) < 2:
        raise CnnedgeError(f"{folder}: {len(classes)} class folder(s); enrolling needs at least 2 "
                           f"(one subfolder of images per class)")
    return classes


def run(folder: str | os.PathLike, out: str | os.PathLike, model: str | None = None, provider: str = "auto",
           batch_size: int = 256, workers: int | None = None, runtime: str | None = None) -> int:
    """The `cnnedge enroll` command; returns the exit code (0 all enrolled, 1 some images skipped)."""
    folder = Path(folder)
    if Path(out).is_dir():
        raise CnnedgeError(f"--out {out}: is a folder; give a file name such as {Path(out) / 'classes.gallery.npz'}")
    classes = _class_folders(folder)
    paths, truth, unreadable = [], [], []
    for c, d in enumerate(classes):
        found = scan_folder(d, recursive=True, errors=unreadable)
        if not found:
            raise CnnedgeError(f"{d}: no {'readable ' if unreadable else ''}images in class folder {d.name!r}")
        paths += found
        truth += [c] * len(found)
    for where, why in unreadable:  # a subfolder that cannot be read: said, and the exit code says it too
        warn(f"{printable(where)}: {why}")
    loose = [p for p in scan_folder(folder) if p.parent == folder]
    if loose:
        warn(f"{folder}: {len(loose)} image(s) outside the class folders ignored")

    names = [d.name for d in classes]
    embeddings, labels, files = [], [], []
    skipped = np.zeros(len(names), int)
    with Predictor(model, provider, batch_size=batch_size, workers=workers, embeddings=True, runtime=runtime) as predictor:
        with quiet_native_stderr():  # decoders' own multi-line complaints: we report each bad file in one line
            predictions = list(predictor.predict_iter([str(p) for p in paths]))
        for path, c, p in zip(paths, truth, predictions):
            if p.error is not None:
                warn(f"{printable(str(path))}: {p.error}; skipped")
                skipped[c] += 1
                continue
            embeddings.append(p.embedding)
            labels.append(c)
            files.append(path.relative_to(folder).as_posix())
        labels = np.asarray(labels, np.int64)
        counts = np.bincount(labels, minlength=len(names))
        empty = [n for n, count in zip(names, counts) if count == 0]
        if empty:
            raise CnnedgeError(f"{folder}: no usable image in class folder(s) {', '.join(empty)} (see the warnings)")
        gallery, loo = build(names, np.stack(embeddings), labels, files, predictor.runtime, str(folder))
    gallery.save(out)

    metric = gallery.meta["metric"]
    held_out = ~np.isnan(loo[metric]).any(1)
    right = (loo[metric].argmin(1) == labels) & held_out
    table = Table(title="enrolled classes", title_justify="left")
    for col in ("class", "images", "skipped", f"leave-one-out ({metric})"):
        table.add_column(col, justify="left" if col == "class" else "right")
    for c, name in enumerate(names):
        n = int(held_out[labels == c].sum())
        loo_text = f"{100 * right[labels == c].sum() / n:.1f}%" if n else "- (1 image)"
        table.add_row(escape(name), str(counts[c]), str(skipped[c]) if skipped[c] else "", loo_text)
    console.print(table)
    scores = []
    for m in METRICS:
        ok = int(((loo[m].argmin(1) == labels) & held_out).sum())
        scores.append(f"{m} {100 * ok / max(1, held_out.sum()):.1f}% ({ok}/{int(held_out.sum())})")
    if held_out.any():
        console.print(f"leave-one-out accuracy (each image against prototypes built without it): {', '.join(scores)}; "
                      f"predict uses {metric} unless given --metric", markup=False)
    else:
        console.print("leave-one-out accuracy: not measurable with one image per class", markup=False)
    console.print(f"wrote {printable(str(out))}: {len(labels)} embeddings ({gallery.dim}-d) of {len(names)} classes from {printable(str(folder))}, "
                  f"model {predictor.model}", markup=False)
    return int(ExitCode.PARTIAL) if skipped.any() or unreadable else int(ExitCode.OK)
