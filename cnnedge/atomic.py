"""Crash-safe writes: a file is either the old version or the complete new one, never half.

The new version is written to a temp file beside the target, `.<name>.cnnedge.<pid>.<random>.tmp[<suffix>]`,
then flushed, fsynced and renamed over it. A writer killed outright (SIGKILL, power cut) leaves its temp file
behind: nothing ever reads it, and the first write into that folder by a later cnnedge process deletes the
temp files that it can prove a dead cnnedge process made: that exact name (the `cnnedge` marker, a pid that is
no longer running, mkstemp's 8 random characters, the target's own suffix), a regular file of this user.
Nothing else is ever deleted.

`publish(..., overwrite=False)` creates the target only if it does not exist, at the moment of publishing
(a hard link, which fails on an existing name), so two runs that overlap cannot silently replace each
other's file. Write errors (a full disk, a read-only folder, a path under a file) are one-line CnnedgeErrors
naming the file, and the old file is kept.
"""

from __future__ import annotations

import errno
import itertools
import os
import re
import stat
import tempfile
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import IO, Iterator

from cnnedge.errors import CnnedgeError

MARKER = "cnnedge"
# What temp_beside creates: mkstemp's random part is 8 characters of [a-z0-9_].
_TEMP_NAME = re.compile(rf"\.(?P<name>.+)\.{MARKER}\.(?P<pid>\d+)\.[a-z0-9_]{{8}}\.tmp(?P<suffix>\.\w+)?")
_swept: set[Path] = set()  # folders this process has already cleaned
_numbers = itertools.count()  # write_unsynced's temp names: unique in this process, 8 hex digits as mkstemp's


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


def is_stale_temp(name: str, st: os.stat_result | None = None) -> bool:
    """Whether `name` is a temp file a cnnedge process that no longer runs was writing (and `st`, its lstat,
    a regular file of this user)."""
    m = _TEMP_NAME.fullmatch(name)
    if m is None or m["suffix"] not in (None, Path(m["name"]).suffix):
        return False
    if st is not None and not (stat.S_ISREG(st.st_mode) and st.st_uid == os.getuid()):
        return False
    pid = int(m["pid"])
    return pid != os.getpid() and not _process_exists(pid)


def _sweep(folder: Path) -> None:
    """Delete the temp files left in `folder` by cnnedge processes that were killed while writing."""
    if os.name != "posix" or folder in _swept:  # os.kill(pid, 0) is no existence check on Windows
        return
    _swept.add(folder)
    with suppress(OSError), os.scandir(folder) as entries:
        for entry in entries:
            if entry.name.startswith(".") and f".{MARKER}." in entry.name:
                with suppress(OSError):
                    if is_stale_temp(entry.name, entry.stat(follow_symlinks=False)):
                        os.unlink(entry.path)


def cannot_write(path: str | os.PathLike, e: OSError) -> CnnedgeError:
    """One line for a failed write: the file, the reason, and what became of the old version."""
    path = Path(path)
    reason = e.strerror or str(e)
    if isinstance(e, (FileExistsError, NotADirectoryError)) or e.errno in (errno.ENOTDIR, errno.EEXIST):
        blocker = next((p for p in path.parents if os.path.lexists(p)), None)
        if blocker is not None and not os.path.isdir(blocker):
            reason = f"{blocker} is a file, not a folder"
    kept = " (the existing file is kept)" if os.path.lexists(path) else ""
    return CnnedgeError(f"cannot write {path}: {reason}{kept}")


def check_writable(path: str | os.PathLike) -> None:
    """Refuse up front, in one line, an output that could never be written: a folder, a path under a file,
    or in a folder this process may not write to. For commands that work a while before writing."""
    path = Path(path)
    if os.path.isdir(path):
        raise CnnedgeError(f"{path} is a folder; give a file name")
    folder = path.parent
    while not os.path.lexists(folder) and folder != folder.parent:
        folder = folder.parent
    if not os.path.isdir(folder):
        raise CnnedgeError(f"cannot write {path}: {folder} is a file, not a folder")
    if not os.access(folder, os.W_OK | os.X_OK):  # also false on a read-only file system
        reason = "a read-only file system" if _read_only(folder) else "a folder this user may not write to"
        raise CnnedgeError(f"cannot write {path}: {folder} is {reason}")


def _read_only(folder: Path) -> bool:
    with suppress(OSError, AttributeError):
        return bool(os.statvfs(folder).f_flag & os.ST_RDONLY)
    return False


def _open_temp(path: Path, suffix: str = "") -> tuple[int, Path]:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _sweep(Path(os.path.abspath(path.parent)))
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{MARKER}.{os.getpid()}.", suffix=f".tmp{suffix}",
                                   dir=path.parent)
    except OSError as e:
        raise cannot_write(path, e) from None
    os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the user's usual mode
    return fd, Path(tmp)


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def temp_beside(path: str | os.PathLike, suffix: str = "") -> Path:
    """Create an empty temp file in `path`'s folder, named after it (writers that pick a format from the
    file name, like cv2.VideoWriter, need `suffix`: give the target's own)."""
    fd, tmp = _open_temp(Path(path), suffix)
    os.close(fd)
    return tmp


def _durable(tmp: Path) -> None:
    fd = os.open(tmp, os.O_RDWR)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish(tmp: str | os.PathLike, path: str | os.PathLike, overwrite: bool = True) -> None:
    """Move the finished temp file `tmp` to `path`. Without `overwrite`, `path` must not exist when this
    runs: a hard link claims the name or fails, so an output created meanwhile by another process is kept
    and this one refused. (Where hard links are not supported, an exclusive create claims the name.)"""
    tmp, path = Path(tmp), Path(path)
    try:
        if overwrite:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)
            except FileExistsError:
                raise
            except OSError:  # no hard links here (FAT, some network file systems)
                os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
                os.replace(tmp, path)
            else:
                os.unlink(tmp)
    except FileExistsError:
        raise CnnedgeError(f"{path} already exists (another run wrote it meanwhile?); pass --force to overwrite it") from None
    except OSError as e:
        raise cannot_write(path, e) from None
    _fsync_dir(path.parent)


def commit(tmp: str | os.PathLike, path: str | os.PathLike, overwrite: bool = True) -> None:
    """Make the finished temp file `tmp` durable and publish it as `path`."""
    try:
        _durable(Path(tmp))
    except OSError as e:
        raise cannot_write(path, e) from None
    publish(tmp, path, overwrite)


@contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "", overwrite: bool = True) -> Iterator[Path]:
    """For writers that want a file name rather than a file object: yield a temp path beside `path`,
    committed over `path` when the block succeeds, deleted when it raises."""
    tmp = temp_beside(path, suffix)
    try:
        yield tmp
        commit(tmp, path, overwrite)
    except BaseException:
        with suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb", overwrite: bool = True) -> Iterator[IO]:
    """Yield a file object on a temp file beside `path`; on success it replaces `path`."""
    with atomic_path(path, overwrite=overwrite) as tmp:
        try:
            with open(tmp, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
                yield f
        except OSError as e:  # a full disk: the write or the close fails, the old file stays
            raise cannot_write(path, e) from None


def write_text(path: str | os.PathLike, text: str, overwrite: bool = True) -> None:
    with atomic_write(path, "w", overwrite) as f:
        f.write(text)


def write_bytes(path: str | os.PathLike, data: bytes, overwrite: bool = True) -> None:
    with atomic_write(path, overwrite=overwrite) as f:
        f.write(data)


def stage(path: str | os.PathLike, data: bytes) -> Path:
    """Write `data` durably to a temp file beside `path` and return it, for a set of files that are all
    written before any is published (see publish); the caller removes it if it is never published."""
    fd, tmp = _open_temp(Path(path))
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        with suppress(OSError):
            os.unlink(tmp)
        raise cannot_write(path, e) from None
    return tmp


def prepare_folder(folder: str | os.PathLike) -> None:
    """Create `folder` (and its parents) for many write_unsynced files, and clean it of stale temp files."""
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        raise cannot_write(folder, e) from None
    _sweep(Path(os.path.abspath(folder)))


def write_unsynced(path: str, data: bytes) -> None:
    """A whole file under its final name (temp file, then rename) without an fsync: for many small files of
    debugging output (`predict --save-crops`), where an fsync per file would cost far more than the work.
    A crash of cnnedge never leaves half a file under its name; a power cut may lose the last ones written
    (sync_folder once at the end makes the names durable). The folder must exist (prepare_folder)."""
    folder, name = os.path.split(path)
    for _ in range(3):  # a name left by a writer with this pid, long ago: take the next number
        tmp = os.path.join(folder, f".{name}.{MARKER}.{os.getpid()}.{next(_numbers) % 16**8:08x}.tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the user's umask applies
            break
        except FileExistsError:
            continue
        except OSError as e:
            raise cannot_write(path, e) from None
    else:
        raise cannot_write(path, FileExistsError(errno.EEXIST, "temp file names taken"))
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError as e:
        with suppress(OSError):
            os.unlink(tmp)
        raise cannot_write(path, e) from None


def sync_folder(folder: str | os.PathLike) -> None:
    """fsync a folder's entries once, after many write_unsynced files."""
    _fsync_dir(Path(folder))
