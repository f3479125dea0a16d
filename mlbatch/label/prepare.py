"""The prepare step of a run: start afresh, or (``--resume``) keep the whole committed units and clear the rest.

A resume trusts nothing alone. ``completed`` calls a run complete only when its ``_SUCCESS`` and
summary, its plan record, a whole commit of every unit and every file its markers name are all
there; a run whose removal was cut part way (which deletes ``_SUCCESS`` and the summary first) is
therefore resumed or refused, never returned as done. Every removal and the plan record are made
under the lease's fence (``Fence.check`` first), so a holder that lost the output writes nothing.
"""

from __future__ import annotations

import collections
import json
import logging
from typing import Any

from ..core import storage
from ..core.lease import Fence
from .commit import (PLAN_FILE, SUCCESS_FILE, SUMMARY_FILE, Run, marker_uri, markers_dir, other_runs, output_dirs,
                     read_markers, remove_run, run_files, unit_id)
from .config import JobError, LabelConfig
from .plan import Plan
from .stats import TOP_ERRORS_KEPT, Stats, whole

log = logging.getLogger(__name__)


def plan_record(config: LabelConfig, plan: Plan, predictor: str) -> dict[str, Any]:
    """What a resumed run must share with the units it keeps: everything that changes a row's value, the
    device and precision its predictors compute in included (GPU and CPU rows differ near a threshold)."""
    return {"predictor": predictor, "manifests": [[u, n, s] for u, n, s in zip(plan.manifests, plan.rows, plan.stamps)],
            "rows_per_unit": config.rows_per_unit, "decode": config.decode, "model_version": plan.meta["version"],
            "thresholds": plan.thresholds, "max_pixels": config.max_pixels, "max_bytes": config.max_bytes,
            "uri_column": config.uri_column}


_FLAGS = {"predictor": "the device and precision (--precision, --num-gpus)", "rows_per_unit": "--rows-per-unit",
          "decode": "--decode", "model_version": "the model version", "thresholds": "the thresholds",
          "max_pixels": "--max-pixels", "max_bytes": "--max-bytes", "uri_column": "--uri-column"}


def _changes(before: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """What differs between a run's first plan record and this try's, in words."""
    out = []
    old_files = {f[0]: f[1:] for f in before.get("manifests", before.get("files", []))}   # "files": an older mlbatch's
    new_files = {f[0]: f[1:] for f in now["manifests"]}
    for uri in sorted(set(old_files) | set(new_files)):
        if uri not in new_files:
            out.append(f"manifest {uri} is no longer in the run")
        elif uri not in old_files:
            out.append(f"manifest {uri} was not in the run")
        elif old_files[uri] != new_files[uri]:
            out.append(f"manifest {uri} changed since the run started (its footer or its version, the ETag or the "
                       "modification time, differs)")
    for key, flag in _FLAGS.items():
        if key == "predictor" and key not in before:   # recorded since issue 39: an older run resumes as before
            continue
        if key not in before:
            out.append(f"{flag} is not recorded (the run was started by an older mlbatch)")
        elif before[key] != now[key]:
            out.append(f"{flag} changed ({before[key]} -> {now[key]})")
    return out


def _committed(markers: str) -> dict[str, list[dict[str, Any]]]:
    """The commit markers of a run by unit."""
    out: dict[str, list[dict[str, Any]]] = collections.defaultdict(list)
    for m in read_markers(markers):
        out[m["unit"]].append(m)
    return out


def _whole_units(plan: Plan, committed: dict[str, list[dict[str, Any]]], present: set[str]) -> dict[str, Stats]:
    """The units whose commits hold exactly their rows, in data files still ``present`` (by name), with what
    is committed of them. A marker whose data file is gone vouches for nothing: its unit is labeled again."""
    bounds = {unit_id(f, a): (a, b) for f, a, b in plan.units}
    done = {}
    for unit, ms in committed.items():
        stats = Stats()
        for m in ms:
            stats.add(Stats.from_dict(m), keep=TOP_ERRORS_KEPT)
        if unit in bounds and whole(stats, *bounds[unit]) and all(m["data_file"] in present for m in ms):
            done[unit] = stats
    return done


def completed(config: LabelConfig, plan: Plan) -> dict[str, Any] | None:
    """The summary of ``plan``'s run if it is complete in its output, else None (a resume then finishes it).

    Complete means all of: ``_SUCCESS``, a summary of this run, its plan record, a whole commit of every
    unit, and every data file those commits name. Any one alone can outlive a removal cut part way.
    """
    output, state = output_dirs(config)
    if not storage.exists(storage.join(state, SUCCESS_FILE)):
        return None
    uri = storage.join(state, SUMMARY_FILE)
    done = storage.json_object(storage.read_bytes(uri)) if storage.exists(uri) else None
    if done is None:   # its markers still say what is committed: a resume reads them, and writes it again
        log.warning("%s is not a run summary (cut, or made by something else): resuming from the commit markers",
                    uri)
        return None
    if done.get("run_id") != plan.run_id:
        return None
    markers = markers_dir(state, plan.run_id)
    present = {u.rsplit("/", 1)[-1] for u in run_files(output, plan.run_id)}
    whole_units = _whole_units(plan, _committed(markers), present)
    missing = [unit_id(f, a) for f, a, _ in plan.units if unit_id(f, a) not in whole_units]
    if missing or not storage.exists(storage.join(markers, PLAN_FILE)):
        log.warning("run %s has its _SUCCESS but not all it vouches for (its plan record, or %d units without a "
                    "whole commit in data files still there): a removal was cut part way; resuming it",
                    plan.run_id, len(missing))
        return None
    return done


def prepare(config: LabelConfig, plan: Plan, fence: Fence, predictor: str) -> Run:
    """Start a run afresh, or (``--resume``) keep its whole committed units and clear away the rest."""
    output, state = output_dirs(config)
    markers = markers_dir(state, plan.run_id)
    if config.mode == "error":   # before anything is removed
        _refuse_other_runs(config, plan, output, markers)
    fence.check()
    swept = sum(storage.sweep_temporaries(d) for d in {output, state, markers})   # writers killed mid-write
    if swept:
        log.info("removed %d temporaries that writers killed mid-write left in %s", swept, output)
    for name in (SUCCESS_FILE, SUMMARY_FILE):   # what a reader trusts goes before what it vouches for
        storage.delete(storage.join(state, name))
    plan_uri = storage.join(markers, PLAN_FILE)
    files = run_files(output, plan.run_id)
    run = Run(config, plan, output, state, markers, fence, {}, [Stats() for _ in plan.manifests], Stats(), [],
              predictor=predictor)
    if config.resume and (files or storage.exists(plan_uri)):
        run.attempts = _resume(run, files, plan_record(config, plan, predictor))
    else:  # a repeated run replaces its own files
        remove_run(output, state, plan.run_id)
    storage.write_atomic(plan_uri, json.dumps({**plan_record(config, plan, predictor), "attempts": run.attempts,
                                               "epoch": fence.epoch}).encode())
    run.todo = [u for u in plan.units if unit_id(u[0], u[1]) not in run.done]
    return run


def _refuse_other_runs(config: LabelConfig, plan: Plan, output: str, markers: str) -> None:
    """``--mode error``: an output holding rows this run did not write is refused, naming who wrote them;
    a ``--resume`` that finds only other runs' rows is told why its own are not there."""
    others = other_runs(output, plan.run_id)
    if not others:
        return
    if config.resume and not run_files(output, plan.run_id) and not storage.exists(storage.join(markers, PLAN_FILE)):
        held = ", ".join(sorted(others)[:5])
        raise JobError(f"cannot resume run {plan.run_id}: output {output} holds {held}, not this run. Its manifests, "
                       "--rows-per-unit or --decode are not those it started with, or the model version, "
                       "thresholds, --max-pixels, --max-bytes or --uri-column changed (the default run id covers "
                       "them all): resume with the same settings, or pass the run's --run-id")
    held = ", ".join(f"{who} ({n} files)" for who, n in sorted(others.items())[:5])
    raise JobError(f"output {output} already holds rows this run did not write: {held}. Labeling into it "
                   "again would double them: pass --mode overwrite to replace them once this run has "
                   "committed, or --mode append to add this run beside them")


def _resume(run: Run, files: list[str], record: dict[str, Any]) -> int:
    """Keep the whole committed units of the run in ``run`` (``done``, the statistics), delete every file and
    marker of the others; returns this attempt's number (1 for the first)."""
    plan = run.plan
    plan_uri = storage.join(run.markers, PLAN_FILE)
    recorded = storage.exists(plan_uri)
    before = storage.json_object(storage.read_bytes(plan_uri)) if recorded else None
    changes = (["its plan record is gone"] if not recorded else
               ["its plan record is not one (cut, or made by something else)"] if before is None else
               _changes(before, record))
    if changes:
        raise JobError(f"cannot resume run {plan.run_id}: {'; '.join(changes[:5])} ({plan_uri}): its "
                       "manifests, --rows-per-unit or --decode are not those it started with, or the model "
                       "version, thresholds, --max-pixels, --max-bytes or --uri-column changed; run again without "
                       "--resume")
    committed = _committed(run.markers)
    run.done = _whole_units(plan, committed, {u.rsplit("/", 1)[-1] for u in files})
    for unit, stats in run.done.items():
        run.manifest_stats[committed[unit][0]["manifest_index"]].add(stats)
        run.total.add(stats)
    keep = {m["data_file"] for u in run.done for m in committed[u]}
    for unit, ms in committed.items():       # a part of a unit is no commit: markers first, then the data
        if unit not in run.done:
            for m in ms:
                storage.delete(marker_uri(run.markers, m["data_file"]))
    stale = [u for u in files if u.rsplit("/", 1)[-1] not in keep]
    for uri in stale:
        storage.delete(uri)
    attempts = before.get("attempts")
    attempts = (attempts if isinstance(attempts, int) else int(before.get("attempt", 0)) + 1) + 1
    log.info("resuming run %s (attempt %d, lease epoch %d): %d of %d units committed, %d files of unfinished units "
             "removed", plan.run_id, attempts, run.attempt, len(run.done), len(plan.units), len(stale))
    return attempts
