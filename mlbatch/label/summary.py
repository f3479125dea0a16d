"""The end of a run: its statistics added up from the commit markers, ``_run.json`` then ``_SUCCESS``.

The run fails here (``JobError``, with ``_run.json`` saying ``failed``) when a unit is not whole,
rows are missing, or the error rows are above ``--max-error-rate``.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from typing import Any

from ..core import storage
from ..core.table import renamed_inputs
from .commit import SUCCESS_FILE, SUMMARY_FILE, Run, read_markers, remove_other_runs, unit_id
from .config import JobError, LabelConfig
from .stats import whole

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineReport:
    """How an engine ran a run's predictors: the summary's ``predictor`` record (``as_record``)."""

    engine: str                       # local | ray
    engine_reason: str                # why that engine (``engine.choose_engine``)
    layout: str | None = None         # fused | split; None when nothing was left to label
    concurrency: int | tuple[int, int] | None = None   # predictors (or Ray's autoscaling pool)
    num_gpus: float | None = None     # per predictor
    device: str | None = None         # cpu | cuda
    precision: str | None = None
    decode: str | None = None
    devices: tuple[str, ...] | None = None   # the local engine's: one per predictor
    decode_helpers: int | None = None        # the local engine's: decode processes per predictor

    def as_record(self) -> dict[str, Any]:
        """The record in ``_run.json``: the local engine's own fields only when it ran."""
        record = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}
        for name in ("devices", "decode_helpers"):
            if record[name] is None:
                del record[name]
        return record


def finish(run: Run, started: float, predictor: EngineReport) -> dict[str, Any]:
    """Add up the units' statistics, check every unit is whole, write ``_run.json`` then ``_SUCCESS``."""
    config, plan = run.config, run.plan
    total = run.total
    broken = [(unit_id(f, a), run.done[unit_id(f, a)].rows, b - a) for f, a, b in plan.units
              if unit_id(f, a) in run.done and not whole(run.done[unit_id(f, a)], a, b)]
    missing = sum(1 for f, a, _ in plan.units if unit_id(f, a) not in run.done)
    wall = time.time() - started
    rows_out = total.rows
    summary = {
        "run_id": plan.run_id,
        "status": "complete",
        "output": run.output,
        "manifests": plan.manifests,
        "rows_in": plan.rows_in,
        "rows_out": rows_out,
        "ok": total.ok,
        "errors": total.errors,
        "error_rate": total.errors / rows_out if rows_out else 0.0,
        "top_errors": total.top_errors(),
        "labels": total.per_label(plan.thresholds),
        "per_manifest": [{"manifest": uri, "rows": s.rows, "ok": s.ok, "errors": s.errors,
                          "labels": s.per_label(plan.thresholds)} for uri, s in zip(plan.manifests, run.manifest_stats)],
        "model": {"uri": config.model, "resolved_uri": plan.model_uri, "name": plan.meta["name"],
                  "version": plan.meta["version"]},
        "renamed_columns": renamed_inputs(plan.schema.names, plan.meta["labels"]),
        "units": len(plan.units),
        "files": len(read_markers(run.markers)) if run.attempts > 1 else run.files_written,
        "attempts": run.attempts,
        "lease_epoch": run.attempt,
        "predictor": predictor.as_record(),
        "wall_seconds": round(wall, 2),
        "rows_per_second": round(rows_out / wall, 2) if wall > 0 else None,
        "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "arguments": _arguments(config),
        **config.extra_summary,
    }
    summary_uri = storage.join(run.state, SUMMARY_FILE)
    run.fence.check()   # an attempt that lost its output (paused past its lease) writes and removes nothing more
    if broken or missing or rows_out != plan.rows_in:
        summary["status"] = "failed"
        storage.write_text(summary_uri, json.dumps(summary, indent=2) + "\n")
        detail = f"; unit {broken[0][0]} has {broken[0][1]} of {broken[0][2]} rows" if broken else ""
        raise JobError(f"run {plan.run_id}: {plan.rows_in} rows in but {rows_out} rows out, {missing} units "
                       f"uncommitted{detail}; output is incomplete: run again with --resume")
    if summary["error_rate"] > config.max_error_rate:
        summary["status"] = "failed"
        storage.write_text(summary_uri, json.dumps(summary, indent=2) + "\n")
        top = "; ".join(f"{e['count']} x {e['error']}" for e in summary["top_errors"][:3])
        raise JobError(f"run {plan.run_id}: {total.errors} of {rows_out} rows are errors ({summary['error_rate']:.1%}), "
                       f"above --max-error-rate {config.max_error_rate:.1%}. Commonest: {top}")
    if config.mode == "overwrite" and not config.table:   # only now that this run is whole: the rows it replaces go
        summary["replaced_files"] = remove_other_runs(run.output, run.state, plan.run_id)
    storage.write_atomic(summary_uri, (json.dumps(summary, indent=2) + "\n").encode())
    storage.write_atomic(storage.join(run.state, SUCCESS_FILE), b"")
    log.info("run %s complete: %d rows, %d ok, %d errors in %.1fs", plan.run_id, rows_out, total.ok, total.errors, wall)
    return summary


def _arguments(config: LabelConfig) -> dict[str, Any]:
    """The run's arguments as given: no environment, so no credentials."""
    out = asdict(config)
    out.pop("extra_summary", None)
    out["concurrency"] = list(config.concurrency) if isinstance(config.concurrency, tuple) else config.concurrency
    return out


def summary_table(summary: dict[str, Any]) -> str:
    """A short plain-text table of a run summary, for the console."""
    lines = [f"run {summary['run_id']}: {summary['status']}  ->  {summary['output']}",
             f"rows in {summary['rows_in']}, out {summary['rows_out']}: {summary['ok']} ok, {summary['errors']} errors "
             f"({summary['error_rate']:.2%})   {summary['wall_seconds']}s, {summary['rows_per_second']} rows/s",
             f"model {summary['model']['name']} {summary['model']['version']}   "
             f"engine: {summary['predictor'].get('engine')} ({summary['predictor'].get('engine_reason')})",
             f"predictor device: {summary['predictor']['device']}, layout: {summary['predictor'].get('layout')}, "
             f"decode: {summary['predictor'].get('decode')}",
             f"{'label':<16}{'threshold':>10}{'positive rate':>15}{'mean prob':>11}"]
    for name, s in summary["labels"].items():
        rate = "n/a" if s["positive_rate"] is None else f"{s['positive_rate']:.3f}"
        mean = "n/a" if s["mean_probability"] is None else f"{s['mean_probability']:.3f}"
        lines.append(f"{name:<16}{s['threshold']:>10.3f}{rate:>15}{mean:>11}")
    for e in summary["top_errors"]:
        lines.append(f"  error x{e['count']}: {e['error']}")
    if summary.get("renamed_columns"):
        lines.append("kept under new names: " + ", ".join(f"{a} -> {b}" for a, b in summary["renamed_columns"].items()))
    return "\n".join(lines)
