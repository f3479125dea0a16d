"""Nightly runs: label the manifests that arrived (or changed) since the last night, watch for drift.

    mlbatch nightly --input s3://b/incoming/ --model s3://m/current/ --output s3://b/labels/

Layout of the output (``OUT``)::

    OUT/dt=YYYY-MM-DD/<run_id>-a<attempt>-....parquet   the labeled rows: one Hive partition per night
    OUT/dt=YYYY-MM-DD/_run.json                          that night's nightly summary (drift included)
    OUT/_nightly/state.json                              which manifest was labeled by which model version
    OUT/_nightly/runs/<run_id>/                          one labeling run's _run.json, _SUCCESS, _units/
    OUT/_nightly/runs/YYYY-MM-DD.json                    the nightly summary again, next to the state

Underscore folders and files are never read as data (every Parquet engine and ``mlbatch query``
skip them), so only the ``dt=`` partitions make up the table.

How a night goes:

* Every ``*.parquet`` under ``--input`` is a manifest (files under the output are not). Its
  *fingerprint* is its size and ETag (S3, from the listing; for a multipart upload the ETag is
  not an MD5 but still changes with the content) or, locally, its size and the MD5 of its
  bytes (so touching a file is not a change).
* All the manifests a night labels go through **one** ``mlbatch.job.label`` run into
  ``OUT/dt=DATE`` (one per schema, should their columns differ), so a night of 1,000 small
  manifests pays one pipeline start-up, not 1,000. Its run id is ``night-<date>-<digest of the
  manifests' URIs and fingerprints and the model version>``. A manifest that cannot be labeled
  at all (unreadable, no URI column, no rows: seen in its footer) is left out of the run and
  reported, so it cannot fail the others.
* The bookkeeping stays per manifest: the job's units never straddle two manifests, so each
  output file, and each commit marker with its statistics, belongs to one manifest (the
  ``file_index`` of the run's plan). The job's summary has every manifest's rows, ok, errors and
  label statistics; each manifest gets its own record in the state.
* Before a run starts, the state records it as *pending* with its manifests. A crashed night is
  simply run again: completed manifests are skipped; a pending run whose manifests are unchanged
  is resumed (``resume=True``: its committed units are kept) into the partition it started in,
  so its rows stay in one partition; manifests that arrived since go into a new run.
* A manifest whose fingerprint changed since this model version labeled it is labeled again,
  and then its files in its previous run (found by their markers) are deleted, the run's other
  manifests' files untouched: every manifest row is labeled exactly once per model version, in
  the partition of the night it was (last) labeled.
* A new model version labels the manifests older versions labeled only with ``relabel``;
  without it they are counted and left alone. New manifests (and manifests whose content
  changed since an older version labeled them) are labeled by the current version either way.
* A manifest with more error rows than ``max_error_rate`` has its files removed, is reported,
  and is tried again the next night; the run failing as a whole (a stall, say) does the same for
  all its manifests. The other manifests are still recorded. The night then ends with
  ``NightlyError``.

Drift: for each label, the positive rate and the mean probability of this night's partition
(all runs of the current model version recorded for ``DATE``, pooled, weighted by their ok
rows) are compared with the same statistics pooled over the trailing ``drift_window`` nights
of the state history (nights before ``DATE`` labeled by the same model version; a new model
version starts without history). A label drifts when the absolute difference exceeds
``drift_bound``. The history is what was observed each night: relabeling a changed manifest
later does not rewrite it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
from dataclasses import dataclass, field, replace
from datetime import date as Date
from datetime import datetime, timezone
from typing import Any

from . import manifest as manifest_mod
from . import storage
from .job import DEFAULT_STALL_SECONDS, UNITS_DIR, JobError, LabelConfig, label, read_markers
from .package import PackageError, read_package
from .registry import resolve

log = logging.getLogger(__name__)

NIGHTLY_DIR = "_nightly"
STATE_FILE = "state.json"
RUNS_DIR = "runs"
PARTITION_SUMMARY = "_run.json"
STATE_FORMAT = "mlbatch-nightly-state"
STATE_VERSION = 1
METRICS = ("positive_rate", "mean_probability")
_DATE_RE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")


class NightlyError(JobError):
    """Some manifests of the night could not be labeled; ``summary`` says which and why."""

    def __init__(self, message: str, summary: dict[str, Any]):
        super().__init__(message)
        self.summary = summary


class DriftError(NightlyError):
    """The night completed, but drift was found and ``fail_on_drift`` is set."""


@dataclass
class NightlyConfig:
    """One nightly run; the CLI and ``jobs/nightly.py`` fill it from flags."""

    input: str
    model: str
    output: str
    date: str | None = None            # YYYY-MM-DD; default today (UTC)
    relabel: bool = False
    drift_window: int = 7
    drift_bound: float = 0.1
    fail_on_drift: bool = False
    # passed to every labeling run
    uri_column: str = manifest_mod.URI_COLUMN
    id_column: str | None = None
    batch_size: int = 64
    rows_per_file: int = 10_000
    concurrency: int | tuple[int, int] | None = None
    num_gpus: float | None = None
    layout: str = "auto"
    decode: str = "pil"
    thresholds: dict[str, float] = field(default_factory=dict)
    max_error_rate: float = 0.05
    max_pixels: int | None = None      # None: the labeling job's default
    stall_seconds: float = DEFAULT_STALL_SECONDS
    progress: bool = True


@dataclass(frozen=True)
class Manifest:
    uri: str
    size: int
    etag: str
    mtime_ns: int | None

    def fingerprint(self) -> dict[str, Any]:
        return {"size": self.size, "etag": self.etag}


# ---- checks --------------------------------------------------------------------------------

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


def _check_config(config: NightlyConfig) -> str:
    day = check_date(config.date)
    if config.drift_window < 1:
        raise ValueError(f"--drift-window {config.drift_window}: must be at least 1")
    if not config.drift_bound >= 0:
        raise ValueError(f"--drift-bound {config.drift_bound}: must be a number >= 0")
    return day


# ---- finding manifests ---------------------------------------------------------------------

def _path_of(uri: str) -> str:
    return storage.filesystem(uri)[1]


def find_manifests(input_uri: str, output: str, state: dict[str, Any] | None = None) -> list[Manifest]:
    """The ``*.parquet`` files under ``input_uri`` with their fingerprints, sorted; the output's own files left out.

    A local file whose size and mtime are those recorded in ``state`` keeps its recorded MD5
    instead of being read again.
    """
    out_path = _path_of(output).rstrip("/") + "/"
    entries = [e for e in storage.list_files(input_uri, suffix=".parquet")
               if not (_path_of(e.uri) + "/").startswith(out_path)]
    if storage.is_s3(input_uri):
        etags = _s3_etags(input_uri)
        return [Manifest(e.uri, e.size, etags.get(e.uri) or _s3_head_etag(e.uri), e.mtime_ns) for e in entries]
    known = (state or {}).get("manifests", {})
    out = []
    for e in entries:
        uri = _local_uri(e.uri)
        same = [r for r in known.get(uri, {}).values() if r["size"] == e.size and r.get("mtime_ns") == e.mtime_ns]
        out.append(Manifest(uri, e.size, same[0]["etag"] if same else _md5(uri), e.mtime_ns))
    return out


def _local_uri(uri: str) -> str:
    return uri if uri.startswith("file://") else os.path.abspath(uri)


def _s3_etags(input_uri: str) -> dict[str, str]:
    """ETags of every object under the input prefix, from one listing (no request per object)."""
    bucket, _, key = input_uri[len("s3://"):].partition("/")
    cut = [key.find(c) for c in "*?[" if c in key]
    prefix = key[: min(cut)] if cut else (key.rstrip("/") + "/" if key and not key.endswith(".parquet") else key)
    out = {}
    for page in storage.s3_client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for obj in page.get("Contents", []):
            out[f"s3://{bucket}/{obj['Key']}"] = obj["ETag"].strip('"')
    return out


def _s3_head_etag(uri: str) -> str:
    bucket, _, key = uri[len("s3://"):].partition("/")
    return storage.s3_client().head_object(Bucket=bucket, Key=key)["ETag"].strip('"')


def _md5(uri: str) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with open(storage.local_path(uri), "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# ---- the state -----------------------------------------------------------------------------

def state_uri(output: str) -> str:
    return storage.join(output, NIGHTLY_DIR, STATE_FILE)


def run_dir(output: str, run_id: str) -> str:
    return storage.join(output, NIGHTLY_DIR, RUNS_DIR, run_id)


def partition_uri(output: str, day: str) -> str:
    return storage.join(output, f"dt={day}")


def load_state(output: str) -> dict[str, Any]:
    """The nightly state of an output (an empty one if there is none yet)."""
    uri = state_uri(output)
    if not storage.exists(uri):
        return {"format": STATE_FORMAT, "format_version": STATE_VERSION, "manifests": {}, "runs": []}
    state = json.loads(storage.read_text(uri))
    if state.get("format") != STATE_FORMAT or state.get("format_version") != STATE_VERSION:
        raise JobError(f"{uri} is not an mlbatch nightly state of format version {STATE_VERSION}")
    return state


def _write_json(uri: str, data: Any) -> None:
    """Write JSON whole: a local file is written next to its place and renamed (S3 PUTs are atomic)."""
    text = json.dumps(data, indent=2, sort_keys=False) + "\n"
    if storage.is_s3(uri):
        storage.write_text(uri, text)
        return
    tmp = f"{uri}.tmp-{os.getpid()}"
    storage.write_text(tmp, text)
    os.replace(storage.local_path(tmp), storage.local_path(uri))


def _run_files(output: str, day: str, run_id: str) -> list[str]:
    """The data files of one run in one partition: names start with ``<run_id>-a``."""
    part = partition_uri(output, day)
    prefix = f"{run_id}-a"
    return [e.uri for e in storage.list_files(part, suffix=".parquet") if e.uri.rsplit("/", 1)[-1].startswith(prefix)]


def _remove_run(output: str, day: str, run_id: str) -> int:
    """Delete a run's data files and its run folder; how many data files there were."""
    files = _run_files(output, day, run_id)
    for uri in files:
        storage.delete(uri)
    storage.delete(run_dir(output, run_id))
    return len(files)


# ---- the night -----------------------------------------------------------------------------

@dataclass
class _Todo:
    manifest: Manifest
    reason: str                      # new | changed | relabel
    replaces: dict[str, Any] | None  # the same model version's previous record of this manifest


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def nightly(config: NightlyConfig) -> dict[str, Any]:
    """Label what is new under ``config.input`` into ``OUT/dt=DATE``, update the state, report drift.

    Returns the nightly summary (also written to ``OUT/_nightly/runs/DATE.json`` and
    ``OUT/dt=DATE/_run.json``). Raises ``NightlyError`` if a manifest could not be labeled and
    ``DriftError`` on drift with ``fail_on_drift``, both after everything is written and both
    carrying the summary.
    """
    started = time.time()
    day = _check_config(config)
    output = config.output.rstrip("/")
    if not storage.is_remote(output) and not output.startswith("file://"):
        # absolute: one spelling of each path, in the state and in the job's plans
        output = os.path.abspath(output)
    try:
        model_uri = resolve(config.model)   # once: every run of the night labels with this version
        meta, _ = read_package(model_uri)
    except PackageError as exc:
        raise JobError(str(exc)) from None
    version = meta["version"]
    unknown = sorted(set(config.thresholds) - set(meta["labels"]))
    if unknown:  # once here, rather than once per manifest
        raise JobError(f"--threshold {unknown[0]}: {unknown[0]!r} is not a label of the model "
                       f"({', '.join(meta['labels'])})")
    state = load_state(output)
    found = find_manifests(config.input, output, state)
    log.info("nightly %s: %d manifests under %s, model %s %s", day, len(found), config.input, meta["name"], version)
    if not found:
        log.warning("nightly %s: no *.parquet manifests under %s", day, config.input)

    todo: list[_Todo] = []
    unchanged: list[str] = []
    older: list[str] = []
    for m in found:
        records = state["manifests"].get(m.uri, {})
        mine = records.get(version)
        same = [v for v, r in records.items() if r["size"] == m.size and r["etag"] == m.etag]
        if mine is not None and version in same:
            unchanged.append(m.uri)
        elif mine is not None:
            todo.append(_Todo(m, "changed", mine))
        elif same and not config.relabel:
            older.append(m.uri)
        elif same:
            todo.append(_Todo(m, "relabel", None))
        else:  # never labeled, or its content changed since an older version labeled it
            todo.append(_Todo(m, "new" if not records else "changed", None))
    present = {m.uri for m in found}
    missing = sorted(u for u in state["manifests"] if u not in present)
    if older:
        log.warning("%d manifests were labeled by an older model version and are left alone "
                    "(pass --relabel to label them with %s)", len(older), version)

    labeled: list[dict[str, Any]] = []
    failed: list[dict[str, Any]] = []
    for run_id, run_day, jobs, resume, rows_per_file in _group_runs(config, output, day, version, todo, state, failed):
        labeled += _label_run(replace(config, model=model_uri, rows_per_file=rows_per_file), output, run_day, meta,
                              run_id, jobs, resume, state, failed)

    night = _night(state, day, version)
    drift = _drift(state, day, version, night, config.drift_window, config.drift_bound)
    wall = time.time() - started
    summary = {
        "date": day,
        "status": "failed" if failed else "complete",
        "input": config.input,
        "output": output,
        "partition": partition_uri(output, day),
        "model": {"uri": config.model, "resolved_uri": model_uri, "name": meta["name"], "version": version},
        "manifests_found": len(found),
        "labeled": labeled,
        "failed": failed,
        "unchanged": len(unchanged),
        "older_version": {"count": len(older), "relabel": config.relabel, "manifests": older},
        "missing": missing,
        "night": night,
        "drift": drift,
        "wall_seconds": round(wall, 2),
        "finished_at": _now(),
    }
    _write_json(storage.join(output, NIGHTLY_DIR, RUNS_DIR, f"{day}.json"), summary)
    _write_json(storage.join(partition_uri(output, day), PARTITION_SUMMARY), summary)
    if failed:
        raise NightlyError(f"nightly {day}: {len(failed)} of {len(todo)} manifests could not be labeled: "
                           + "; ".join(f"{f['manifest']}: {f['error']}" for f in failed[:3]), summary)
    if drift["status"] == "drift" and config.fail_on_drift:
        raise DriftError(f"nightly {day}: drift beyond {config.drift_bound} in "
                         + ", ".join(f"{d['label']} {d['metric']} ({d['difference']:+.3f})" for d in drift["drifted"]),
                         summary)
    return summary


def _manifest_problem(m: Manifest, config: NightlyConfig) -> tuple[str | None, Any]:
    """Why a manifest cannot be labeled, from its footer alone (None if it can), and its schema."""
    try:
        footer = manifest_mod.read_footer(m.uri)
        schema = footer.schema.to_arrow_schema().remove_metadata()
        manifest_mod.check_uri_column(m.uri, schema, config.uri_column)
        if config.id_column and config.id_column not in schema.names:
            raise manifest_mod.ManifestError(f"manifest {m.uri}: no id column {config.id_column!r}")
        if footer.num_rows == 0:
            raise manifest_mod.ManifestError(f"manifest {m.uri}: has no rows")
    except manifest_mod.ManifestError as exc:
        return str(exc), None
    return None, schema


def night_run_id(day: str, manifests: list[Manifest], model_version: str) -> str:
    """``night-<date>-<digest>``: deterministic from the night's manifests (URIs, fingerprints) and the model version."""
    text = json.dumps({"manifests": [[m.uri, m.size, m.etag] for m in manifests], "model": model_version},
                      sort_keys=True)
    return f"night-{day}-{hashlib.sha256(text.encode()).hexdigest()[:12]}"


def _group_runs(config: NightlyConfig, output: str, day: str, version: str, todo: list[_Todo],
                state: dict[str, Any], failed: list[dict[str, Any]]) -> list[tuple[str, str, list[_Todo], bool, int]]:
    """The night's labeling runs: first any run a crash left unfinished (resumed with its own manifests, in
    its own partition and with its own unit size), then one run for everything else (one per schema, if
    the manifests differ).

    A manifest that cannot be labeled at all (unreadable, no URI column, no rows) is reported failed here,
    so it cannot fail the others' run.
    """
    runs = []
    left = {job.manifest.uri: job for job in todo}
    for run_id, pending in list(state.get("pending", {}).items()):
        if pending["model_version"] != version:
            continue
        same = [left[u] for u, fp in pending["manifests"].items()
                if u in left and left[u].manifest.fingerprint() == fp]
        if same and len(same) == len(pending["manifests"]):
            runs.append((run_id, pending["dt"], same, True, pending["rows_per_file"]))
            for job in same:
                del left[job.manifest.uri]
        else:  # its manifests changed or went since: its rows are not wanted
            _remove_run(output, pending["dt"], run_id)
            del state["pending"][run_id]
    by_schema: dict[str, list[_Todo]] = {}
    for job in left.values():
        problem, schema = _manifest_problem(job.manifest, config)
        if problem is not None:
            log.error("nightly %s: %s cannot be labeled: %s", day, job.manifest.uri, problem)
            failed.append({"manifest": job.manifest.uri, "run_id": None, "error": problem})
            continue
        by_schema.setdefault(schema.to_string(), []).append(job)
    for jobs in by_schema.values():
        runs.append((night_run_id(day, [j.manifest for j in jobs], version), day, jobs, False, config.rows_per_file))
    return runs


def _label_run(config: NightlyConfig, output: str, day: str, meta: dict[str, Any], run_id: str, jobs: list[_Todo],
               resume: bool, state: dict[str, Any], failed: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Label the night's manifests in one run (or resume it), then record each manifest; returns what was done."""
    rdir = run_dir(output, run_id)
    state.setdefault("pending", {})[run_id] = {
        "dt": day, "model_version": meta["version"], "rows_per_file": config.rows_per_file, "started_at": _now(),
        "manifests": {j.manifest.uri: j.manifest.fingerprint() for j in jobs}}
    _write_json(state_uri(output), state)      # a crash from here on is resumed by the next night
    if resume:
        log.info("nightly %s: resuming run %s of %d manifests (partition dt=%s)", day, run_id, len(jobs), day)
    base = LabelConfig(
        manifests=[j.manifest.uri for j in jobs], model=config.model, output=partition_uri(output, day),
        uri_column=config.uri_column, id_column=config.id_column, batch_size=config.batch_size,
        rows_per_file=config.rows_per_file, concurrency=config.concurrency, num_gpus=config.num_gpus,
        layout=config.layout, decode=config.decode,
        thresholds=dict(config.thresholds), max_error_rate=1.0, run_id=run_id, resume=resume,
        progress=config.progress, stall_seconds=config.stall_seconds, state_dir=rdir,
        extra_summary={"nightly": {"date": day, "manifests": [{"manifest": j.manifest.uri, **j.manifest.fingerprint(),
                                                                "reason": j.reason} for j in jobs]}},
        **({"max_pixels": config.max_pixels} if config.max_pixels is not None else {}))
    try:
        summary = label(base)
    except (JobError, manifest_mod.ManifestError) as exc:
        _remove_run(output, day, run_id)   # no half output of a failed run; its manifests are tried afresh next night
        del state["pending"][run_id]
        _write_json(state_uri(output), state)
        for job in jobs:
            log.error("nightly %s: %s failed: %s", day, job.manifest.uri, exc)
            failed.append({"manifest": job.manifest.uri, "run_id": run_id, "error": str(exc)})
        return []

    per_manifest = {m["manifest"]: (i, m) for i, m in enumerate(summary["per_manifest"])}
    done = []
    for job in jobs:
        m = job.manifest
        index, stats = per_manifest[m.uri]
        rate = stats["errors"] / stats["rows"] if stats["rows"] else 0.0
        if rate > config.max_error_rate:  # this manifest's rows go; the others' stay
            _remove_manifest(output, day, run_id, index)
            error = (f"{stats['errors']} of {stats['rows']} rows are errors ({rate:.1%}), above --max-error-rate "
                     f"{config.max_error_rate:.1%}")
            log.error("nightly %s: %s failed: %s", day, m.uri, error)
            failed.append({"manifest": m.uri, "run_id": run_id, "error": error})
            continue
        removed = 0
        if job.replaces is not None and job.replaces["run_id"] != run_id:
            removed = _remove_manifest(output, job.replaces["dt"], job.replaces["run_id"], job.replaces.get("file_index"))
            log.info("nightly %s: %s changed; removed %d files of its previous run %s (dt=%s)", day, m.uri, removed,
                     job.replaces["run_id"], job.replaces["dt"])
        labeled_at = summary.get("finished_at") or _now()
        record = {"run_id": run_id, "manifest": m.uri, "file_index": index, "dt": day, "reason": job.reason,
                  "model_name": meta["name"], "model_version": meta["version"], **m.fingerprint(),
                  "rows": stats["rows"], "ok": stats["ok"], "errors": stats["errors"],
                  "labels": {k: {x: v.get(x) for x in (*METRICS, "threshold")} for k, v in stats["labels"].items()},
                  "attempts": summary.get("attempts", 1), "replaces": job.replaces["run_id"] if job.replaces else None,
                  "finished_at": labeled_at}
        for old in state["runs"]:
            if (job.replaces is not None and old["run_id"] == job.replaces["run_id"] and old["manifest"] == m.uri
                    and not old.get("superseded_by")):
                old["superseded_by"] = run_id
        state["runs"].append(record)
        state["manifests"].setdefault(m.uri, {})[meta["version"]] = {
            **m.fingerprint(), "mtime_ns": m.mtime_ns, "run_id": run_id, "file_index": index, "dt": day,
            "rows": stats["rows"], "labeled_at": labeled_at}
        done.append({"manifest": m.uri, "run_id": run_id, "dt": day, "reason": job.reason, "resumed": resume,
                     "attempts": record["attempts"], "rows": record["rows"], "ok": record["ok"],
                     "errors": record["errors"], "replaced_run": record["replaces"], "removed_files": removed})
    del state["pending"][run_id]
    state["updated_at"] = _now()
    _write_json(state_uri(output), state)
    return done


def _remove_manifest(output: str, day: str, run_id: str, file_index: int | None) -> int:
    """Delete one manifest's data files from a run (its units' files, found by their markers); the whole
    run's folder when nothing of it is left. ``file_index`` None: a run of that manifest alone."""
    markers = storage.join(run_dir(output, run_id), UNITS_DIR, run_id)
    if file_index is None:
        return _remove_run(output, day, run_id)
    mine = [m for m in read_markers(markers) if m["file_index"] == file_index]
    for m in mine:   # the marker first: a crash in between leaves a file no marker counts
        storage.delete(storage.join(markers, m["file"][: -len(".parquet")] + ".json"))
        storage.delete(storage.join(partition_uri(output, day), m["file"]))
    if not read_markers(markers):
        _remove_run(output, day, run_id)
    return len(mine)


# ---- drift ---------------------------------------------------------------------------------

def _pool(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Rows, ok, errors and per-label statistics of runs pooled, each run weighted by its ok rows."""
    labels: dict[str, dict[str, float | None]] = {}
    names = [name for r in runs for name in r["labels"]]
    for name in dict.fromkeys(names):
        stats = {}
        for metric in METRICS:
            pairs = [(r["labels"][name][metric], r["ok"]) for r in runs
                     if name in r["labels"] and r["labels"][name].get(metric) is not None and r["ok"]]
            weight = sum(w for _, w in pairs)
            stats[metric] = round(sum(v * w for v, w in pairs) / weight, 6) if weight else None
        labels[name] = stats
    return {"runs": len(runs), "rows": sum(r["rows"] for r in runs), "ok": sum(r["ok"] for r in runs),
            "errors": sum(r["errors"] for r in runs), "labels": labels}


def _runs_of(state: dict[str, Any], day: str, version: str) -> list[dict[str, Any]]:
    return [r for r in state["runs"] if r["dt"] == day and r["model_version"] == version]


def _night(state: dict[str, Any], day: str, version: str) -> dict[str, Any]:
    """Every run of the current model version recorded for this night (so a second run that night sees them)."""
    runs = _runs_of(state, day, version)
    return {"run_ids": [r["run_id"] for r in runs], **_pool(runs)}


def _drift(state: dict[str, Any], day: str, version: str, night: dict[str, Any], window: int,
           bound: float) -> dict[str, Any]:
    out: dict[str, Any] = {"window": window, "bound": bound, "model_version": version, "compared_with": [],
                           "history": [], "trailing": None, "labels": {}, "drifted": []}
    nights = sorted({r["dt"] for r in state["runs"] if r["model_version"] == version and r["dt"] < day})[-window:]
    if not night["ok"]:
        out.update(status="nothing-labeled", message=f"no rows of model version {version} were labeled for {day}: "
                                                     "nothing to compare")
        return out
    if not nights:
        out.update(status="no-history", message=f"no earlier nights of model version {version} in the history: "
                                                 "nothing to compare with yet")
        return out
    history = [{"date": d, **_pool(_runs_of(state, d, version))} for d in nights]
    trailing = _pool([r for d in nights for r in _runs_of(state, d, version)])
    out.update(compared_with=nights, history=history, trailing=trailing)
    for name, stats in night["labels"].items():
        entry = {}
        for metric in METRICS:
            now, before = stats.get(metric), trailing["labels"].get(name, {}).get(metric)
            diff = None if now is None or before is None else round(now - before, 6)
            drifted = diff is not None and abs(diff) > bound
            entry[metric] = {"tonight": now, "trailing": before, "difference": diff, "drifted": drifted}
            if drifted:
                out["drifted"].append({"label": name, "metric": metric, "tonight": now, "trailing": before,
                                       "difference": diff})
        out["labels"][name] = entry
    out["status"] = "drift" if out["drifted"] else "ok"
    span = f"the trailing {len(nights)} night{'s' if len(nights) > 1 else ''} ({nights[0]} to {nights[-1]})"
    out["message"] = (f"{len(out['drifted'])} label statistics moved more than {bound} from {span}"
                      if out["drifted"] else f"every label within {bound} of {span}")
    return out


# ---- the console ---------------------------------------------------------------------------

def _short(uri: str, width: int = 48) -> str:
    return uri if len(uri) <= width else "..." + uri[-(width - 3):]


def nightly_table(summary: dict[str, Any]) -> str:
    """A short plain-text report of a nightly summary, for the console."""
    s, d = summary, summary["drift"]
    reasons: dict[str, int] = {}
    for item in s["labeled"]:
        reasons[item["reason"]] = reasons.get(item["reason"], 0) + 1
    why = ", ".join(f"{n} {r}" for r, n in sorted(reasons.items()))
    lines = [f"nightly {s['date']}: {s['status']}  ->  {s['partition']}",
             f"model {s['model']['name']} {s['model']['version']};  {s['manifests_found']} manifests under the input: "
             f"{len(s['labeled'])} labeled{f' ({why})' if why else ''}, {s['unchanged']} already labeled, "
             f"{len(s['failed'])} failed"]
    for item in s["labeled"]:
        extra = " resumed" if item["resumed"] else ""
        if item["replaced_run"]:
            extra += f" replaces {item['replaced_run']} ({item['removed_files']} files removed)"
        lines.append(f"  {item['reason']:<8} {_short(item['manifest']):<48} {item['rows']:>7} rows "
                     f"{item['errors']:>5} errors  dt={item['dt']}{extra}")
    for item in s["failed"]:
        lines.append(f"  FAILED   {_short(item['manifest'])}: {item['error']}")
    older = s["older_version"]
    if older["count"]:
        lines.append(f"{older['count']} manifests were labeled by an older model version and are left alone "
                     "(--relabel labels them with this one)")
    if s["missing"]:
        lines.append(f"{len(s['missing'])} manifests in the state are no longer under the input (their rows are kept)")
    night = s["night"]
    lines.append(f"night {s['date']}: {night['runs']} runs, {night['rows']} rows ({night['errors']} errors)")
    lines.append(f"drift ({d['status']}): {d['message']}")
    if d["labels"]:
        head = f"{'trailing':>10}{'diff':>8}"
        lines.append(f"  {'label':<16}{'pos rate':>9}{head}   {'mean prob':>9}{head}")
        for name, entry in d["labels"].items():
            cells = []
            for metric in METRICS:
                e = entry[metric]
                cells.append(f"{_num(e['tonight']):>9}{_num(e['trailing']):>10}{_num(e['difference'], True):>8}"
                             f"{' *' if e['drifted'] else '  '}")
            lines.append(f"  {name:<16}{cells[0]} {cells[1]}")
        if d["drifted"]:
            lines.append(f"  * beyond the bound {d['bound']} (trailing nights: {', '.join(d['compared_with'])})")
    return "\n".join(lines)


def _num(value: float | None, signed: bool = False) -> str:
    if value is None:
        return "n/a"
    value = round(value, 3) + 0.0  # no "-0.000"
    return f"{value:+.3f}" if signed else f"{value:.3f}"
