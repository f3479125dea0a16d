"""The commit protocol of a run: data file names, commit markers, their listing and removal. The one owner.

    OUTPUT/<run_id>-a<epoch>-f<manifest index>-r<unit start>-r<first row>.parquet   a unit's rows: a data file
    STATE/_units/<run_id>/<the same name>.json       its commit marker: the data file's statistics
    STATE/_units/<run_id>/_plan.json                 what a resume must share with the units it keeps
    STATE/_run.json, STATE/_SUCCESS                  written last, by ``summary``

A marker is written only after its data file is whole (``storage.write_atomic``), so it *is* the commit; a unit
is done when its committed rows are exactly its rows (``stats.whole``). The names are fixed by the unit and its
first row, so a retried task writes the same names again; the attempt in the name is the lease epoch the
attempt took, so two attempts never share a name. ``prepare`` starts or resumes a run from these (a resume
lists the markers, O(units)). Nightly uses these functions too and never builds a path itself.
"""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import os
import re
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Iterator

import pyarrow as pa

from ..core import storage
from ..core.lease import Fence, Lease, LeaseHeld, LeaseLost
from .config import JobError, LabelConfig, OutputBusy
from .plan import Plan, absolute
from .stats import Stats

log = logging.getLogger(__name__)

SUMMARY_FILE = "_run.json"
SUCCESS_FILE = "_SUCCESS"
UNITS_DIR = "_units"          # STATE/_units/<run_id>/: the commit markers and the plan of a run
PLAN_FILE = "_plan.json"
_UNIT = r"f\d{6}-r\d{12}"
_MARKER_IDS = ("data_file", "unit", "manifest_index", "attempt")   # a marker: these, then the unit's Stats
_MARKER_IDS_BEFORE = {"file": "data_file", "file_index": "manifest_index"}   # an older mlbatch's names, still read


def unit_id(manifest_index: int, start: int) -> str:
    """The name of a unit of work: its manifest index (``f``) and first row."""
    return f"f{manifest_index:06d}-r{start:012d}"


def data_file_name(run_id: str, attempt: int, unit: str, first_row: int) -> str:
    """The name of the data file one attempt writes for (the rows from ``first_row`` of) a unit."""
    return f"{run_id}-a{attempt:03d}-{unit}-r{first_row:012d}.parquet"


def _parse(name: str, run_id: str) -> re.Match | None:
    return re.fullmatch(re.escape(run_id) + rf"-a(\d+)-({_UNIT})-r\d{{12}}\.parquet", name)


def attempt_of(uri: str, run_id: str) -> int:
    """The attempt that wrote a data file of ``run_id`` (-1 for a name that is not one)."""
    m = _parse(uri.rsplit("/", 1)[-1], run_id)
    return int(m.group(1)) if m else -1


def output_dirs(config: LabelConfig) -> tuple[str, str]:
    """Where a run writes its data files, and where its state (_run.json, _SUCCESS, _units) goes."""
    output = absolute(config.output)
    return output, absolute(config.state_dir) if config.state_dir else output


def markers_dir(state: str, run_id: str) -> str:
    """The folder of a run's commit markers (and its plan record)."""
    return storage.join(state, UNITS_DIR, run_id)


def marker_uri(markers: str, data_file: str) -> str:
    """The commit marker of a data file (given by name)."""
    return storage.join(markers, data_file[: -len(".parquet")] + ".json")


def run_files(output: str, run_id: str) -> list[str]:
    """The data files of a run directly under ``output``: their names parse as this run's, exactly."""
    if not storage.exists(output):
        return []
    base = output.rstrip("/") + "/"
    return [e.uri for e in storage.list_files(output, suffix=".parquet")
            if e.uri.startswith(base) and "/" not in e.uri[len(base):] and _parse(e.uri[len(base):], run_id)]


def read_markers(markers: str) -> list[dict[str, Any]]:
    """Every commit marker of a run (one small JSON per committed data file)."""
    if not storage.exists(markers):
        return []
    uris = [e.uri for e in storage.list_files(markers, suffix=".json")]
    with ThreadPoolExecutor(max_workers=32) as pool:
        return list(pool.map(_read_marker, uris))


def _read_marker(uri: str) -> dict[str, Any]:
    """One commit marker, as untrusted input. One that does not parse is read once more (a short read under
    load), then refused by name: a guess could double or drop rows. Its ``file`` is joined onto the output and
    deleted, so it must be its own (``_units/<run>/<name>.json`` vouches for ``<name>.parquet`` only)."""
    marker = _marker(storage.read_bytes(uri)) or _marker(raw := storage.read_bytes(uri))
    redo = "Delete it and rerun with --resume: its unit is labeled again"
    if marker is None:
        raise JobError(f"commit marker {uri} is not a marker ({len(raw)} bytes, not a JSON object of a data file's "
                       "name, unit, manifest index, attempt and statistics): mlbatch writes markers whole, so it was "
                       f"cut or made by something else. {redo}")
    folder, _, name = uri.rpartition("/")
    if marker["data_file"] != (own := name[: -len(".json")] + ".parquet") or not _parse(own, folder.rsplit("/", 1)[-1]):
        raise JobError(f"commit marker {uri} names the data file {str(marker['data_file'])[:200]!r}, not its own "
                       f"({own!r}): made by something else; nothing was deleted. {redo}")
    return marker


def marker_text(data_file: str, unit: str, manifest_index: int, attempt: int, stats: Stats) -> str:
    """The commit marker of a data file (given by name): what it is, and its rows' statistics."""
    return json.dumps({**dict(zip(_MARKER_IDS, (data_file, unit, manifest_index, attempt))), **stats.to_dict()})


def _marker(raw: bytes) -> dict[str, Any] | None:
    marker = storage.json_object(raw)
    for old, new in _MARKER_IDS_BEFORE.items():   # a run an older mlbatch started, resumed
        if isinstance(marker, dict) and old in marker and new not in marker:
            marker[new] = marker.pop(old)
    try:
        return marker if all(k in marker for k in _MARKER_IDS) and Stats.from_dict(marker) else None
    except (KeyError, TypeError):   # not an object (None), or not a marker's fields
        return None


def remove_run(output: str, state: str, run_id: str) -> int:
    """Delete a run's data files and its markers; how many data files there were.

    What vouches for the run goes first: its ``_SUCCESS`` and summary (when they are this run's), then its
    plan record, so that a crash part way leaves a run no ``--resume`` accepts as done or resumes (no
    marker can then vouch for a data file already deleted); its leftovers go with the next fresh run.
    """
    markers = markers_dir(state, run_id)
    summary = storage.join(state, SUMMARY_FILE)
    if storage.exists(summary) and (storage.json_object(storage.read_bytes(summary)) or {}).get("run_id") == run_id:
        storage.delete(storage.join(state, SUCCESS_FILE))
        storage.delete(summary)
    storage.delete(storage.join(markers, PLAN_FILE))
    files = run_files(output, run_id)
    for uri in files:
        storage.delete(uri)
    storage.delete(markers)
    return len(files)


def manifest_data_files(output: str, state: str, run_id: str, manifest_index: int) -> list[str]:
    """The data files of one manifest (by its ``manifest_index``) of a run, found by their markers."""
    return [storage.join(output, m["data_file"]) for m in read_markers(markers_dir(state, run_id))
            if m["manifest_index"] == manifest_index]


def remove_manifest_units(output: str, state: str, run_id: str, manifest_index: int) -> int:
    """Delete the data files (and markers) of one manifest of a completed run, found by their markers; the count.
    Only for a run that will not be resumed: its markers no longer vouch for rows once its data go."""
    markers = markers_dir(state, run_id)
    mine = manifest_data_files(output, state, run_id, manifest_index)
    for uri in mine:   # the data first: a crash in between leaves a marker of a gone file, which a redo removes
        storage.delete(uri)
    for uri in mine:
        storage.delete(marker_uri(markers, uri.rsplit("/", 1)[-1]))
    return len(mine)


def sweep_unmarked(output: str, state: str, run_id: str) -> int:
    """Delete the data files of a run that no commit marker names (a crash between writing the two)."""
    marked = {m["data_file"] for m in read_markers(markers_dir(state, run_id))}
    stale = [u for u in run_files(output, run_id) if u.rsplit("/", 1)[-1] not in marked]
    for uri in stale:
        storage.delete(uri)
    return len(stale)


def drop_late_commits(run: "Run") -> int:
    """Remove the commits an earlier attempt made of units this attempt labeled itself; return how many.

    On Ray the actors of a killed driver can finish a unit seconds after it died, after a resume has
    listed the commits but before its fence check failed: the resume labels that unit too. Before the run
    is called whole, the late copy goes (its marker first, then its data file), so each unit's rows are in
    the output once. The units the resume kept are not touched.
    """
    if run.attempts == 1:
        return 0
    redone = {unit_id(f, a) for f, a, _ in run.todo}
    late = [m for m in read_markers(run.markers)
            if m["unit"] in redone and attempt_of(m["data_file"], run.plan.run_id) < run.attempt]
    for m in late:
        storage.delete(marker_uri(run.markers, m["data_file"]))
        storage.delete(storage.join(run.output, m["data_file"]))
    if late:
        log.warning("removed %d commits of units this attempt labeled itself, made by an earlier attempt's workers "
                    "after this one began (a killed run's actors finishing late): %s", len(late), late[0]["data_file"])
    return len(late)


def check_writable(output: str) -> None:
    """Fail before any compute if the output cannot be written."""
    probe = storage.join(output, f"_mlbatch_probe_{os.getpid()}_{int(time.time() * 1000)}")
    try:
        storage.write_bytes(probe, b"ok")
        storage.delete(probe)
    except (OSError, ValueError) as exc:
        raise JobError(f"output {output} is not writable: {exc}") from None


@dataclass
class Run:
    """One attempt of a run: where it writes, what earlier attempts committed, what is left to label."""

    config: LabelConfig
    plan: Plan
    output: str
    state: str
    markers: str
    fence: Fence                            # the lease this attempt took; its epoch is in its data files' names
    done: dict[str, Stats]                  # unit -> what is committed of it, earlier attempts and this one
    manifest_stats: list[Stats]             # per manifest
    total: Stats                            # the whole run
    todo: list[tuple[int, int, int]]
    files_written: int = 0
    attempts: int = 1                       # how many attempts the run has had, this one included
    predictor: str = ""                     # where its predictors compute: device and precision ("cuda fp16")

    @property
    def attempt(self) -> int:
        """This attempt's number in its data files' names: the lease epoch it took (increasing per output)."""
        return self.fence.epoch

    def add_markers(self, markers: pa.Table) -> None:
        """Count the commit markers the write stage returned (``unit``, ``manifest_index``, ``marker``) into the run."""
        for unit, manifest_index, text in zip(*(markers.column(c).to_pylist() for c in ("unit", "manifest_index", "marker"))):
            stats = Stats.from_dict(json.loads(text))
            self.done.setdefault(unit, Stats()).add(stats, keep=0)
            self.manifest_stats[manifest_index].add(stats)
            self.total.add(stats)
            self.files_written += 1


@dataclass(frozen=True)
class Foreign:
    """A data file directly under the output that is not this run's, and the run that wrote it."""

    uri: str
    run_id: str | None      # None: no run's data file name fits it

    @property
    def writer(self) -> str:
        """Who wrote it, in words: ``run <id>``, or ``file <name>``."""
        return f"run {self.run_id}" if self.run_id else f"file {self.uri.rsplit('/', 1)[-1]}"


def foreign_files(output: str, run_id: str) -> list[Foreign]:
    """The data files directly under ``output`` that are not this run's (what ``--mode overwrite`` replaces)."""
    if not storage.exists(output):
        return []
    base = output.rstrip("/") + "/"
    out = []
    for e in storage.list_files(output, suffix=".parquet"):
        name = e.uri[len(base):] if e.uri.startswith(base) else e.uri
        if "/" in name or _parse(name, run_id):
            continue
        m = re.fullmatch(rf"(.+)-a\d+-{_UNIT}-r\d{{12}}\.parquet", name)
        out.append(Foreign(e.uri, m.group(1) if m else None))
    return out


def other_runs(output: str, run_id: str) -> dict[str, int]:
    """How many data files under ``output`` each other run (or stray file) holds, by who wrote them in words."""
    return dict(collections.Counter(f.writer for f in foreign_files(output, run_id)))


def remove_other_runs(output: str, state: str, run_id: str) -> int:
    """Delete every data file under ``output`` that is not this run's (``--mode overwrite``), and their markers."""
    foreign = foreign_files(output, run_id)
    removed = 0
    for other in sorted({f.run_id for f in foreign if f.run_id}):
        removed += remove_run(output, state, other)
    for f in foreign:
        if f.run_id is None:
            storage.delete(f.uri)
            removed += 1
    return removed


@contextlib.contextmanager
def holding(folder: str, run_id: str, ttl: float) -> Iterator[Lease]:
    """The output's lease for the run, in mlbatch's errors: ``OutputBusy`` if another live run holds it."""
    try:
        lease = Lease(folder, run_id, ttl).acquire()
    except LeaseHeld as exc:
        raise OutputBusy(str(exc)) from None
    try:
        yield lease
    except LeaseLost as exc:
        raise JobError(str(exc)) from None
    finally:
        lease.release()
