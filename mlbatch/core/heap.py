"""Give freed native memory back to the system between units of work.

glibc's malloc keeps what a labeler frees: torch's activations (tens of MiB a batch) leave its heap in
pieces it does not return, and a labeling process held ~400 MiB more than it used after 70,000 rows,
until it levelled off near twice its working size (benchmarks/NOTES.md, "The local engine's memory").
``malloc_trim`` hands the free pages back; with another C library this does nothing.
"""

from __future__ import annotations

import ctypes
from typing import Any, Callable


def _malloc_trim() -> Callable[[int], Any] | None:
    try:
        return ctypes.CDLL(None).malloc_trim   # the C library this process already runs on
    except (OSError, AttributeError):
        return None


_TRIM = _malloc_trim()


def release_freed_memory() -> bool:
    """Return the heap's free pages to the system; False where the C library has no ``malloc_trim``."""
    if _TRIM is None:
        return False
    _TRIM(0)
    return True
