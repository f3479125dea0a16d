"""The labeling job: manifests in, the same manifests with multi-hot label columns out, on Ray Data or
on this machine alone (``engine``).

``label()`` reads as its steps: plan (Parquet footers, no rows) -> prepare (fresh, or resume the
committed units) -> pipeline (the layout on Ray Data, or the local engine; commits stream) ->
summary (the markers' statistics added up, ``_run.json``, ``_SUCCESS``). Every input row leaves as
exactly one output row, an error row if its image cannot be read; the job itself fails only for job-level faults
(``JobError``): unreadable or schema-invalid manifests, duplicate ids, a refused model package, an
unwritable output, a stalled cluster, or too many error rows.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import time
from typing import Any, Iterator

from ..core import iceberg, storage
from ..core.lease import Lease
from . import commit
from .config import JobError, LabelConfig, check_choices
from .engine import choose_engine, connect_ray
from .ids import check_ids
from .plan import make_plan
from .prepare import completed, prepare
from .summary import EngineReport, finish

log = logging.getLogger(__name__)


def label(config: LabelConfig) -> dict[str, Any]:
    """Run one labeling job and return its summary (also written to ``STATE/_run.json``)."""
    started = time.time()
    check_choices(config)   # before anything is planned or removed
    engine, why = choose_engine(config.engine)
    log.info("%s engine: %s", engine, why)
    plan = make_plan(config)
    output, state = commit.output_dirs(config)
    commit.check_writable(output)
    with commit.holding(output, plan.run_id, config.lease_seconds) as lease:   # one writer per output
        if config.resume and (done := completed(config, plan)) is not None:
            lease.check()
            swept = commit.sweep_unmarked(output, state, plan.run_id)
            log.info("run %s is already complete in %s: nothing to resume (%d unmarked files removed)",
                     plan.run_id, output, swept)
            return publish(config, done, lease) if config.table else done
        _refuse_a_rerun_the_table_reads(config, plan.run_id)
        with _engine(engine, config) as (run_units, predictor):
            if config.id_column:
                check_ids(plan, config.id_column, on_ray=engine == "ray")
            run = prepare(config, plan, lease.fence, predictor)
            report = run_units(run, why) if run.todo else EngineReport(engine, why)
        lease.check()
        commit.drop_late_commits(run)   # a killed attempt's workers may have committed a unit this one redid
        summary = finish(run, started, report)
        return publish(config, summary, lease) if config.table else summary


@contextlib.contextmanager
def _engine(engine: str, config: LabelConfig) -> Iterator[tuple[Any, str]]:
    """The engine's function from a prepared run (and why this engine) to its ``EngineReport``, and where its
    predictors compute (``"cuda fp16"``: part of the run's identity); Ray connected (or started) for ray."""
    from ..model.spec import resolve_precision

    if engine == "local":
        from .local import predictor_devices, run_local

        device = predictor_devices(config)[0].split(":")[0]   # --require-cuda: refused before anything is prepared
        yield run_local, f"{device} {resolve_precision(config.precision, device)}"
        return
    from . import ray_compat
    from .pipeline import placed_predictors, run_pipeline

    connect_ray()
    predictors = placed_predictors(config)   # a GPU asked for is waited for, and checked, before anything is prepared
    with ray_compat.data_context(config.progress, config.stall_seconds):
        yield functools.partial(run_pipeline, predictors=predictors), predictors.identity


def _refuse_a_rerun_the_table_reads(config: LabelConfig, run_id: str) -> None:
    """A fresh run deletes its run id's earlier files first: refused while the table's current snapshot reads
    them, before anything is removed (the table would point at deleted files)."""
    if not config.table or config.resume:
        return
    output, _ = commit.output_dirs(config)
    try:
        read = iceberg.reads(config.table, config.catalog, output, commit.run_files(output, run_id))
    except iceberg.TableError as exc:
        raise JobError(str(exc)) from None
    if read:
        raise JobError(f"run {run_id} is committed to table {config.table}, whose current snapshot reads "
                       f"{len(read)} of its files: labeling it again under the same run id would delete them. "
                       "Pass --resume (a complete run is not labeled again), or another --run-id with --mode "
                       "overwrite to replace its rows in one snapshot; nothing was touched")


def publish(config: LabelConfig, summary: dict[str, Any], lease: Lease) -> dict[str, Any]:
    """Commit the run to its Iceberg table in one snapshot; only then remove the files it replaces. The commit's
    key is this attempt's (run id and lease epoch): a commit is skipped only when the table holds that one."""
    output, state = commit.output_dirs(config)
    run_id = summary["run_id"]
    key = f"{run_id}@{summary['lease_epoch']}" if "lease_epoch" in summary else run_id
    replaced = [f.uri for f in commit.foreign_files(output, run_id)] if config.mode == "overwrite" else []
    lease.check()
    try:
        snapshot = iceberg.commit_files(config.table, config.catalog, output, key, commit.run_files(output, run_id),
                                        replaced, {"run_id": run_id, "model_version": summary["model"]["version"],
                                                   "manifests": len(summary["manifests"])})
    except iceberg.TableError as exc:
        raise JobError(str(exc)) from None
    if replaced:
        lease.check()
        summary["replaced_files"] = commit.remove_other_runs(output, state, run_id)
    summary["table"] = {"identifier": config.table, "catalog": config.catalog, "snapshot_id": snapshot}
    storage.write_atomic(storage.join(state, commit.SUMMARY_FILE), (json.dumps(summary, indent=2) + "\n").encode())
    return summary
