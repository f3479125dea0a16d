"""The nightly state of an output and where everything of a night lives.

Layout of the output (``OUT``)::

    OUT/dt=YYYY-MM-DD/<run_id>-a<epoch>-....parquet     the labeled rows: one Hive partition per night
    OUT/dt=YYYY-MM-DD/_run.json                          that night's nightly summary (drift included)
    OUT/_nightly/state.json                              which manifest was labeled by which model version
    OUT/_nightly/runs/<run_id>/                          one labeling run's _run.json, _SUCCESS, _units/
    OUT/_nightly/runs/YYYY-MM-DD.json                    the nightly summary again, next to the state

Underscore folders and files are never read as data (every Parquet engine and ``mlbatch query``
skip them), so only the ``dt=`` partitions make up the table.
"""

from __future__ import annotations

import json
from typing import Any

from ..core import storage, versioned
from ..core.lease import Fence
from ..core.names import NameError_, check_segment
from ..label import commit
from ..label.config import JobError
from .config import check_date

NIGHTLY_DIR = "_nightly"
STATE_FILE = "state.json"
RUNS_DIR = "runs"
PARTITION_SUMMARY = "_run.json"
STATE_FORMAT = "mlbatch-nightly-state"
STATE_VERSION = 1


def state_uri(output: str) -> str:
    return storage.join(output, NIGHTLY_DIR, STATE_FILE)


def run_dir(output: str, run_id: str) -> str:
    """A run's folder. Its id may come from the state read back, so it passes the one rule for names first."""
    try:
        return storage.join(output, NIGHTLY_DIR, RUNS_DIR, check_segment(run_id, "run id"))
    except NameError_ as exc:
        raise JobError(f"{state_uri(output)}: {exc}") from None


def partition_uri(output: str, day: str) -> str:
    """A night's partition. Its date may come from the state read back: a calendar date, nothing else."""
    try:
        return storage.join(output, f"dt={check_date(day if isinstance(day, str) else repr(day))}")
    except ValueError as exc:
        raise JobError(f"{state_uri(output)}: a partition's {exc}") from None


class NightState(dict):
    """The nightly state of an output, read with its version and written back by compare-and-swap.

    The night holds the output's lease, so a lost swap means someone wrote the state behind the
    lease's back (or took it over): the night stops rather than overwrite what it did not read. Its
    saves and its removals check the night's fence first: a night paused past its lease writes and
    removes nothing once it wakes.
    """

    def __init__(self, uri: str, data: dict[str, Any], token: str | None, fence: Fence | None = None):
        super().__init__(data)
        self.uri, self.token, self.fence = uri, token, fence

    def _check(self) -> None:
        if self.fence is not None:
            self.fence.check()

    def save(self) -> None:
        self._check()
        token = versioned.swap(self.uri, (json.dumps(self, indent=2) + "\n").encode(), self.token)
        if token is None:
            raise JobError(f"{self.uri} was changed by another writer since this night read it; nothing of "
                           "theirs was overwritten")
        self.token = token

    def remove_run(self, output: str, day: str, run_id: str) -> int:
        """Delete a run's data files and its run folder; how many data files there were."""
        self._check()
        removed = commit.remove_run(partition_uri(output, day), run_dir(output, run_id), run_id)
        storage.delete(run_dir(output, run_id))
        return removed

    def remove_manifest(self, output: str, day: str, run_id: str, manifest_index: int | None) -> int:
        """Delete one manifest's data files from a run (its units' files, found by their markers); the whole
        run's folder when nothing of it is left. ``manifest_index`` None: a run of that manifest alone."""
        if manifest_index is None:
            return self.remove_run(output, day, run_id)
        self._check()
        removed = commit.remove_manifest_units(partition_uri(output, day), run_dir(output, run_id), run_id, manifest_index)
        if not commit.read_markers(commit.markers_dir(run_dir(output, run_id), run_id)):
            self.remove_run(output, day, run_id)
        return removed


def load_state(output: str, fence: Fence | None = None) -> NightState:
    """The nightly state of an output (an empty one if there is none yet); saved and removed from under ``fence``."""
    uri = state_uri(output)
    raw, token = versioned.read_versioned(uri)
    if raw is None:
        return NightState(uri, {"format": STATE_FORMAT, "format_version": STATE_VERSION, "manifests": {}, "runs": []},
                          None, fence)
    state = storage.json_object(raw)
    if state is None or state.get("format") != STATE_FORMAT or state.get("format_version") != STATE_VERSION:
        raise JobError(f"{uri} is not an mlbatch nightly state of format version {STATE_VERSION}")
    _rename_old_keys(state)
    return NightState(uri, state, token, fence)


_KEYS_BEFORE = {"file_index": "manifest_index", "rows_per_file": "rows_per_unit"}   # an older mlbatch's names


def _rename_old_keys(state: dict[str, Any]) -> None:
    """A state an older mlbatch wrote, in today's words: its records' manifest index and unit size."""
    def values(group: Any) -> list[Any]:
        return list(group.values()) if isinstance(group, dict) else group if isinstance(group, list) else []

    table = state.get("table")
    records = [r for by_version in values(state.get("manifests")) for r in values(by_version)]
    records += values(state.get("runs")) + values(state.get("pending"))
    records += values(table.get("removals")) if isinstance(table, dict) else []
    for record in records:
        for old, new in _KEYS_BEFORE.items():
            if isinstance(record, dict) and old in record and new not in record:
                record[new] = record.pop(old)


def write_json(uri: str, data: Any) -> None:
    """Write JSON whole (``storage.write_atomic``)."""
    storage.write_atomic(uri, (json.dumps(data, indent=2, sort_keys=False) + "\n").encode())
