"""The local engine: the labeling stages on this machine, in one process tree, without Ray.

    units of work -> UnitLabeler [read rows -> fetch + decode (helper processes) -> predict] -> write + commit

The same ``stages`` as Ray's fused layout, wired by the same ``stages.wiring``: the same rows, error
rows, file names and markers, so ``prepare`` resumes either engine's units and the summary,
the lease and the table commit around it are the same. One labeler predicts on all of this
machine's cores, or one per GPU (``predictor_devices``), each taking the next unit of work; while a
labeler labels a unit, a writer thread writes and commits its one before.

What Ray adds and this does not: other machines, and the no-progress limit (``--stall-seconds``).
Here every fetch and every decode has its own deadline (``fetch``, ``decoder``), so a run cannot
wait forever on one image.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor

import pyarrow as pa

from ..model.spec import resolve_precision
from .commit import Run
from .config import JobError, LabelConfig
from .stages import UnitLabeler, Wiring, unit_pointers, wiring, write_units
from .summary import EngineReport

log = logging.getLogger(__name__)

PROGRESS_SECONDS = 10.0   # a progress line at most this often


def machine_cpus() -> int:
    """The cores this process may use (a container's CPU set, not the host's)."""
    return max(1, len(os.sched_getaffinity(0)))


def visible_gpus() -> int:
    """CUDA devices this process sees (``CUDA_VISIBLE_DEVICES`` narrows them); ask only where CUDA is usable."""
    import torch

    return torch.cuda.device_count()


def predictor_devices(config: LabelConfig) -> list[str]:
    """One predictor per visible GPU (``--num-gpus F`` below 1: ``1/F`` predictors share each), or one on the
    CPU when there is none or ``--num-gpus 0`` declines them. With ``--require-cuda``, GPUs or a ``JobError``
    (checked before the run is prepared)."""
    from ..model.loaded import cuda_problem

    problem = cuda_problem()
    if config.require_cuda and problem:
        raise JobError(f"--require-cuda: {problem}")
    if config.require_cuda and config.num_gpus == 0:
        raise JobError("--require-cuda with --num-gpus 0: the predictors would ask for no GPU")
    gpus = 0 if problem else visible_gpus()
    if config.num_gpus == 0 or gpus == 0:
        return ["cpu"]
    share = int(1 / config.num_gpus + 1e-9) if config.num_gpus else 1   # as Ray packs fractions
    return [f"cuda:{d}" for d in range(gpus) for _ in range(share)]


def run_local(run: Run, why: str) -> EngineReport:
    """Label the run's units with one labeler per device, each unit written and committed (on one writer
    thread) while its labeler goes on to the next; ``why`` this engine goes into its report."""
    config, plan = run.config, run.plan
    wired = wiring(run)
    devices = predictor_devices(config)
    helpers = max(1, machine_cpus() // len(devices))
    rows = sum(b - a for _, a, b in run.todo)
    log.info("labeling %d rows (%d units of work) of %d manifests into %s (run %s, local engine, %d labeler(s) "
             "on %s, %d decode helpers each, %s decoding)", rows, len(run.todo), len(plan.manifests), run.output,
             plan.run_id, len(devices), ", ".join(devices), helpers, config.decode)
    ignored = [flag for flag, given in (("--concurrency", config.concurrency is not None),
                                        ("--layout", config.layout != "auto")) if given]
    if ignored:
        log.warning("%s: Ray's, not the local engine's (one labeler per device of this machine); pass --engine ray "
                    "to use them", " and ".join(ignored))
    labelers: list[UnitLabeler] = []
    try:
        for device in devices:
            labelers.append(UnitLabeler(**wired.predictor, **wired.labeler, threads=helpers, device=device))
        _label_units(run, wired, labelers, rows)
    finally:
        for labeler in labelers:
            labeler.close()
    device = devices[0].split(":")[0]
    return EngineReport("local", why, layout="fused", concurrency=len(devices), devices=tuple(devices),
                        num_gpus=0.0 if device == "cpu" else (config.num_gpus or 1.0), device=device,
                        precision=resolve_precision(config.precision, device), decode=config.decode,
                        decode_helpers=helpers)


def _label_units(run: Run, wired: Wiring, labelers: list[UnitLabeler], rows: int) -> None:
    """Each labeler takes the next unit of work until none is left; a failure in one stops the others after
    their current unit, and is raised here."""
    todo = iter(run.todo)
    lock, failed = threading.Lock(), threading.Event()
    progress = {"done": 0, "started": time.monotonic(), "last": time.monotonic()}
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="mlbatch-write") as writer, \
            ThreadPoolExecutor(max_workers=len(labelers), thread_name_prefix="mlbatch-label") as pool:

        def next_unit() -> tuple[int, int, int] | None:
            with lock:
                return None if failed.is_set() else next(todo, None)

        def commit(future: Future) -> None:
            markers = future.result()
            with lock:
                run.add_markers(markers)

        def work(labeler: UnitLabeler) -> None:
            pending: Future | None = None
            try:
                while (unit := next_unit()) is not None:
                    unit_rows = pa.Table.from_pylist(unit_pointers([unit], run.plan))
                    labeled = pa.concat_tables(list(labeler(unit_rows)))
                    if pending is not None:
                        commit(pending)
                    pending = writer.submit(write_units, labeled, **wired.write)
                    _progress(run, progress, lock, unit[2] - unit[1], rows)
                if pending is not None:
                    commit(pending)
            except BaseException:
                failed.set()
                raise

        for future in [pool.submit(work, labeler) for labeler in labelers]:
            future.result()


def _progress(run: Run, progress: dict[str, float], lock: threading.Lock, n: int, rows: int) -> None:
    """A progress line at most every ``PROGRESS_SECONDS``."""
    with lock:
        progress["done"] += n
        now = time.monotonic()
        if run.config.progress and now - progress["last"] >= PROGRESS_SECONDS:
            progress["last"] = now
            log.info("labeled %d of %d rows (%.0f rows/s)", progress["done"], rows,
                     progress["done"] / (now - progress["started"]))
