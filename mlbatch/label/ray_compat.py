"""Every private Ray name mlbatch uses, behind one door, each checked once at start-up.

mlbatch pins Ray to the minor version these names were read from (``ray[data,default]==2.60.*``
in ``pyproject.toml``). Each name below says what it is for and what happens without it; a name
that a Ray release lacks is reported once, as a warning naming it and its cost, and the run goes
on without it: never a silent no-op. To move to the next Ray: read each name against the new
release's source, run ``tests/test_ray_compat.py`` (one test per name) and the suite, then move
the pin.

Public settings are used where they serve: the stall limit is Ray Data's own
``DataContext.execution_no_progress_timeout_s`` (``stall_settings``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterator

if TYPE_CHECKING:   # Ray is imported where it is used: choosing the engine reads `address_record` without it
    import ray

log = logging.getLogger(__name__)

# DataContext field. Ray Data pauses a streaming task after it has yielded 2 x this many blocks
# nobody has taken yet. The split of a unit yields many tiny blocks, and paused it holds a CPU
# that the decode tasks need: on a 2-CPU node labeling started ~7 s late. The blocks are a few
# KiB each, so mlbatch lets it run to the end (None).
STREAMING_GEN_BUFFER = "_max_num_blocks_in_streaming_gen_buffer"
# Dataset attribute: the executor of the dataset's running iteration (set once a first result came).
CURRENT_EXECUTOR = "_current_executor"
# StreamingExecutor attribute: its operators (and their states).
TOPOLOGY = "_topology"
# MapOperator attribute: a BlockStats (~0.5 KiB) for every block the operator has output, kept for
# Dataset.stats(): at 256-row blocks a billion rows would hold several GB in the driver.
OUTPUT_BLOCK_STATS = "_output_blocks_stats"
# ray._private.services function: the address of the instance `ray start` last made on this machine (from
# its record in Ray's temporary folder), which ``ray.init()`` connects to; None without one.
BOOTSTRAP = "find_bootstrap_address"
# Where that record lives (ray._common.utils.get_ray_address_file): read here without importing Ray, so that
# `--engine auto` on a machine without Ray does not pay Ray's import (~1 s) to learn that.
ADDRESS_RECORD = "get_ray_address_file"

_MEMORY = "Ray Data's per-block statistics are kept, so the driver's memory grows with the blocks of a run"


@dataclass(frozen=True)
class PrivateName:
    """A private Ray name, where it lives, and what a run does without it."""

    name: str
    where: str
    present: Callable[[], bool]
    without: str


def _code_names(load: Callable[[], Any]) -> set[str]:
    """The names a Ray function's code uses (attributes it sets included); empty if it cannot be imported."""
    try:
        return set(load().__code__.co_names)
    except (ImportError, AttributeError):
        return set()


def _streaming_executor_execute() -> Any:
    from ray.data._internal.execution.streaming_executor import StreamingExecutor
    return StreamingExecutor.execute


def _map_operator_init() -> Any:
    from ray.data._internal.execution.operators.map_operator import MapOperator
    return MapOperator.__init__


def _services() -> Any:
    from ray._private import services
    return services


_NO_WARM_START = ("`--engine auto` does not see a Ray instance started with `ray start` on this machine, and labels "
                  "locally unless RAY_ADDRESS is set")


def address_record() -> str:
    """The file in which `ray start` records its address (Ray's default temporary folder; checked in ``check``)."""
    base = os.environ.get("RAY_TMPDIR") or (os.environ.get("TMPDIR") if sys.platform.startswith("linux") else None)
    return os.path.join(base or "/tmp", "ray", "ray_current_cluster")


def _ray_address_record() -> str | None:
    from ray._common import utils
    get = getattr(utils, ADDRESS_RECORD, None)
    return get(None) if callable(get) else None


def running_instance() -> str | None:
    """The address of the Ray instance running on this machine that ``ray.init()`` would join, or None.

    Ray is imported only when the record exists. Only this name is checked here (not ``check()``, which
    imports Ray Data), so choosing the engine stays quick.
    """
    if not os.path.exists(address_record()):
        return None
    find = getattr(_services(), BOOTSTRAP, None)
    if not callable(find):
        import ray
        log.warning("Ray %s lacks ray._private.services.%s, which mlbatch uses (read from Ray 2.60): %s",
                    ray.__version__, BOOTSTRAP, _NO_WARM_START)
        return None
    return find(None)


def private_names() -> list[PrivateName]:
    """Every private Ray name mlbatch uses, with its check."""
    import ray
    return [
        PrivateName(STREAMING_GEN_BUFFER, "ray.data.DataContext",
                    lambda: hasattr(ray.data.DataContext.get_current(), STREAMING_GEN_BUFFER),
                    "split-layout runs on small nodes may start labeling a few seconds late"),
        PrivateName(CURRENT_EXECUTOR, "ray.data.Dataset.__init__",
                    lambda: CURRENT_EXECUTOR in _code_names(lambda: ray.data.Dataset.__init__), _MEMORY),
        PrivateName(TOPOLOGY, "StreamingExecutor.execute",
                    lambda: TOPOLOGY in _code_names(_streaming_executor_execute), _MEMORY),
        PrivateName(OUTPUT_BLOCK_STATS, "MapOperator.__init__",
                    lambda: OUTPUT_BLOCK_STATS in _code_names(_map_operator_init), _MEMORY),
        PrivateName(BOOTSTRAP, "ray._private.services", lambda: callable(getattr(_services(), BOOTSTRAP, None)),
                    _NO_WARM_START),
        PrivateName(ADDRESS_RECORD, "ray._common.utils", lambda: _ray_address_record() == address_record(),
                    _NO_WARM_START),
    ]


_missing: list[str] | None = None


def check(force: bool = False) -> list[str]:
    """The private names this Ray lacks (each logged once per process, with what it costs)."""
    global _missing
    if _missing is None or force:
        import ray
        _missing = []
        for p in private_names():
            if not p.present():
                log.warning("Ray %s lacks %s.%s, which mlbatch uses (read from Ray 2.60): %s", ray.__version__,
                            p.where, p.name, p.without)
                _missing.append(p.name)
    return _missing


def stall_settings(stall_seconds: float) -> dict[str, Any]:
    """``--stall-seconds`` (checked by ``config.check_choices``) as Ray Data's public no-progress limit: 0
    (never) is -1, anything else as given."""
    return {"execution_no_progress_timeout_s": float(stall_seconds) if stall_seconds > 0 else -1.0}


@contextlib.contextmanager
def data_context(progress: bool, stall_seconds: float) -> Iterator[None]:
    """Ray Data's context for one run (progress bars, the stall limit, the private buffer), put back after."""
    settings: dict[str, Any] = {"enable_progress_bars": progress, **stall_settings(stall_seconds),
                                # a worker's ManifestError reaches the driver as itself, not as Ray Data's
                                # "UDF failed to process a data block" (pipeline._stream reports it)
                                "raise_original_map_exception": True}
    if STREAMING_GEN_BUFFER not in check():
        settings[STREAMING_GEN_BUFFER] = None
    import ray
    ctx = ray.data.DataContext.get_current()
    old = {name: getattr(ctx, name) for name in settings}
    for name, value in settings.items():
        setattr(ctx, name, value)
    try:
        yield
    finally:
        for name, value in old.items():
            setattr(ctx, name, value)


def forget_block_stats(ds: ray.data.Dataset) -> int:
    """Drop the per-block statistics the running iteration of ``ds`` keeps in the driver; how many.

    A labeling run keeps its own statistics per unit (``stats``), so these are dropped as
    results come in (the executor's final ``stats()`` then covers only the last blocks).
    """
    if {CURRENT_EXECUTOR, TOPOLOGY, OUTPUT_BLOCK_STATS} & set(check()):
        return 0
    executor = getattr(ds, CURRENT_EXECUTOR, None)
    dropped = 0
    for op in getattr(executor, TOPOLOGY, None) or {}:
        kept = getattr(op, OUTPUT_BLOCK_STATS, None)
        if isinstance(kept, list):
            dropped += len(kept)
            kept.clear()
    return dropped
