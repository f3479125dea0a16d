"""What a nightly run needs: the labeling options, shared with ``mlbatch label``, and the night's own."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import date as Date
from datetime import datetime, timezone
from typing import Any

from ..core.iceberg import DEFAULT_CATALOG
from ..label.config import JobError, LabelOptions

_DATE_RE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")


class NightlyError(JobError):
    """Some manifests of the night could not be labeled; ``summary`` says which and why."""

    def __init__(self, message: str, summary: dict[str, Any]):
        super().__init__(message)
        self.summary = summary


class DriftError(NightlyError):
    """The night completed, but drift was found and ``fail_on_drift`` is set."""


@dataclass(kw_only=True)
class NightlyConfig(LabelOptions):
    """One nightly run: the labeling options (``LabelOptions``, passed to every labeling run) and its own.

    The CLI and ``jobs/nightly.py`` fill it from flags.
    """

    input: str
    model: str
    output: str
    date: str | None = None            # YYYY-MM-DD; default today (UTC)
    relabel: bool = False
    drift_window: int = 7
    drift_bound: float = 0.1
    fail_on_drift: bool = False
    table: str | None = None           # an Iceberg table (NAMESPACE.TABLE) each night is committed to, in one snapshot
    catalog: str = DEFAULT_CATALOG     # its PyIceberg catalog (an embedded SQLite one beside a local output)


def check_date(text: str | None) -> str:
    """``YYYY-MM-DD`` exactly, a real calendar date; anything else is a ``ValueError``.

    Strict because it becomes a path (``OUT/dt=DATE``): nothing but digits and dashes passes.
    """
    if text is None:
        return datetime.now(timezone.utc).date().isoformat()
    if not isinstance(text, str) or not _DATE_RE.fullmatch(text):
        raise ValueError(f"--date {text!r}: expected YYYY-MM-DD")
    try:
        parsed = Date.fromisoformat(text)
    except ValueError:
        raise ValueError(f"--date {text!r}: not a calendar date") from None
    if parsed.isoformat() != text:
        raise ValueError(f"--date {text!r}: expected YYYY-MM-DD")
    return text


def check_config(config: NightlyConfig) -> str:
    """The night's date, once the configuration makes sense."""
    day = check_date(config.date)
    if config.drift_window < 1:
        raise ValueError(f"--drift-window {config.drift_window}: must be at least 1")
    if not config.drift_bound >= 0:
        raise ValueError(f"--drift-bound {config.drift_bound}: must be a number >= 0")
    return day
