"""Refusing, in one line, what would not fit in memory before it is allocated.

A recipe value such as ``model.width = 10**9`` or ``num_classes = 10**9`` would otherwise
eat memory until the process is killed or fail with an allocator traceback.
"""

from __future__ import annotations

from typing import Optional

#: A model or data set may take at most this share of the memory available when it is built.
MEMORY_SHARE = 0.8


def available_memory() -> Optional[int]:
    """Bytes of memory available now (Linux: MemAvailable), or None where it cannot be read."""
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        return None
    return None


def check_fits_in_memory(nbytes: int, what: str) -> None:
    """ValueError (one line) when ``what`` would need more than 80 % of the available memory."""
    free = available_memory()
    if free is not None and nbytes > MEMORY_SHARE * free:
        raise ValueError(
            f"{what} needs about {nbytes / 2**30:.1f} GiB, more than {MEMORY_SHARE:.0%} of the "
            f"{free / 2**30:.1f} GiB available"
        )
