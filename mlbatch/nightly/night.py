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
  ``manifest_index`` of the run's plan). The job's summary has every manifest's rows, ok, errors and
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

import logging
import os
import time
from dataclasses import asdict, replace
from datetime import datetime, timezone
from typing import Any

from ..core import iceberg, storage
from ..core import manifest as manifest_mod
from ..core.lease import Fence
from ..label import commit
from ..label.config import JobError, LabelConfig, options_of
from ..label.job import label
from ..label.plan import resolve_model
from .config import DriftError, NightlyConfig, NightlyError, check_config
from .discover import find_manifests
from .drift import METRICS, drift, night_stats
from .publish import journal, publish, settle
from .runs import Failure, NightRun, Todo, group_runs, sort_manifests
from .state import NIGHTLY_DIR, PARTITION_SUMMARY, RUNS_DIR, NightState, load_state, partition_uri, run_dir, write_json

log = logging.getLogger(__name__)


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
    """The night itself, under the output's lease: find, sort, group into runs, label, record, watch drift."""
    version = meta["version"]
    state = _open_state(config, output, fence)
    found = find_manifests(config.input, output, state)
    log.info("nightly %s: %d manifests under %s, model %s %s", day, len(found), config.input, meta["name"], version)
    if not found:
        log.warning("nightly %s: no *.parquet manifests under %s", day, config.input)
    todo, unchanged, older = sort_manifests(found, state, version, config.relabel)
    runs, failed = group_runs(config, output, day, version, todo, state)
    labeled: list[dict[str, Any]] = []
    for run in runs:
        done, lost, state = _label_run_or_abandon(replace(config, model=model_uri, rows_per_unit=run.rows_per_unit),
                                                  output, meta, run, state)
        labeled += done
        failed += lost
    table = _publish(config, day, output, state, version)
    night = night_stats(state, day, version)
    summary = {
        "date": day,
        "status": "failed" if failed else "complete",
        "input": config.input,
        "output": output,
        "partition": partition_uri(output, day),
        "model": {"uri": config.model, "resolved_uri": model_uri, "name": meta["name"], "version": version},
        "manifests_found": len(found),
        "labeled": labeled,
        "failed": [asdict(f) for f in failed],
        "unchanged": len(unchanged),
        "older_version": {"count": len(older), "relabel": config.relabel, "manifests": older},
        "missing": sorted(u for u in state["manifests"] if u not in {m.uri for m in found}),
        "table": table,
        "night": night,
        "drift": drift(state, day, version, night, config.drift_window, config.drift_bound),
        "wall_seconds": round(time.time() - started, 2),
        "finished_at": _now(),
    }
    write_json(storage.join(output, NIGHTLY_DIR, RUNS_DIR, f"{day}.json"), summary)
    write_json(storage.join(partition_uri(output, day), PARTITION_SUMMARY), summary)
    _raise_if_not_clean(config, summary, len(todo))
    return summary


def _open_state(config: NightlyConfig, output: str, fence: Fence) -> NightState:
    """The output's nightly state, after a killed night's temporaries are swept and its table commit settled."""
    storage.sweep_temporaries(storage.join(output, NIGHTLY_DIR))
    state = load_state(output, fence)
    if config.table:
        try:
            settle(config, output, state)
        except iceberg.TableError as exc:
            raise JobError(str(exc)) from None
    return state


def _label_run_or_abandon(config: NightlyConfig, output: str, meta: dict[str, Any], run: NightRun,
                          state: NightState) -> tuple[list[dict[str, Any]], list[Failure], NightState]:
    """One run labeled and recorded; if its recording fails (the state, S3), the run is abandoned and its
    manifests are retried next night. Returns what was labeled, what failed, and the state to go on with."""
    try:
        done, failed = _label_run(config, output, meta, run, state)
        return done, failed, state
    except Exception as exc:
        state = _abandon(state, output, run.day, run.run_id)
        for job in run.jobs:
            log.error("nightly %s: %s failed: %s", run.day, job.manifest.uri, _reason(exc))
        return [], [Failure(job.manifest.uri, run.run_id, _reason(exc)) for job in run.jobs], state


def _publish(config: NightlyConfig, day: str, output: str, state: NightState, version: str) -> dict[str, Any] | None:
    """The whole night committed to the table in one snapshot; on failure its journal waits for the next night."""
    if not config.table:
        return None
    try:
        return publish(config, day, output, state, version)
    except Exception as exc:
        log.error("nightly %s: the commit to table %s failed: %s", day, config.table, _reason(exc))
        return {"identifier": config.table, "catalog": config.catalog, "error": _reason(exc)}


def _raise_if_not_clean(config: NightlyConfig, summary: dict[str, Any], todo: int) -> None:
    """The night's errors, once everything is written: failed manifests, an uncommitted table, drift."""
    day, failed, table, watch = summary["date"], summary["failed"], summary["table"], summary["drift"]
    if failed:
        raise NightlyError(f"nightly {day}: {len(failed)} of {todo} manifests could not be labeled: "
                           + "; ".join(f"{f['manifest']}: {f['error']}" for f in failed[:3]), summary)
    if table is not None and "error" in table:
        raise NightlyError(f"nightly {day}: its runs are labeled and recorded, but not committed to table "
                           f"{config.table} ({table['error']}); the next night commits them", summary)
    if watch["status"] == "drift" and config.fail_on_drift:
        raise DriftError(f"nightly {day}: drift beyond {config.drift_bound} in "
                         + ", ".join(f"{d['label']} {d['metric']} ({d['difference']:+.3f})" for d in watch["drifted"]),
                         summary)


def _label_run(config: NightlyConfig, output: str, meta: dict[str, Any], run: NightRun,
               state: NightState) -> tuple[list[dict[str, Any]], list[Failure]]:
    """Label the night's manifests in one run (or resume it), then record each manifest; returns what was
    labeled and what failed (all of them, when the run itself fails)."""
    state.setdefault("pending", {})[run.run_id] = {
        "dt": run.day, "model_version": meta["version"], "rows_per_unit": config.rows_per_unit, "started_at": _now(),
        "manifests": {j.manifest.uri: j.manifest.fingerprint() for j in run.jobs}}
    state.save()      # a crash from here on is resumed by the next night
    if run.resume:
        log.info("nightly %s: resuming run %s of %d manifests (partition dt=%s)", run.day, run.run_id, len(run.jobs),
                 run.day)
    try:
        summary = label(_label_config(config, output, run))
    except Exception as exc:   # any error of this run is its manifests' (a Ray error, a failed S3 write): the night goes on
        state.remove_run(output, run.day, run.run_id)   # no half output of a failed run; tried afresh next night
        del state["pending"][run.run_id]
        state.save()
        for job in run.jobs:
            log.error("nightly %s: %s failed: %s", run.day, job.manifest.uri, exc)
        return [], [Failure(job.manifest.uri, run.run_id, _reason(exc)) for job in run.jobs]
    done, failed = [], []
    indexes = {m["manifest"]: i for i, m in enumerate(summary["per_manifest"])}
    for job in run.jobs:
        index = indexes[job.manifest.uri]
        stats = summary["per_manifest"][index]
        rate = stats["errors"] / stats["rows"] if stats["rows"] else 0.0
        if rate > config.max_error_rate:  # this manifest's rows go; the others' stay
            state.remove_manifest(output, run.day, run.run_id, index)
            error = (f"{stats['errors']} of {stats['rows']} rows are errors ({rate:.1%}), above --max-error-rate "
                     f"{config.max_error_rate:.1%}")
            log.error("nightly %s: %s failed: %s", run.day, job.manifest.uri, error)
            failed.append(Failure(job.manifest.uri, run.run_id, error))
        else:
            removed = _drop_previous(config, output, run, job, state)
            done.append(_labeled(run, _record(state, meta, run, job, index, summary), removed))
    if config.table and done:
        journal(state)["runs"].append({"run_id": run.run_id, "dt": run.day})
    del state["pending"][run.run_id]
    state["updated_at"] = _now()
    state.save()
    return done, failed


def _label_config(config: NightlyConfig, output: str, run: NightRun) -> LabelConfig:
    """The labeling run of a night's run: into its partition, its state in its run folder, rows appended."""
    options = {**options_of(config), "thresholds": dict(config.thresholds),
               "max_error_rate": 1.0}   # the error rate is judged per manifest, after the run
    return LabelConfig(
        **options, manifests=[j.manifest.uri for j in run.jobs], model=config.model,
        output=partition_uri(output, run.day), run_id=run.run_id, resume=run.resume,
        state_dir=run_dir(output, run.run_id), mode="append",
        extra_summary={"nightly": {"date": run.day, "manifests": [
            {"manifest": j.manifest.uri, **j.manifest.fingerprint(), "reason": j.reason} for j in run.jobs]}})


def _drop_previous(config: NightlyConfig, output: str, run: NightRun, job: Todo, state: NightState) -> int:
    """A changed manifest's files in its previous run: removed now (how many), or journaled to leave the table
    with tonight's commit (0 now)."""
    replaces = job.replaces
    if replaces is None or replaces["run_id"] == run.run_id:
        return 0
    if config.table:
        journal(state)["removals"].append({k: replaces.get(k) for k in ("run_id", "dt", "manifest_index")})
        log.info("nightly %s: %s changed; its previous run %s (dt=%s) leaves the table with tonight's commit",
                 run.day, job.manifest.uri, replaces["run_id"], replaces["dt"])
        return 0
    removed = state.remove_manifest(output, replaces["dt"], replaces["run_id"], replaces.get("manifest_index"))
    log.info("nightly %s: %s changed; removed %d files of its previous run %s (dt=%s)", run.day, job.manifest.uri,
             removed, replaces["run_id"], replaces["dt"])
    return removed


def _record(state: NightState, meta: dict[str, Any], run: NightRun, job: Todo, index: int,
            summary: dict[str, Any]) -> dict[str, Any]:
    """Record one labeled manifest in the state (the run's record, and its record by model version); the first."""
    m, replaces, stats = job.manifest, job.replaces, summary["per_manifest"][index]
    labeled_at = summary.get("finished_at") or _now()
    record = {"run_id": run.run_id, "manifest": m.uri, "manifest_index": index, "dt": run.day, "reason": job.reason,
              "model_name": meta["name"], "model_version": meta["version"], **m.fingerprint(),
              "rows": stats["rows"], "ok": stats["ok"], "errors": stats["errors"],
              "labels": {k: {x: v.get(x) for x in (*METRICS, "threshold")} for k, v in stats["labels"].items()},
              "attempts": summary.get("attempts", 1), "replaces": replaces["run_id"] if replaces else None,
              "finished_at": labeled_at}
    for old in state["runs"]:
        if (replaces is not None and old["run_id"] == replaces["run_id"] and old["manifest"] == m.uri
                and not old.get("superseded_by")):
            old["superseded_by"] = run.run_id
    state["runs"].append(record)
    state["manifests"].setdefault(m.uri, {})[meta["version"]] = {
        **m.fingerprint(), "mtime_ns": m.mtime_ns, "run_id": run.run_id, "manifest_index": index, "dt": run.day,
        "rows": stats["rows"], "labeled_at": labeled_at}
    return record


def _labeled(run: NightRun, record: dict[str, Any], removed: int) -> dict[str, Any]:
    """What the night's summary says of one labeled manifest."""
    return {"manifest": record["manifest"], "run_id": run.run_id, "dt": run.day, "reason": record["reason"],
            "resumed": run.resume, "attempts": record["attempts"], "rows": record["rows"], "ok": record["ok"],
            "errors": record["errors"], "replaced_run": record["replaces"], "removed_files": removed}
