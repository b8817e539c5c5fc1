"""Writing a file so that a crash leaves either the old or the new content, never half.

The one atomic writer of the library: checkpoints, summaries, CSVs and recipes all go
through it. The data goes to a temporary file in the same folder, is flushed and
fsynced, then renamed over the final name (``os.replace`` is atomic on POSIX), and the
folder is fsynced so the rename itself survives a power cut.
"""

from __future__ import annotations

import errno
import fcntl
import os
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable, Optional, Union

from .errors import LSMError


def _read_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _read_umask()


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: Path, data: Union[str, bytes, Callable[[BinaryIO], None]]) -> None:
    """Write ``data`` (text, bytes, or a function that writes to the open binary file) to ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # A name of its own (mkstemp in the same folder): two writers never share a temporary file.
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    tmp = Path(name)
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)  # what open() would have given; mkstemp makes it private
        with os.fdopen(fd, "wb") as fh:
            if callable(data):
                data(fh)
            else:
                fh.write(data.encode("utf-8") if isinstance(data, str) else data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


LOCK_NAME = ".lock"


class FolderLocked(LSMError):
    """Another process holds the folder's lock; the message names its PID."""


class FolderLock:
    """An exclusive ``flock`` on ``folder/.lock``, held while a process trains into the folder.

    Two processes writing one run folder interleave metrics.jsonl lines and leave a
    summary from one run beside the recipe of the other; the lock makes the second one
    stop at once. The kernel drops a ``flock`` when its process dies, so a ``.lock`` left
    by a killed run is stale and harmless: the next process takes it. The file holds the
    holder's PID, only to name it in the refusal.
    """

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self._fd: Optional[int] = None

    def acquire(self) -> "FolderLock":
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / LOCK_NAME
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            holder = path.read_text(encoding="utf-8", errors="replace").strip() or "unknown"
            raise FolderLocked(
                f"{self.folder}: another process (PID {holder}) is training into this run folder; "
                "wait for it, or choose another folder"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "FolderLock":
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


#: What makes a folder a run folder: an output of evaluate, tau-norm or export never goes into one.
RUN_FOLDER_MARKS = ("recipe.toml", "checkpoints")


def check_output_folder(
    folder: Path,
    what: str,
    may_replace: Optional[Callable[[Path], bool]] = None,
    otherwise: str = "choose an empty folder",
) -> None:
    """The one guard of a command's output folder, before any work: not a file, never a run folder,
    empty or one that ``may_replace`` accepts (an earlier output of the same command); writable."""
    if folder.exists() and not folder.is_dir():
        raise LSMError(f"{folder}: is a file, not a folder")
    if folder.is_dir() and any(folder.iterdir()):
        if any((folder / mark).exists() for mark in RUN_FOLDER_MARKS):
            raise LSMError(f"{folder}: is a run folder; {what} goes into a folder of its own")
        if may_replace is None or not may_replace(folder):
            raise LSMError(f"{folder}: holds other files; {otherwise}")
    check_writable(folder)


def check_writable(folder: Path) -> None:
    """Refuse, before any work, an output folder that cannot be written: the folder itself or,
    when it does not exist yet, the nearest folder above it that does (a read-only disk, no
    permission). Nothing is created here, so a refused command leaves no trace."""
    probe = folder.absolute()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise LSMError(f"{folder}: cannot be created ({probe} is a file)")
    if not os.access(probe, os.W_OK | os.X_OK):
        reason = "read-only file system" if _read_only_mount(probe) else "permission denied"
        raise LSMError(f"{folder}: cannot be written ({probe}: {reason}); choose another --out")


def _read_only_mount(path: Path) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def holds_anything(folder: Path) -> bool:
    """Whether ``folder`` is taken: a file of that name, or a folder with any entry besides a
    (stale or held) ``.lock``."""
    if not folder.exists():
        return False
    return not folder.is_dir() or any(entry.name != LOCK_NAME for entry in folder.iterdir())
