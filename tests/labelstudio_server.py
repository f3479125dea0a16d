"""A real Label Studio server for the tests, in its own virtual environment and process group.

Label Studio's pins clash with mlbatch's, so it lives in its own venv, made on first use in
``~/.cache/mlbatch-tests/label-studio-<version>`` (``python -m venv`` + ``pip install
label-studio==<version>``, about a minute; ``MLBATCH_LABEL_STUDIO_PYTHON`` may name the python of an
existing installation instead). The server gets a free port on 127.0.0.1, its own data folder, and
its user and API token from Label Studio's own environment variables; it is ended by signalling
its process group, never by name.
"""

from __future__ import annotations

import fcntl
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import requests

VERSION = "1.23.2"
USER = "mlbatch@localhost"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def label_studio_python() -> str:
    """The python of a Label Studio installation, installing the pinned version on first use."""
    given = os.environ.get("MLBATCH_LABEL_STUDIO_PYTHON")
    if given:
        return given
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "mlbatch-tests"
    venv = cache / f"label-studio-{VERSION}"
    python = venv / "bin" / "python"
    done = venv / ".installed"
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / f"label-studio-{VERSION}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)   # two test sessions at once: one installs, the other waits
        if not done.exists():   # absent, or a previous install was interrupted: start again
            shutil.rmtree(venv, ignore_errors=True)
            subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
            subprocess.run([str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                            f"label-studio=={VERSION}"], check=True, timeout=1800)
            done.write_text(VERSION + "\n")
    return str(python)


@dataclass
class Server:
    url: str
    token: str
    process: subprocess.Popen
    log: Path

    def stop(self) -> None:
        """SIGTERM to the server's process group, SIGKILL if it lingers."""
        try:
            os.killpg(self.process.pid, signal.SIGTERM)
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=20)
        except ProcessLookupError:
            pass


def start(data_dir: Path, timeout: float = 400.0) -> Server:
    """Start Label Studio on a free port with a fresh data folder; returns once /health answers."""
    python = label_studio_python()
    port = _free_port()
    token = secrets.token_hex(20)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "RAY_"))}
    env.update(LABEL_STUDIO_USERNAME=USER, LABEL_STUDIO_PASSWORD=secrets.token_hex(12), LABEL_STUDIO_USER_TOKEN=token,
               LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN="true", LABEL_STUDIO_BASE_DATA_DIR=str(data_dir),
               LABEL_STUDIO_LATEST_VERSION_CHECK="false", LABEL_STUDIO_COLLECT_ANALYTICS="false",
               SENTRY_DSN="", FRONTEND_SENTRY_DSN="")
    log = data_dir / "server.log"
    with open(log, "w") as out:
        process = subprocess.Popen(
            [python, "-m", "label_studio.server", "start", "--no-browser", "--internal-host", "127.0.0.1",
             "--port", str(port), "--data-dir", str(data_dir), "--enable-legacy-api-token"],
            env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, cwd=data_dir)
    server = Server(f"http://127.0.0.1:{port}", token, process, log)
    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"label-studio exited with {process.returncode}: {log.read_text()[-3000:]}")
        try:
            if requests.get(f"{server.url}/api/projects", headers={"Authorization": f"Token {token}"},
                            timeout=5).status_code == 200:
                return server
        except requests.RequestException:
            pass
        if time.monotonic() > deadline:
            server.stop()
            raise RuntimeError(f"label-studio did not answer within {timeout:.0f}s: {log.read_text()[-3000:]}")
        time.sleep(1)
