"""Which engine labels: Ray Data on a cluster, or the local engine on this machine alone.

``--engine auto`` (the default) chooses Ray wherever Ray is already there to use, and local
otherwise, where starting Ray would cost ~12 s of every run and give nothing back:

- ``ray`` when this process is already connected to Ray, when ``RAY_ADDRESS`` names a cluster
  (``ray job submit`` sets it for its entrypoints, KubeRay for its jobs), or when a Ray instance
  is running on this machine (``ray start``): the run uses that instance, a warm start, and says so;
- ``local`` otherwise: one process tree, no Ray start-up, the same output (``local``).
"""

from __future__ import annotations

import logging
import os
import socket
import sys

log = logging.getLogger(__name__)

ADDRESS_VARIABLE = "RAY_ADDRESS"


def _connected() -> bool:
    ray = sys.modules.get("ray")   # never import Ray only to learn that nothing uses it
    return ray is not None and ray.is_initialized()


def _listening(address: str, timeout: float = 1.0) -> bool:
    """Whether something accepts connections at ``host:port`` (a stale record names a dead instance)."""
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host or "127.0.0.1", int(port)), timeout=timeout):
            return True
    except (OSError, ValueError):
        return False


def choose_engine(requested: str) -> tuple[str, str]:
    """The engine for ``--engine requested`` and why, in words for the log and the summary."""
    if requested != "auto":   # local or ray: ``config.check_choices`` refused anything else
        return requested, f"--engine {requested}"
    if _connected():
        return "ray", "this process is already connected to Ray"
    if os.environ.get(ADDRESS_VARIABLE):
        return "ray", f"{ADDRESS_VARIABLE} is set ({os.environ[ADDRESS_VARIABLE]})"
    address = _running()
    if address:
        return "ray", f"a Ray instance is running on this machine ({address})"
    return "local", f"no Ray cluster given ({ADDRESS_VARIABLE} unset) and none running on this machine"


def _running() -> str | None:
    """The address of the live Ray instance ``ray start`` made on this machine, or None."""
    from . import ray_compat

    address = ray_compat.running_instance()
    return address if address and _listening(address) else None


def connect_ray() -> None:
    """Connect to the Ray that ``choose_engine`` found, or start one for this run, and say which."""
    import ray

    if ray.is_initialized():
        return
    found = os.environ.get(ADDRESS_VARIABLE) or _running()
    # Ray's own search (RAY_ADDRESS, then the instance `ray start` made) where there is something to find;
    # "local" starts one without following a record that a killed instance left behind
    ray.init(address=None if found else "local", logging_level=logging.WARNING)
    where = ray.get_runtime_context().gcs_address
    if found:
        log.info("using the Ray instance already running at %s (a warm start: no Ray started for this run)", where)
    else:
        log.info("started a Ray instance for this run at %s; it ends with the run", where)
