"""Writing a file so that a crash leaves either the old or the new content, never half.

The one atomic writer of the library: checkpoints, summaries, CSVs and recipes all go
through it. The data goes to a temporary file in the same folder, is flushed and
fsynced, then renamed over the final name (``os.replace`` is atomic on POSIX), and the
folder is fsynced so the rename itself survives a power cut.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import BinaryIO, Callable, Union


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
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as fh:
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
