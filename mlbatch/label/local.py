"""The local engine: the labeling stages on this machine, in one process tree, without Ray.

    units of work -> UnitLabeler [read rows -> fetch + decode (helper processes) -> predict] -> write + commit

The same ``stages`` as Ray's fused layout, wired by the same ``stages.wiring``: the same rows, error
rows, file names and markers, so ``commit.prepare`` resumes either engine's units and the summary,
the lease and the table commit around it are the same. One labeler predicts on all of this
machine's cores (or its GPU); while it labels a unit, a thread writes and commits the one before.

What Ray adds and this does not: other machines, and the no-progress limit (``--stall-seconds``).
Here every fetch and every decode has its own deadline (``fetch``, ``decoder``), so a run cannot
wait forever on one image.
"""

from __future__ import annotations

import logging
import os
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import pyarrow as pa

from ..model.spec import resolve_precision
from .commit import Run
from .config import JobError, LabelConfig
from .stages import UnitLabeler, unit_pointers, wiring, write_units

log = logging.getLogger(__name__)

PROGRESS_SECONDS = 10.0   # a progress line at most this often


def machine_cpus() -> int:
    """The cores this process may use (a container's CPU set, not the host's)."""
    return max(1, len(os.sched_getaffinity(0)))


def device_for(config: LabelConfig) -> str:
    """Where this machine predicts: CUDA when it is usable and not declined (``--num-gpus 0``); with
    ``--require-cuda``, CUDA or a ``JobError`` (checked before the run is prepared)."""
    from ..model.loaded import cuda_problem

    problem = cuda_problem()
    if config.require_cuda and problem:
        raise JobError(f"--require-cuda: {problem}")
    if config.num_gpus == 0:
        return "cpu"
    return "cpu" if problem else "cuda"


def run_local(run: Run) -> dict[str, Any]:
    """Label the run's units one after another, each written and committed while the next is labeled."""
    config, plan = run.config, run.plan
    wired = wiring(run)
    device, threads = device_for(config), machine_cpus()
    rows = sum(b - a for _, a, b in run.todo)
    log.info("labeling %d rows (%d units of work) of %d manifests into %s (run %s, local engine, %d decode helpers, "
             "device %s, %s decoding)", rows, len(run.todo), len(plan.files), run.output, plan.run_id, threads,
             device, config.decode)
    ignored = [flag for flag, given in (("--concurrency", config.concurrency is not None),
                                        ("--layout", config.layout != "auto")) if given]
    if ignored:
        log.warning("%s: Ray's, not the local engine's (one labeler on this machine); pass --engine ray to use them",
                    " and ".join(ignored))
    labeler = UnitLabeler(**wired["predictor"], **wired["labeler"], threads=threads, device=device)
    started = last = time.monotonic()
    done = 0
    try:
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="mlbatch-write") as writer:
            pending: Future | None = None
            for file_index, start, stop in run.todo:
                unit = pa.Table.from_pylist(unit_pointers([(file_index, start, stop)], plan))
                labeled = pa.concat_tables(list(labeler(unit)))
                if pending is not None:
                    run.add_markers(pending.result())
                pending = writer.submit(write_units, labeled, **wired["write"])
                done += stop - start
                if config.progress and time.monotonic() - last >= PROGRESS_SECONDS:
                    last = time.monotonic()
                    log.info("labeled %d of %d rows (%.0f rows/s)", done, rows, done / (last - started))
            if pending is not None:
                run.add_markers(pending.result())
    finally:
        labeler.close()
    return {"engine": "local", "layout": "fused", "concurrency": 1, "num_gpus": 1.0 if device == "cuda" else 0.0,
            "device": device, "precision": resolve_precision(config.precision, device), "decode": config.decode,
            "decode_helpers": threads}
