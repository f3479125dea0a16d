"""Nightly runs: label the manifests that arrived (or changed) since the last night, watch for drift.

    mlbatch nightly --input s3://b/incoming/ --model s3://m/current/ --output s3://b/labels/

How a night goes:

* Every ``*.parquet`` under ``--input`` is a manifest (files under the output are not). Its
  *fingerprint* is its size and ETag (S3, from the listing; for a multipart upload the ETag is
  not an MD5 but still changes with the content) or, locally, its size and the MD5 of its
  bytes (so touching a file is not a change).
* All the manifests a night labels go through **one** ``mlbatch.label.label`` run into
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

See ``state`` for where things live and ``drift`` for the drift watch.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from typing import Any

from ..core import iceberg, storage
from ..core import manifest as manifest_mod
from ..core.lease import Fence
from ..label import commit
from ..label.config import JobError, LabelConfig, options_of
from ..label.job import label
from ..label.plan import check_footer, resolve_model
from .config import DriftError, NightlyConfig, NightlyError, check_config
from .discover import Manifest, find_manifests
from .drift import METRICS, drift, night_stats
from .publish import journal, publish, settle
from .state import NIGHTLY_DIR, PARTITION_SUMMARY, RUNS_DIR, NightState, load_state, partition_uri, run_dir, write_json

log = logging.getLogger(__name__)


@dataclass
class _Todo:
    manifest: Manifest
    reason: str                      # new | changed | relabel
    replaces: dict[str, Any] | None  # the same model version's previous record of this manifest


def _abandon(before: NightState, output: str, day: str, run_id: str) -> NightState:
    """A run whose recording failed part way: the state as last saved, without the run, whose files go (its
    manifests are labeled again next night). A save whose answer was lost may have landed: a run that the
    reloaded state records is kept, never removed. If even that fails, the next night finds the run pending."""
    state = load_state(output, before.fence)
    if any(r.get("run_id") == run_id for r in state["runs"]):
        log.warning("nightly %s: run %s is recorded in the state after all: kept", day, run_id)
        return state
    try:
        state.remove_run(output, day, run_id)
        state.get("pending", {}).pop(run_id, None)
        state.save()
    except Exception as exc:
        log.error("nightly %s: could not remove run %s after its failure: %s", day, run_id, exc)
    return state


def _reason(exc: BaseException) -> str:
    """An error as a manifest's reason: mlbatch's own say what happened; others also say what they are."""
    if isinstance(exc, (JobError, manifest_mod.ManifestError)):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"


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
    day = check_config(config)
    output = config.output.rstrip("/")
    if not storage.is_remote(output) and not output.startswith("file://"):
        # absolute: one spelling of each path, in the state and in the job's plans
        output = os.path.abspath(output)
    model_uri, meta, _ = resolve_model(config.model, config.thresholds)  # once, for every run of the night
    with commit.holding(output, f"nightly-{day}", config.lease_seconds) as lease:   # one night at a time
        return _night(config, day, output, model_uri, meta, started, lease.fence)


def _night(config: NightlyConfig, day: str, output: str, model_uri: str, meta: dict[str, Any],
           started: float, fence: Fence) -> dict[str, Any]:
    """The night itself, under the output's lease: find, group into runs, label, record, watch drift."""
    version = meta["version"]
    storage.sweep_temporaries(storage.join(output, NIGHTLY_DIR))   # of a night killed mid-write
    state = load_state(output, fence)
    if config.table:
        try:
            settle(config, output, state)
        except iceberg.TableError as exc:
            raise JobError(str(exc)) from None
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
        try:
            labeled += _label_run(replace(config, model=model_uri, rows_per_file=rows_per_file), output, run_day,
                                  meta, run_id, jobs, resume, state, failed)
        except Exception as exc:   # recording the run failed (the state, S3): its manifests are retried next night
            state = _abandon(state, output, run_day, run_id)
            recorded = {f["manifest"] for f in failed}
            for job in jobs:
                if job.manifest.uri not in recorded:
                    log.error("nightly %s: %s failed: %s", day, job.manifest.uri, _reason(exc))
                    failed.append({"manifest": job.manifest.uri, "run_id": run_id, "error": _reason(exc)})

    table = None
    if config.table:   # the whole night in one snapshot; on failure its journal waits for the next night
        try:
            table = publish(config, day, output, state, version)
        except Exception as exc:
            log.error("nightly %s: the commit to table %s failed: %s", day, config.table, _reason(exc))
            table = {"identifier": config.table, "catalog": config.catalog, "error": _reason(exc)}
    night = night_stats(state, day, version)
    watch = drift(state, day, version, night, config.drift_window, config.drift_bound)
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
        "table": table,
        "night": night,
        "drift": watch,
        "wall_seconds": round(wall, 2),
        "finished_at": _now(),
    }
    write_json(storage.join(output, NIGHTLY_DIR, RUNS_DIR, f"{day}.json"), summary)
    write_json(storage.join(partition_uri(output, day), PARTITION_SUMMARY), summary)
    if failed:
        raise NightlyError(f"nightly {day}: {len(failed)} of {len(todo)} manifests could not be labeled: "
                           + "; ".join(f"{f['manifest']}: {f['error']}" for f in failed[:3]), summary)
    if table is not None and "error" in table:
        raise NightlyError(f"nightly {day}: its runs are labeled and recorded, but not committed to table "
                           f"{config.table} ({table['error']}); the next night commits them", summary)
    if watch["status"] == "drift" and config.fail_on_drift:
        raise DriftError(f"nightly {day}: drift beyond {config.drift_bound} in "
                         + ", ".join(f"{d['label']} {d['metric']} ({d['difference']:+.3f})" for d in watch["drifted"]),
                         summary)
    return summary


def _manifest_problem(m: Manifest, config: NightlyConfig) -> tuple[str | None, Any]:
    """Why a manifest cannot be labeled, from its footer alone (None if it can), and its schema."""
    try:
        return None, check_footer(m.uri, manifest_mod.read_footer(m.uri), config.uri_column, config.id_column)
    except manifest_mod.ManifestError as exc:
        return str(exc), None


def night_run_id(day: str, manifests: list[Manifest], model_version: str) -> str:
    """``night-<date>-<digest>``: deterministic from the night's manifests (URIs, fingerprints) and the model version."""
    text = json.dumps({"manifests": [[m.uri, m.size, m.etag] for m in manifests], "model": model_version},
                      sort_keys=True)
    return f"night-{day}-{hashlib.sha256(text.encode()).hexdigest()[:12]}"


def _group_runs(config: NightlyConfig, output: str, day: str, version: str, todo: list[_Todo],
                state: NightState, failed: list[dict[str, Any]]) -> list[tuple[str, str, list[_Todo], bool, int]]:
    """The night's labeling runs: first any run a crash left unfinished (resumed with its own manifests, in
    its own partition and with its own unit size), then one run for everything else (one per schema, if
    the manifests differ).

    A manifest that cannot be labeled at all (unreadable, no URI column, no rows) is reported failed here,
    so it cannot fail the others' run.
    """
    runs = []
    left = {job.manifest.uri: job for job in todo}
    for run_id, pending in list(state.get("pending", {}).items()):
        if pending["model_version"] != version:   # its model is no longer the one: its rows go, the manifests
            state.remove_run(output, pending["dt"], run_id)  # are labeled by this version (new, or --relabel)
            del state["pending"][run_id]
            continue
        same = [left[u] for u, fp in pending["manifests"].items()
                if u in left and left[u].manifest.fingerprint() == fp]
        if same and len(same) == len(pending["manifests"]):
            runs.append((run_id, pending["dt"], same, True, pending["rows_per_file"]))
            for job in same:
                del left[job.manifest.uri]
        else:  # its manifests changed or went since: its rows are not wanted
            state.remove_run(output, pending["dt"], run_id)
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
               resume: bool, state: NightState, failed: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Label the night's manifests in one run (or resume it), then record each manifest; returns what was done."""
    rdir = run_dir(output, run_id)
    state.setdefault("pending", {})[run_id] = {
        "dt": day, "model_version": meta["version"], "rows_per_file": config.rows_per_file, "started_at": _now(),
        "manifests": {j.manifest.uri: j.manifest.fingerprint() for j in jobs}}
    state.save()      # a crash from here on is resumed by the next night
    if resume:
        log.info("nightly %s: resuming run %s of %d manifests (partition dt=%s)", day, run_id, len(jobs), day)
    options = {**options_of(config), "thresholds": dict(config.thresholds),
               "max_error_rate": 1.0}   # the error rate is judged per manifest, below
    base = LabelConfig(
        **options, manifests=[j.manifest.uri for j in jobs], model=config.model, output=partition_uri(output, day),
        run_id=run_id, resume=resume, state_dir=rdir, mode="append",
        extra_summary={"nightly": {"date": day, "manifests": [{"manifest": j.manifest.uri, **j.manifest.fingerprint(),
                                                                "reason": j.reason} for j in jobs]}})
    try:
        summary = label(base)
    except Exception as exc:   # any error of this run is its manifests' (a Ray error, a failed S3 write): the night goes on
        state.remove_run(output, day, run_id)   # no half output of a failed run; its manifests are tried afresh next night
        del state["pending"][run_id]
        state.save()
        for job in jobs:
            log.error("nightly %s: %s failed: %s", day, job.manifest.uri, exc)
            failed.append({"manifest": job.manifest.uri, "run_id": run_id, "error": _reason(exc)})
        return []

    per_manifest = {m["manifest"]: (i, m) for i, m in enumerate(summary["per_manifest"])}
    done = []
    for job in jobs:
        m = job.manifest
        index, stats = per_manifest[m.uri]
        rate = stats["errors"] / stats["rows"] if stats["rows"] else 0.0
        if rate > config.max_error_rate:  # this manifest's rows go; the others' stay
            state.remove_manifest(output, day, run_id, index)
            error = (f"{stats['errors']} of {stats['rows']} rows are errors ({rate:.1%}), above --max-error-rate "
                     f"{config.max_error_rate:.1%}")
            log.error("nightly %s: %s failed: %s", day, m.uri, error)
            failed.append({"manifest": m.uri, "run_id": run_id, "error": error})
            continue
        removed = 0
        if job.replaces is not None and job.replaces["run_id"] != run_id and config.table:
            journal(state)["removals"].append({k: job.replaces.get(k) for k in ("run_id", "dt", "file_index")})
            log.info("nightly %s: %s changed; its previous run %s (dt=%s) leaves the table with tonight's commit",
                     day, m.uri, job.replaces["run_id"], job.replaces["dt"])
        elif job.replaces is not None and job.replaces["run_id"] != run_id:
            removed = state.remove_manifest(output, job.replaces["dt"], job.replaces["run_id"], job.replaces.get("file_index"))
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
    if config.table and done:
        journal(state)["runs"].append({"run_id": run_id, "dt": day})
    del state["pending"][run_id]
    state["updated_at"] = _now()
    state.save()
    return done
