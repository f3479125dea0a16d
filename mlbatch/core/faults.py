"""Crash points, for the tests that prove exactly once: end this process at its k-th write, or lose the
answer of its k-th conditional write.

Every write and delete that mlbatch makes to an output, a state or a registry passes ``point`` first
(``storage``, ``versioned``, ``iceberg``), and a local atomic write passes it once more between its
hidden temporary and the rename. Set from the environment, or by a test on ``FAULTS``:

    MLBATCH_CRASH_AT=k          the process ends (``os._exit(CRASHED)``, no cleanup, no atexit) at point k
    MLBATCH_LOSE_REPLY_AT=k     the k-th conditional write is applied, then its answer is treated as lost
    MLBATCH_PAUSE_AT=k          the process stops itself (SIGSTOP) at point k, until someone sends SIGCONT:
                                a holder paused past its lease, as a long GC or a frozen node pauses it

Unset (the default), ``point`` only counts. Nothing here changes what a write does.
"""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass, field

CRASHED = 86   # the exit status of a process ended at a crash point


def _int_env(name: str) -> int | None:
    value = os.environ.get(name, "").strip()
    return int(value) if value else None


@dataclass
class Faults:
    """Where this process is among its writes, and where it is told to fail."""

    crash_at: int | None = field(default_factory=lambda: _int_env("MLBATCH_CRASH_AT"))
    lose_reply_at: int | None = field(default_factory=lambda: _int_env("MLBATCH_LOSE_REPLY_AT"))
    pause_at: int | None = field(default_factory=lambda: _int_env("MLBATCH_PAUSE_AT"))
    points: int = 0          # writes and deletes passed so far
    swaps: int = 0           # conditional writes passed so far
    locked: bool = False     # inside a local compare-and-swap's lock: a pause here would stop every writer

    def point(self) -> None:
        """A write or delete is about to happen: end the process here if this is the crash point."""
        self.points += 1
        if self.points == self.crash_at:
            os._exit(CRASHED)
        if self.points == self.pause_at and not self.locked:   # flock waits for a live holder, as it must
            os.kill(os.getpid(), signal.SIGSTOP)

    def reply_lost(self) -> bool:
        """A conditional write was just applied: whether its answer is to be treated as lost."""
        self.swaps += 1
        return self.swaps == self.lose_reply_at


FAULTS = Faults()
