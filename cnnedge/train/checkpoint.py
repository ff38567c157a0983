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
from cnnedge.train.zoo import ARCHS, build_model

FORMAT = "cnnedge.checkpoint"
FORMAT_VERSION = 1
MAX_CHECKPOINT_BYTES = 512 * 2**20  # refuse larger files (or files that unpack larger) before reading them
REQUIRED_KEYS = ("arch", "num_classes", "class_names", "input_shape", "mean", "std", "preprocess", "state_dict")


def save_checkpoint(path: str | os.PathLike, checkpoint: dict, overwrite: bool = True) -> None:
    """Atomically; without `overwrite`, refused if `path` exists when the file is published."""
    import torch

    # Serialise to memory first so a failing torch.save never touches the destination.
    buffer = io.BytesIO()
    torch.save({"format": FORMAT, "format_version": FORMAT_VERSION, **checkpoint}, buffer)
    with atomic_write(path, overwrite=overwrite) as f:
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
    if not os.path.isfile(path):
        raise CnnedgeError(f"{path}: {'not a file' if os.path.lexists(path) else 'no such checkpoint file'}")
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
        raise CnnedgeError(f"{path}: not a cnnedge checkpoint ({_why_not(path, e)})") from None
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != FORMAT:
        raise CnnedgeError(f"{path}: not a cnnedge checkpoint (no '{FORMAT}' header; is it a bare state_dict?)")
    missing = [k for k in REQUIRED_KEYS if k not in checkpoint]
    if missing:
        raise CnnedgeError(f"{path}: incomplete cnnedge checkpoint (missing {', '.join(missing)})")
    check_checkpoint(checkpoint, path)
    return checkpoint


def _why_not(path: Path, e: Exception) -> str:
    """Why torch.load refused a file: what the file is when it is something else (a README, an ONNX model),
    the global a pickle asked for when it asked for one (that is the possibly malicious case)."""
    text = str(e)
    named = re.search(r"GLOBAL ([\w.]+)", text)  # what the pickle asked for, e.g. posix.system
    if named:
        return (f"refused to unpickle {named[1]}: a checkpoint holds only tensors and plain values "
                "(possibly malicious)")
    from cnnedge.infer.files import describe_file  # OpenCV and numpy: not on the way of a refusal before torch

    kind = describe_file(path)
    if kind == "an ONNX model":
        return "this is already an ONNX model: export takes a checkpoint (.pt); run the model with `cnnedge predict --model`"
    if kind not in (None, "a PyTorch checkpoint", "a Python pickle (an old-style PyTorch file)"):
        return kind
    if "weights_only" in text or "Unsupported global" in text or "Unsupported operand" in text:
        return "refused to unpickle it: a checkpoint holds only tensors and plain values"
    return (text.strip().splitlines()[0] if text.strip() else type(e).__name__)[:200]


def check_checkpoint(checkpoint: dict, path: str | os.PathLike = "checkpoint") -> None:
    """Every field a model is built from, checked before anything is allocated (a num_classes of 10^9 would
    ask for a 512 GB head) and by the rules predict applies to an exported model's metadata, so that export
    never writes a model predict refuses."""
    import torch

    from cnnedge.infer.modelinfo import check_fields

    def bad(key: str, why: str) -> CnnedgeError:
        return CnnedgeError(f"{path}: checkpoint {key!r} {why}")

    version = checkpoint.get("format_version", 0)
    if not isinstance(version, int) or isinstance(version, bool) or not 0 <= version <= FORMAT_VERSION:
        raise bad("format_version", f"is {version!r}; this cnnedge reads format {FORMAT_VERSION} (a newer cnnedge "
                                    "wrote it, or it was altered)")
    if not isinstance(checkpoint["arch"], str) or checkpoint["arch"] not in ARCHS:
        raise bad("arch", f"is {str(checkpoint['arch'])[:60]!r}, not one of {', '.join(ARCHS)}")
    check_fields(bad, checkpoint["class_names"], checkpoint["input_shape"], checkpoint["mean"], checkpoint["std"],
                 checkpoint["preprocess"])
    n = checkpoint["num_classes"]
    if not isinstance(n, int) or isinstance(n, bool) or n != len(checkpoint["class_names"]):
        raise bad("num_classes", f"is {n!r} for {len(checkpoint['class_names'])} class names")
    state = checkpoint["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise bad("state_dict", "must map parameter names to tensors")


def model_from_checkpoint(checkpoint: dict, path: str | os.PathLike = "checkpoint") -> nn.Sequential:
    model = build_model(checkpoint["arch"], checkpoint["num_classes"])
    try:
        model.load_state_dict(checkpoint["state_dict"])
    except RuntimeError as e:
        first = str(e).strip().splitlines()
        raise CnnedgeError(f"{path}: weights do not fit architecture {checkpoint['arch']!r} ({' '.join(first[:2])[:200]})") from None
    return model.eval()
