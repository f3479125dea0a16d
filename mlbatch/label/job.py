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
import json
import logging
import time
from typing import Any, Iterator

from ..core import iceberg, storage
from . import commit
from .config import JobError, LabelConfig, check_choices
from .engine import choose_engine, connect_ray
from .ids import check_ids
from .plan import make_plan
from .summary import finish

log = logging.getLogger(__name__)

NOTHING_TO_RUN = {"layout": None, "concurrency": None, "num_gpus": None, "device": None, "decode": None}


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
        if config.resume and (done := commit.completed(state, plan.run_id)) is not None:
            swept = commit.sweep_unmarked(output, state, plan.run_id)
            log.info("run %s is already complete in %s: nothing to resume (%d unmarked files removed)",
                     plan.run_id, output, swept)
            return publish(config, done) if config.table else done
        with _engine(engine, config) as run_units:
            if config.id_column:
                check_ids(plan, config.id_column, on_ray=engine == "ray")
            run = commit.prepare(config, plan)
            predictor = run_units(run) if run.todo else NOTHING_TO_RUN
        lease.check()
        commit.drop_late_commits(run)   # a killed attempt's workers may have committed a unit this one redid
        summary = finish(run, started, {**predictor, "engine": engine, "engine_reason": why})
        return publish(config, summary) if config.table else summary


@contextlib.contextmanager
def _engine(engine: str, config: LabelConfig) -> Iterator[Any]:
    """The engine's function from a prepared run to its predictor's set-up; Ray connected (or started) for ray."""
    if engine == "local":
        from .local import run_local

        yield run_local
        return
    from . import ray_compat
    from .pipeline import run_pipeline

    connect_ray()
    with ray_compat.data_context(config.progress, config.stall_seconds):
        yield run_pipeline


def publish(config: LabelConfig, summary: dict[str, Any]) -> dict[str, Any]:
    """Commit the run to its Iceberg table in one snapshot; only then remove the files it replaces."""
    output, state = commit.output_dirs(config)
    run_id = summary["run_id"]
    replaced = commit.other_files(output, run_id) if config.mode == "overwrite" else []
    try:
        snapshot = iceberg.commit_files(config.table, config.catalog, output, run_id, commit.run_files(output, run_id),
                                        replaced, {"run_id": run_id, "model_version": summary["model"]["version"],
                                                   "manifests": len(summary["manifests"])})
    except iceberg.TableError as exc:
        raise JobError(str(exc)) from None
    if replaced:
        summary["replaced_files"] = commit.remove_other_runs(output, state, run_id)
    summary["table"] = {"identifier": config.table, "catalog": config.catalog, "snapshot_id": snapshot}
    storage.write_atomic(storage.join(state, commit.SUMMARY_FILE), (json.dumps(summary, indent=2) + "\n").encode())
    return summary
