"""Processes the tests start: Ray's command line, and killing a command at a chosen moment."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from typing import Callable

# Ray's command line through this interpreter, not whatever ``ray`` is first on PATH: in a virtual
# environment made with --system-site-packages, Ray itself may come from the system, whose ``ray`` script
# would start nodes (and their workers) on the system's Python, without this checkout's mlbatch.
RAY = [sys.executable, "-m", "ray.scripts.scripts"]


def kill_when(args: list[str], env: dict, ready: Callable[[], bool], poll: float = 0.1, timeout: float = 240) -> None:
    """Run ``args`` in its own process group and SIGKILL the whole group once ``ready()`` is true.

    Fails if the command ends first (it must be killed mid-run) or ``ready`` never comes true.
    """
    proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + timeout
        while not ready():
            assert proc.poll() is None, f"the run ended before it was killed: {proc.stdout.read().decode()[-2000:]}"
            assert time.monotonic() < deadline, "the run did not get there"
            time.sleep(poll)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
