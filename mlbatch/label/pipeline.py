"""The layouts on Ray Data: units of work in, commits streaming out to the driver.

    fused (CPU):  units of work -> UnitLabeler actors [read rows -> fetch + decode -> predict] -> write + commit
    split (GPU):  units of work -> read rows -> fetch + decode (CPU tasks) -> Predictor actors -> write + commit

The *layout* follows the cluster (``choose_layout``, ``--layout`` forces one): where predictors
hold GPUs, separate decode tasks keep the GPUs fed; on CPU, one actor per unit reads, fetches,
decodes (in its own helper processes) and predicts, so pixels never go through the object store
and reading never runs ahead of decoding. Both use the same ``stages``, so their output is the
same, row for row.

Why a write stage and not a ``Datasink``: a sink's results reach the driver only when every
task has finished. The write stage commits each unit inside its task just the same, and its
small results stream to the driver, which sums them and so sees progress.

Why not Ray Data's ``download`` expression for the fetch: its planner actor holds a whole CPU,
which deadlocks a 2-CPU node next to the predictor actor, and it turns every failure into a
null with no reason. ``fetch.fetch`` (boto3, standard retry mode) runs in a thread pool in
the decode tasks instead and says exactly why an object could not be read.
"""

from __future__ import annotations

import collections
import logging
from dataclasses import dataclass
from typing import Iterator, NoReturn

import pyarrow as pa
import ray
from ray.data.exceptions import ExecutionTimeoutError

from ..core.manifest import ManifestError
from ..model.spec import resolve_precision
from . import ray_compat
from .commit import Run
from .config import JobError, LabelConfig
from .plan import Plan
from .stages import Predictor, UnitLabeler, decode_batch, read_units, unit_pointers, wiring, write_units
from .summary import EngineReport

log = logging.getLogger(__name__)

DECODE_CPUS = 0.5   # fetching is half waiting on storage
WRITE_CPUS = 0.5    # so is writing
# Ray Data retries a failed task, and restarts a dead actor, without end by default (-1), so an input that
# kills its worker would be tried until the stall limit, and again on every --resume. Bounded here: a lost
# node costs a few attempts; an image that kills a decoder is caught before that (decoder.HelperPool).
TASK_RETRIES = {"max_retries": 3}
ACTOR_RETRIES = {"max_restarts": 3, "max_task_retries": 3}


def units_dataset(units: list[tuple[int, int, int]], plan: Plan) -> ray.data.Dataset:
    """Units of work as a dataset of pointers (``stages.unit_pointers``): rows are read by the tasks."""
    items = unit_pointers(units, plan)
    return ray.data.from_items(items, override_num_blocks=max(1, min(len(items), 1000)))


def _cluster_resources() -> tuple[float, float]:
    res = ray.cluster_resources()
    return float(res.get("CPU", 1)), float(res.get("GPU", 0))


@dataclass(frozen=True)
class Predictors:
    """What each predictor actor asks for and where it will predict, settled before the run is prepared."""

    num_gpus: float
    device: str          # "cuda", or "cpu" with why
    precision: str       # what they compute in (``--precision`` resolved for the device)

    @property
    def identity(self) -> str:
        """Where they compute, as a run records it: ``"cuda fp16"``."""
        return f"{'cuda' if self.device == 'cuda' else 'cpu'} {self.precision}"


def placed_predictors(config: LabelConfig) -> Predictors:
    """GPUs per predictor (``--num-gpus``, asked for whether or not the cluster has GPUs now, so an autoscaler
    adds them; by default 1 if it has), and the device a task holding that many predicts on.

    The probe waits for a GPU up to ``--stall-seconds`` (an autoscaler may take minutes), then ends the run
    naming what it waits for. With ``--require-cuda`` a GPU whose CUDA is not usable is an error.
    """
    _, gpus = _cluster_resources()
    num_gpus = config.num_gpus if config.num_gpus is not None else (1.0 if gpus >= 1 else 0.0)
    if num_gpus <= 0:
        if config.require_cuda:
            raise JobError("--require-cuda: the predictors ask for no GPU (--num-gpus 0, or a cluster without "
                           "GPUs and no --num-gpus): pass --num-gpus 1")
        return Predictors(0.0, "cpu", resolve_precision(config.precision, "cpu"))

    @ray.remote(num_gpus=num_gpus, num_cpus=0)
    def probe() -> tuple[list, str | None]:
        from ..model.loaded import cuda_problem
        return ray.get_gpu_ids(), cuda_problem()

    ref = probe.remote()
    ready, _ = ray.wait([ref], timeout=config.stall_seconds or None)
    if not ready:
        ray.cancel(ref, force=True)
        raise JobError(f"no task with {num_gpus:g} GPU(s) could start within --stall-seconds {config.stall_seconds:g}: "
                       f"the predictors ask for {num_gpus:g} GPU(s) each and the cluster has {gpus:g} GPUs. An "
                       "autoscaler adds GPU nodes when asked; without one, pass --num-gpus 0 to label on CPUs")
    ids, problem = ray.get(ref)
    if problem and config.require_cuda:
        raise JobError(f"--require-cuda: a task given GPUs {ids} reports: {problem}")
    if problem:
        log.warning("predictor actors are given GPUs %s, but CUDA is not usable there, so they predict on the "
                    "CPU: %s", ids, problem)
        return Predictors(num_gpus, "cpu (GPU assigned, CUDA not usable)", resolve_precision(config.precision, "cpu"))
    return Predictors(num_gpus, "cuda", resolve_precision(config.precision, "cuda"))


def choose_layout(requested: str, num_gpus: float) -> str:
    """``split`` where predictors hold GPUs (decode tasks keep the GPU fed), ``fused`` on CPU.

    On CPU, a separate decode stage sends each image's pixels through the object store (decode
    task -> predictor) and lets Ray read units ahead of decoding; one actor per unit with its own
    decode helpers does neither, and measured 1.18x and 1.00x split's speed on 2 cores (benchmarks/NOTES.md).
    """
    if requested != "auto":   # fused or split: ``config.check_choices`` refused anything else
        return requested
    return "split" if num_gpus > 0 else "fused"


def run_pipeline(run: Run, why: str, predictors: Predictors) -> EngineReport:
    """units -> [read -> fetch + decode -> predict] -> write + commit, streaming; returns how it ran (``why``
    this engine included).

    ``split``: read, fetch + decode (CPU tasks) and predict (actors, GPUs) are stages of their own;
    ``fused``: one actor does all three per unit of work (the CPU layout, ``UnitLabeler``).
    """
    config, plan = run.config, run.plan
    cpus, gpus = _cluster_resources()
    num_gpus, device = predictors.num_gpus, predictors.device
    layout = choose_layout(config.layout, num_gpus)
    if config.concurrency is not None:
        concurrency = config.concurrency
    elif num_gpus > 0:
        concurrency = (1, max(1, int(gpus // num_gpus)))
    else:
        concurrency = max(1, int(cpus // 2))
    wired = wiring(run)
    if wired.renames:
        log.info("manifest columns kept under new names (the output uses their names): %s", wired.renames)
    pool = concurrency if isinstance(concurrency, tuple) else (concurrency, concurrency)
    log.info("labeling %d rows (%d units of work) of %d manifests into %s (run %s, ray engine, %s layout, %s "
             "predictor actors, device %s, %s decoding)", sum(b - a for _, a, b in run.todo), len(run.todo),
             len(plan.manifests), run.output, plan.run_id, layout, concurrency, device, config.decode)
    ds = units_dataset(run.todo, plan)
    if layout == "fused":
        ds = ds.map_batches(UnitLabeler, fn_constructor_kwargs={**wired.predictor, **wired.labeler},
                            batch_size=1, batch_format="pyarrow", num_gpus=num_gpus or None,
                            num_cpus=1 if not num_gpus else None,
                            compute=ray.data.ActorPoolStrategy(min_size=pool[0], max_size=pool[1]), **ACTOR_RETRIES)
    else:
        ds = ds.map_batches(read_units, fn_kwargs={"renames": wired.renames}, batch_size=1, batch_format="pyarrow",
                            num_cpus=DECODE_CPUS, **TASK_RETRIES)
        # Blocks of a few batches: a unit is read as one block, so without this a single task would
        # fetch every image of it. Small blocks spread the fetching over the cluster.
        ds = ds.repartition(target_num_rows_per_block=config.decode_batch_size * 4)
        # Fetching is half waiting on storage, so a decode task asks for half a CPU. That also keeps
        # Ray from fusing decode into the predictor actors (it fuses stages with equal resources).
        ds = ds.map_batches(decode_batch, fn_kwargs=wired.decode, batch_format="pyarrow",
                            batch_size=config.decode_batch_size, num_cpus=DECODE_CPUS,
                            **TASK_RETRIES)
        ds = ds.map_batches(Predictor, fn_constructor_kwargs=wired.predictor,
                            batch_format="pyarrow", batch_size=config.batch_size, num_gpus=num_gpus or None,
                            num_cpus=1 if not num_gpus else None,
                            compute=ray.data.ActorPoolStrategy(min_size=pool[0], max_size=pool[1]), **ACTOR_RETRIES)
    # Writing is mostly waiting on storage too: half a CPU lets files land as the job goes, so a
    # 2-CPU node (predictor + decode) keeps memory flat and a killed run keeps what it finished.
    ds = ds.map_batches(write_units, fn_kwargs=wired.write, batch_format="pyarrow",
                        batch_size=config.rows_per_unit, num_cpus=WRITE_CPUS, **TASK_RETRIES)
    for batch in _stream(ds, run):
        run.add_markers(batch)
    return EngineReport("ray", why, layout=layout, concurrency=concurrency, num_gpus=num_gpus, device=device,
                        precision=predictors.precision, decode=config.decode)


def _stream(ds: ray.data.Dataset, run: Run) -> Iterator[pa.Table]:
    """The write stage's results as they come; a ``JobError`` naming what the run waits for on a stall.

    The stall limit is Ray Data's own no-progress limit (``ray_compat.stall_settings``): when no
    operator moves for ``--stall-seconds``, Ray ends the execution (its tasks and actors, so the
    cluster is free again) with ``ExecutionTimeoutError``, reported here in mlbatch's words.
    """
    try:
        for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=0):
            ray_compat.forget_block_stats(ds)
            yield batch
    except ExecutionTimeoutError as exc:
        raise JobError(_stall_message(run, run.config.stall_seconds, str(exc))) from None
    except ray.exceptions.RayTaskError as exc:
        raise_own(exc)


def raise_own(exc: ray.exceptions.RayTaskError) -> NoReturn:
    """A worker's own JobError or ManifestError in its words, without Ray's traceback; anything else as it came."""
    if isinstance(exc.cause, (JobError, ManifestError)):
        raise exc.cause from None
    raise exc


def _stall_message(run: Run, stall_seconds: float, ray_says: str) -> str:
    """What the run waits for: committed rows, the cluster's free resources, pending actors and tasks."""
    committed = run.total.rows
    parts = [f"run {run.plan.run_id}: no rows committed for {stall_seconds:.0f} s (--stall-seconds); "
             f"{committed} of {run.plan.rows_in} rows committed"]
    try:
        total, free = ray.cluster_resources(), ray.available_resources()
        parts.append("free on the cluster: " + ", ".join(f"{k} {free.get(k, 0):g} of {v:g}" for k, v in
                                                         sorted(total.items()) if k in ("CPU", "GPU")))
        alive = [n for n in ray.nodes() if n.get("Alive")]
        parts.append(f"{len(alive)} live node{'s' if len(alive) != 1 else ''}")
        from ray.util.state import list_actors, list_tasks
        job = ray.get_runtime_context().get_job_id()
        pending = collections.Counter(
            f"{a.class_name} actor {a.state.lower().replace('_', ' ')} (needs {a.required_resources})"
            for a in list_actors(filters=[("job_id", "=", job)], detail=True, limit=1000, raise_on_missing_output=False)
            if a.state in ("PENDING_CREATION", "RESTARTING", "DEPENDENCIES_UNREADY"))
        pending.update(
            f"{t.name} task {t.state.lower().replace('_', ' ')} (needs {t.required_resources})"
            for t in list_tasks(filters=[("job_id", "=", job)], detail=True, limit=10_000, raise_on_missing_output=False)
            if t.state in ("PENDING_NODE_ASSIGNMENT", "PENDING_ARGS_AVAIL") and t.required_resources)
        waiting = [f"{n} x {what}" for what, n in pending.most_common(6)]
        parts.append("waiting for: " + ("; ".join(waiting) if waiting else "nothing pending that Ray reports"))
    except Exception as exc:  # the report must not hide the stall
        parts.append(f"(cluster state unavailable: {exc})")
    running = [line.strip() for line in ray_says.splitlines() if line.strip().startswith("- ")]
    if running:
        parts.append("Ray Data's operators still running: " + "; ".join(x[2:] for x in running[:6]))
    return ". ".join(parts) + ". Its committed units are kept: run again with --resume when the cluster has room."
