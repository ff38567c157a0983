"""Files in, text out: reading and decoding image files, walking folders and globs, and keeping what
native libraries print off the user's terminal. Torch-free."""

from __future__ import annotations

import contextlib
import glob
import math
import os
import re
import stat
import struct
import sys
import tempfile
import unicodedata
from pathlib import Path
from typing import Iterable

import cv2
import numpy as np

from cnnedge.errors import CnnedgeError, ImageError, ImageTooLarge

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".gif")  # GIF: the first frame
MAX_FILE_BYTES = 1 << 30  # larger files are refused before reading them
MAX_PIXELS = 80_000_000  # larger images are refused from their header, before decoding (see cnnedge/__init__.py)


# ----------------------------------------------------------------------------------------- decode


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Decode a file as is (8/16-bit, grey, BGR or BGRA), upright (see `decode_image`). Any file name works
    (no cv2.imread)."""
    return decode_image(read_bytes(path))


def read_bytes(path: str | os.PathLike) -> bytes:
    """An image file's contents, or ImageError saying why there are none (a folder, a FIFO, too large)."""
    try:
        st = os.stat(path)
        if stat.S_ISDIR(st.st_mode):
            raise ImageError("is a directory")
        if not stat.S_ISREG(st.st_mode):  # a FIFO or a device: reading it could block or never end
            raise ImageError("not a regular file")
        if st.st_size > MAX_FILE_BYTES:
            raise ImageTooLarge(f"{st.st_size:,} bytes is over the {MAX_FILE_BYTES:,}-byte file limit")
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        if isinstance(e, FileNotFoundError) and os.path.islink(path):
            raise ImageError("broken symbolic link (its target does not exist)") from None
        raise ImageError(e.strerror or str(e)) from None


def decode_image(data: bytes | np.ndarray) -> np.ndarray:
    """Decode encoded image bytes as is (8/16-bit, grey, BGR or BGRA), upright: the EXIF orientation of a
    JPEG, WebP or PNG (eXIf) is applied as image viewers do (OpenCV's TIFF decoder applies TIFF's own)."""
    return _decode(_buffer(data), cv2.IMREAD_UNCHANGED)


def _buffer(data: bytes | np.ndarray) -> np.ndarray:
    return np.frombuffer(data, dtype=np.uint8) if isinstance(data, (bytes, bytearray, memoryview)) else data


# libjpeg's DCT-domain scalings (a 1/8 scale decodes 8x8 blocks to one pixel), the largest first.
_REDUCED = ((8, cv2.IMREAD_REDUCED_GRAYSCALE_8), (4, cv2.IMREAD_REDUCED_GRAYSCALE_4), (2, cv2.IMREAD_REDUCED_GRAYSCALE_2))


def decode_grey(data: bytes | np.ndarray, long_side: int) -> tuple[np.ndarray, int]:
    """Like `decode_image`, for a caller that only needs grey at least `long_side` pixels on the long side
    (the digit preprocessing): an 8-bit grey or colour JPEG of more than twice that is decoded by libjpeg in
    the DCT domain at the smallest of 1/8, 1/4, 1/2 scale that keeps `long_side`, straight to grey (its
    luma, without decoding the colour planes). Returns (image, factor): the image's pixels are `factor` of
    the file's (1 for any other file, decoded by `decode_image`: the very pixels a camera frame of it gives)."""
    buf = _buffer(data)
    size = _jpeg_size(buf)
    if size is None or max(size) < 2 * long_side:
        return _decode(buf, cv2.IMREAD_UNCHANGED), 1
    if size[0] * size[1] > MAX_PIXELS or max(size) > 1 << 20:  # OpenCV would only check the reduced size
        raise ImageTooLarge(_TOO_LARGE)
    factor, flags = next((f, flags) for f, flags in _REDUCED if max(size) >= f * long_side)
    # The orientation is applied here, as for any file (IMREAD_IGNORE_ORIENTATION: one rule, `oriented`).
    return _decode(buf, flags | cv2.IMREAD_IGNORE_ORIENTATION), factor


def _jpeg_size(buf: np.ndarray) -> tuple[int, int] | None:
    """(width, height) of a baseline, extended or progressive JPEG of 8-bit grey or YCbCr (1 or 3
    components), read from its frame header; None for anything else (12-bit, lossless, CMYK, not a JPEG),
    which is decoded as is."""
    data = memoryview(np.ascontiguousarray(buf))  # the headers are read in place, the file is not copied
    if bytes(data[:2]) != b"\xff\xd8":
        return None
    i = 2
    while i + 9 < len(data):
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        length = struct.unpack_from(">H", data, i + 2)[0]
        if marker in (0xC0, 0xC1, 0xC2):  # SOF0-2: the frame header
            precision, height, width, components = struct.unpack_from(">BHHB", data, i + 4)
            return (width, height) if precision == 8 and components in (1, 3) and width and height else None
        if 0xC3 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC) or marker == 0xDA:
            return None  # another kind of frame (lossless, arithmetic-coded...), or the data before any frame
        i += 2 + length
    return None


_TOO_LARGE = (f"over the size limit of {MAX_PIXELS:,} pixels and {1 << 20:,} on a side "
              "(refused from its header, without decoding it)")


def _decode(buf: np.ndarray, flags: int) -> np.ndarray:
    if buf.size == 0:
        raise ImageError("empty file")
    try:
        # IMREAD_UNCHANGED keeps 16-bit depth and alpha but is the one mode in which OpenCV does not apply the
        # EXIF orientation, so it is read from the metadata decoded alongside, in every mode (keyword: the
        # positional order differs between OpenCV 4 and 5).
        image, kinds, blobs = cv2.imdecodeWithMetadata(buf, flags=flags)
    except cv2.error as e:
        if "validateInputImageSize" in str(e):  # OpenCV's limit (cnnedge/__init__.py): nothing was decoded
            raise ImageTooLarge(_TOO_LARGE) from None
        raise ImageError(f"not a decodable image ({str(e).strip().splitlines()[-1][:80]})") from None
    if image is None:
        raise ImageError("not a decodable image")
    if image.size == 0:
        raise ImageError("empty image")
    if image.ndim == 3 and image.shape[2] not in (1, 3, 4):
        raise ImageError(f"unsupported channel count {image.shape[2]}")
    exif = [b for kind, b in zip(kinds, blobs) if kind == cv2.IMAGE_METADATA_EXIF]
    return oriented(image, exif_orientation(exif[0].tobytes()) if exif else 1)


def exif_orientation(exif: bytes) -> int:
    """The Orientation tag (1-8) of an EXIF block (a TIFF header and its first directory), 1 when it is
    absent or unreadable. 1 is upright; 2-8 say how the stored pixels must be flipped or turned."""
    if exif.startswith(b"Exif\0\0"):  # some writers keep the JPEG APP1 prefix
        exif = exif[6:]
    order = {b"II": "<", b"MM": ">"}.get(exif[:2])
    try:
        if order is None or struct.unpack_from(order + "H", exif, 2)[0] != 42:
            return 1
        ifd = struct.unpack_from(order + "I", exif, 4)[0]
        for i in range(struct.unpack_from(order + "H", exif, ifd)[0]):
            tag, kind, count = struct.unpack_from(order + "HHI", exif, ifd + 2 + 12 * i)
            if tag == 0x0112:  # Orientation: one SHORT, stored in the entry itself
                value = struct.unpack_from(order + "H", exif, ifd + 10 + 12 * i)[0] if kind == 3 and count >= 1 else 1
                return value if 1 <= value <= 8 else 1
    except struct.error:  # truncated or pointing past the end
        pass
    return 1


# EXIF orientation -> (row step, column step) applied after transposing for 5-8: what a viewer does.
_ORIENTATIONS = {2: (1, -1), 3: (-1, -1), 4: (-1, 1), 5: (1, 1), 6: (1, -1), 7: (-1, -1), 8: (-1, 1)}


def oriented(image: np.ndarray, orientation: int) -> np.ndarray:
    """The stored pixels as a viewer shows them under EXIF orientation 1-8 (2: mirrored, 3: upside down,
    4: flipped vertically, 5: transposed, 6: turned 90 degrees clockwise, 7: transversed, 8: anticlockwise)."""
    if orientation not in _ORIENTATIONS:
        return image
    if orientation >= 5:
        image = image.swapaxes(0, 1)
    rows, cols = _ORIENTATIONS[orientation]
    return np.ascontiguousarray(image[::rows, ::cols])


# Characters that act on a terminal or break a line instead of showing: C0/C1 controls (ESC sequences clear the
# screen or set the window title, a newline splits a one-line message), format characters (bidirectional
# overrides reorder what is shown) and the Unicode line and paragraph separators.
_ESCAPED = ("Cc", "Cf", "Zl", "Zp")


def printable(text: str) -> str:
    """A file name, or a message naming one, that any output accepts and that cannot act on a terminal: the
    bytes of a non-UTF-8 name (which Python keeps as lone surrogates, unprintable on a UTF-8 stream) are shown
    as \\xNN, and control characters as \\xNN or \\uNNNN (ESC as \\x1b, a newline as \\x0a)."""
    try:
        text = text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # a lone surrogate that is no escaped byte (a broken name on Windows)
        text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    if text.isprintable():  # the usual case, at C speed
        return text
    return "".join(c if c == " " or unicodedata.category(c) not in _ESCAPED
                   else f"\\x{ord(c):02x}" if ord(c) < 0x100 else f"\\u{ord(c):04x}" for c in text)


def shown_path(path: str | os.PathLike) -> str:
    """A path as the user should read it: relative to the working folder when it lies inside it."""
    name = printable(str(path))
    if os.path.isabs(name):
        with contextlib.suppress(ValueError):  # another drive on Windows
            relative = os.path.relpath(name)
            if not relative.startswith(".."):
                return relative
    return name


def natural_key(path: Path) -> list:
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", str(path))]


def is_image_name(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def scan_folder(folder: Path, recursive: bool = False, errors: list[tuple[str, str]] | None = None) -> list[Path]:
    """The images in a folder and in its immediate subfolders (the ImageFolder layout: one folder per
    class), or at any depth with `recursive`. Hidden files and folders are skipped, and so are symbolic links
    to folders (a link loop can neither hang nor repeat the walk). A folder that cannot be read is added to
    `errors` as (folder, reason) when a list is given: its images are not silently missing."""
    found = []

    def unreadable(e: OSError) -> None:
        if errors is not None:
            errors.append((str(e.filename or folder), f"{e.strerror or e}; its images are skipped"))

    for root, dirs, files in os.walk(folder, onerror=unreadable):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        depth = len(Path(root).relative_to(folder).parts)
        if not recursive and depth >= 1:
            dirs[:] = []
        found += [Path(root) / f for f in files if is_image_name(Path(f))]
    return sorted(found, key=natural_key)


def _glob(pattern: str, recursive: bool) -> list[str]:
    """Paths matching a glob pattern by the folder walks' rules: `**` (with --recursive; else it is `*`)
    descends into subfolders but never through a symbolic link to a folder (pathlib's rule; glob.glob
    follows them, and two links to `..` make it run for minutes), and hidden names are skipped."""
    parts = Path(pattern).parts
    first = next(i for i, part in enumerate(parts) if glob.has_magic(part))
    root = Path(*parts[:first]) if first else Path()
    # pathlib accepts `**` only as a whole component; glob.glob reads any other run of stars as one `*`.
    rest = [part if part == "**" and recursive else re.sub(r"\*\*+", "*", part) for part in parts[first:]]
    try:
        matches = [m for m in root.glob(os.path.join(*rest))
                   if not any(c.startswith(".") for c in m.relative_to(root).parts)]
    except (OSError, ValueError):  # an unreadable root, or a pattern pathlib refuses
        return []
    return sorted((str(m) for m in matches), key=lambda m: natural_key(Path(m)))


@contextlib.contextmanager
def quiet_native_stderr():
    """For a batch of files: discard what native decoders print on the process's stderr (libpng, libjpeg,
    libtiff and FFmpeg write their own complaints there, several lines per bad file, none naming it).
    Python's sys.stderr keeps the real stream, so the one-line reports of bad files still get out."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (AttributeError, OSError, ValueError):  # no file descriptor 2 (embedded interpreters)
        yield
        return
    previous = sys.stderr
    if previous is sys.__stderr__:  # a replacement (pytest's capture) does not write to fd 2 anyway
        sys.stderr = open(saved, "w", buffering=1, encoding=previous.encoding, errors=previous.errors, closefd=False)
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 2)
    os.close(null)
    try:
        yield
    finally:
        if sys.stderr is not previous:
            sys.stderr.close()
            sys.stderr = previous
        os.dup2(saved, 2)
        os.close(saved)


# ---------------------------------------------------------------------------------------- inputs


def collect_inputs(args: Iterable[str | os.PathLike], recursive: bool = False) -> tuple[list[str], list[tuple[str, str]]]:
    """Files, folders and glob patterns -> (image paths in order without duplicates, [(arg, problem)]).
    Files named explicitly are kept whatever their extension: if they are not images, decoding says so. A file
    reached twice (two arguments, a glob and a folder, a link to a file) is predicted once: duplicates are
    found by the real path."""
    paths: list[str] = []
    problems: list[tuple[str, str]] = []
    for arg in args:
        arg = str(arg)
        try:
            is_dir = stat.S_ISDIR(os.stat(arg).st_mode)
        except (FileNotFoundError, NotADirectoryError):
            is_dir = None  # nothing there (or a broken link): perhaps a pattern
        except OSError:  # there, but not reachable (an unsearchable folder on the way): reading it will say why
            is_dir = False
        except ValueError:  # a NUL byte in the argument
            problems.append((arg, "not a valid path"))
            continue
        if is_dir:
            errors: list[tuple[str, str]] = []
            found = scan_folder(Path(arg), recursive, errors)
            problems += errors
            if not found and not errors:
                problems.append((arg, f"no {'/'.join(e[1:] for e in IMAGE_EXTENSIONS)} images in this folder"
                                      + ("" if recursive else " or its subfolders (try --recursive)")))
            paths += [str(f) for f in found]
        elif is_dir is False or os.path.islink(arg):
            paths.append(arg)
        elif glob.has_magic(arg):
            matches = _glob(arg, recursive)
            if not matches:
                problems.append((arg, "no file matches this pattern"))
            for m in matches:
                if os.path.isdir(m):
                    errors = []
                    paths += [str(f) for f in scan_folder(Path(m), recursive, errors)]
                    problems += errors
                elif is_image_name(Path(m)):
                    paths.append(m)
        else:
            problems.append((arg, "no such file or directory"))
    seen: set[str] = set()
    unique = []
    real_folders: dict[str, str] = {}  # realpath per folder, not per file: 10,000 files share a few folders
    for path in paths:
        folder, name = os.path.split(path)
        if folder not in real_folders:
            real_folders[folder] = os.path.realpath(folder or ".")
        key = os.path.realpath(path) if os.path.islink(path) else os.path.join(real_folders[folder], name)
        if key not in seen:
            seen.add(key)
            unique.append(path)
    return unique, problems


def describe_file(path: str | os.PathLike) -> str | None:
    """What a file is, from its first bytes, for messages about a file given in the wrong place (a checkpoint
    as --model, an ONNX model or a README to export): "a PyTorch checkpoint", "an ONNX model", ...; None
    when it is none of those."""
    try:
        with open(path, "rb") as f:
            head = f.read(4096)
    except OSError:
        return None
    if not head:
        return "an empty file"
    if head.startswith(b"PK\x03\x04"):
        import zipfile

        try:
            with zipfile.ZipFile(path) as archive:
                names = archive.namelist()
        except (zipfile.BadZipFile, OSError, ValueError):
            return "a damaged zip archive"
        if any(n.endswith("/data.pkl") or n == "data.pkl" for n in names):
            return "a PyTorch checkpoint"
        return "a numpy archive (.npz)" if names and all(n.endswith(".npy") for n in names) else "a zip archive"
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return "a Python pickle (an old-style PyTorch file)"
    # An ONNX ModelProto starts with its ir_version (field 1, a small varint), then producer or opsets.
    if len(head) > 2 and head[0] == 0x08 and 0 < head[1] < 0x40 and head[2] in (0x12, 0x1a, 0x22, 0x2a, 0x3a, 0x42):
        return "an ONNX model"
    if head.startswith((b"\x89PNG", b"\xff\xd8\xff", b"GIF8", b"BM")):
        return "an image"
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as e:
        text = head[: e.start].decode("utf-8") if e.start > len(head) - 4 else ""  # a character cut at 4 KiB
    if text and all(c.isprintable() or c in "\t\r\n" for c in text):
        return "a text file"
    return None


# ---------------------------------------------------------------------------------- native output


@contextlib.contextmanager
def captured_output():
    """Capture what native code prints on stdout/stderr (onnxruntime logs provider failures there, in colour
    and over several lines): the user gets one line from us instead. Yields a function returning the text."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    saved, captured = {}, ""
    with tempfile.TemporaryFile(mode="w+b") as sink:
        try:
            for fd in (1, 2):
                saved[fd] = os.dup(fd)
                os.dup2(sink.fileno(), fd)
        except OSError:  # no real file descriptors (embedded interpreters): capture nothing
            for fd, old in saved.items():
                os.dup2(old, fd)
                os.close(old)
            saved = {}
        try:
            yield lambda: captured
        finally:
            for stream in (sys.stdout, sys.stderr):
                with contextlib.suppress(Exception):
                    stream.flush()
            for fd, old in saved.items():
                os.dup2(old, fd)
                os.close(old)
            sink.seek(0)
            captured = sink.read().decode("utf-8", "replace")


# ---------------------------------------------------------------------------------------- datasets

TEST_SETS = {"mnist": "MNIST", "qmnist": "QMNIST", "fashion-mnist": "FashionMNIST", "kmnist": "KMNIST"}


def user_cache_dir() -> Path:
    """cnnedge's folder in the user's cache ($XDG_CACHE_HOME or ~/.cache)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "cnnedge"


def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """--data-dir, else $CNNEDGE_DATA, else the user cache folder."""
    if data_dir:
        return Path(data_dir)
    if os.environ.get("CNNEDGE_DATA"):
        return Path(os.environ["CNNEDGE_DATA"])
    return user_cache_dir()


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """An idx file (MNIST's format), plain or gzipped, as a numpy array."""
    import gzip

    path = Path(path)
    data = path.read_bytes()
    if data[:2] == b"\x1f\x8b":
        data = gzip.decompress(data)
    if len(data) < 4 or data[:2] != b"\0\0" or data[2] != 0x08:
        raise CnnedgeError(f"{path}: not an unsigned-byte idx file")
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    if len(data) - 4 - 4 * ndim != math.prod(dims):
        raise CnnedgeError(f"{path}: truncated idx file ({len(data):,} bytes for shape {dims})")
    return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(dims)


def load_test_set(dataset: str, data_dir: str | os.PathLike | None = None, limit: int | None = None):
    """(uint8 images (N, H, W), int64 labels, source) of a torchvision dataset's test split, or
    (None, None, why not). Read with numpy from torchvision's raw layout, so no torch is needed."""
    folder = TEST_SETS.get(dataset)
    if folder is None:
        return None, None, f"the dataset {dataset or '(unknown)'!r} has no idx test set"
    raw = resolve_data_dir(data_dir) / folder / "raw"
    names = ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
    paths = [next((p for p in (raw / n, raw / f"{n}.gz") if p.is_file()), None) for n in names]
    if None in paths:
        return None, None, f"{raw / names[0]} not found (set --data-dir or CNNEDGE_DATA)"
    x, y = read_idx(paths[0]), read_idx(paths[1])
    if x.ndim != 3 or len(x) != len(y):
        raise CnnedgeError(f"{raw}: {len(x)} test images of shape {x.shape[1:]} and {len(y)} labels do not match")
    n = len(x) if limit is None else min(limit, len(x))
    return x[:n], y[:n].astype(np.int64), f"{n:,} {folder} test images"
