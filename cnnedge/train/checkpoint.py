"""cnnedge checkpoints: a plain dict of tensors and primitives, saved atomically, loaded with weights_only.

A .pt file can be an attack (pickle runs code), so loading never unpickles arbitrary objects:
`torch.load(weights_only=True)` refuses anything but tensors and builtin containers. The file checks that
come first need no torch (`check_checkpoint_file`), so a command refuses a wrong path before torch loads.
"""

from __future__ import annotations

import io
import os
import re
import zipfile
from pathlib import Path

from cnnedge.atomic import atomic_write
from cnnedge.errors import CnnedgeError
from cnnedge.train.zoo import build_model

FORMAT = "cnnedge.checkpoint"
FORMAT_VERSION = 1
MAX_CHECKPOINT_BYTES = 512 * 2**20  # refuse larger files (or files that unpack larger) before reading them
REQUIRED_KEYS = ("arch", "num_classes", "class_names", "input_shape", "mean", "std", "preprocess", "state_dict")


def save_checkpoint(path: str | os.PathLike, checkpoint: dict) -> None:
    import torch

    # Serialise to memory first so a failing torch.save never touches the destination.
    buffer = io.BytesIO()
    torch.save({"format": FORMAT, "format_version": FORMAT_VERSION, **checkpoint}, buffer)
    with atomic_write(path) as f:
        f.write(buffer.getbuffer())


def _unpacked_size(path: Path) -> int:
    """Bytes torch.load would unpack. A .pt is a zip whose records may be deflated: a 1 MB file can unpack
    to 1 GB, and torch reads a record whole before checking its size. The zip directory says up front."""
    try:
        with zipfile.ZipFile(path) as archive:
            return sum(info.file_size for info in archive.infolist())
    except Exception:  # not a zip (legacy format, garbage): torch reads at most the file itself
        return path.stat().st_size


def check_checkpoint_file(path: str | os.PathLike) -> Path:
    """What can be said of a checkpoint file before reading it (torch-free): it exists, and neither it nor
    what it unpacks to is over the size limit."""
    path = Path(path)
    if not path.is_file():
        raise CnnedgeError(f"{path}: no such checkpoint file")
    size = path.stat().st_size
    if size > MAX_CHECKPOINT_BYTES:
        raise CnnedgeError(f"{path}: {size:,} bytes is over the {MAX_CHECKPOINT_BYTES:,}-byte checkpoint limit")
    unpacked = _unpacked_size(path)
    if unpacked > MAX_CHECKPOINT_BYTES:
        raise CnnedgeError(f"{path}: refused: it unpacks to {unpacked:,} bytes, over the "
                           f"{MAX_CHECKPOINT_BYTES:,}-byte checkpoint limit")
    return path


def load_checkpoint(path: str | os.PathLike) -> dict:
    """Load and validate a cnnedge checkpoint; anything else is a CnnedgeError (exit code 2)."""
    import torch

    path = check_checkpoint_file(path)
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle refusals, truncated zips and plain garbage all land here
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if "weights_only" in str(e) or "Unsupported global" in str(e):
            named = re.search(r"GLOBAL ([\w.]+)", str(e))  # what the pickle asked for, e.g. posix.system
            reason = (f"refused to unpickle {named[1] if named else 'an object'}: a checkpoint holds only tensors "
                      "and plain values (possibly malicious)")
        raise CnnedgeError(f"{path}: not a cnnedge checkpoint ({reason[:200]})") from None
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != FORMAT:
        raise CnnedgeError(f"{path}: not a cnnedge checkpoint (no '{FORMAT}' header; is it a bare state_dict?)")
    missing = [k for k in REQUIRED_KEYS if k not in checkpoint]
    if missing:
        raise CnnedgeError(f"{path}: incomplete cnnedge checkpoint (missing {', '.join(missing)})")
    if checkpoint.get("format_version", 0) > FORMAT_VERSION:
        raise CnnedgeError(f"{path}: checkpoint format {checkpoint['format_version']} is newer than this cnnedge")
    return checkpoint


def model_from_checkpoint(checkpoint: dict, path: str | os.PathLike = "checkpoint") -> nn.Sequential:
    model = build_model(checkpoint["arch"], checkpoint["num_classes"])
    try:
        model.load_state_dict(checkpoint["state_dict"])
    except RuntimeError as e:
        first = str(e).strip().splitlines()
        raise CnnedgeError(f"{path}: weights do not fit architecture {checkpoint['arch']!r} ({' '.join(first[:2])[:200]})") from None
    return model.eval()
