"""Crash-safe writes: a file is either the old version or the complete new one, never half.

The new version is written to a temp file beside the target, `.<name>.<pid>.<random>.tmp[<suffix>]`, then
flushed, fsynced and renamed over it. A writer killed outright (SIGKILL, power cut) leaves its temp file
behind: nothing ever reads it, and the first write into that folder by a later cnnedge process deletes
the temp files whose writing process no longer exists.
"""

from __future__ import annotations

import os
import re
import tempfile
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import IO, Iterator

_TEMP_NAME = re.compile(r"\..+\.(\d+)\.[a-z0-9_]+\.tmp(\.\w+)?")  # what temp_beside creates
_swept: set[Path] = set()  # folders this process has already cleaned


def _fsync_dir(folder: Path) -> None:
    # The rename itself lives in the directory entry; without this a power cut can undo it.
    with suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: an existence check, nothing is sent
    except ProcessLookupError:
        return False
    except OSError:  # it exists but belongs to someone else
        return True
    return True


def _sweep(folder: Path) -> None:
    """Delete temp files left in `folder` by cnnedge processes that were killed while writing."""
    if os.name != "posix" or folder in _swept:  # os.kill(pid, 0) is no existence check on Windows
        return
    _swept.add(folder)
    with suppress(OSError), os.scandir(folder) as entries:
        for entry in entries:
            m = _TEMP_NAME.fullmatch(entry.name)
            if m and int(m[1]) != os.getpid() and entry.is_file(follow_symlinks=False) and not _process_exists(int(m[1])):
                with suppress(OSError):
                    os.unlink(entry.path)


def temp_beside(path: str | os.PathLike, suffix: str = "") -> Path:
    """Create an empty temp file in `path`'s folder, named after it (writers that pick a format from the
    file name, like cv2.VideoWriter, need `suffix`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _sweep(path.parent.resolve())
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=f".tmp{suffix}", dir=path.parent)
    os.close(fd)
    return Path(tmp)


def commit(tmp: str | os.PathLike, path: str | os.PathLike) -> None:
    """Make the finished temp file `tmp` durable and rename it over `path`."""
    fd = os.open(tmp, os.O_RDWR)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file the user's usual mode
    os.replace(tmp, path)
    _fsync_dir(Path(path).parent)


@contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """For writers that want a file name rather than a file object: yield a temp path beside `path`,
    committed over `path` when the block succeeds, deleted when it raises."""
    tmp = temp_beside(path, suffix)
    try:
        yield tmp
        commit(tmp, path)
    except BaseException:
        with suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO]:
    """Yield a file object on a temp file beside `path`; on success it replaces `path`."""
    with atomic_path(path) as tmp, open(tmp, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
        yield f


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_write(path, "w") as f:
        f.write(text)


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_write(path) as f:
        f.write(data)
