"""Killing a command at a chosen moment: what the kill-and-resume tests share."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from typing import Callable


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
