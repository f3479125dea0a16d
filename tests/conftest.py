"""Shared test fixtures: a real moto S3 server over HTTP, small synthetic data and a small model.

The S3 server starts once per session and the standard AWS variables point at it, before
anything else (Ray included) starts, so every process reaches it exactly as it would reach
real S3. The code under test never knows it is talking to moto.
"""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass

import secrets
import tempfile

# Ray reads its authentication settings once, when it is imported: the session cluster's token
# must be in the environment before anything imports ray.
_AUTH_DIR = tempfile.mkdtemp(prefix="mlbatch-ray-auth-")
_TOKEN = os.path.join(_AUTH_DIR, "auth_token")
with open(_TOKEN, "w") as _f:
    _f.write(secrets.token_hex(32))
os.environ.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=_TOKEN)
os.environ.pop("RAY_AUTH_TOKEN", None)

import boto3  # noqa: E402
import pytest  # noqa: E402

from mlbatch.synth import SynthConfig, make_dataset  # noqa: E402
from procs import RAY  # noqa: E402

_bucket_ids = itertools.count()


@pytest.fixture(scope="session")
def s3_endpoint():
    """Start moto's HTTP server on 127.0.0.1 and point the AWS settings at it."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    saved = {k: os.environ.get(k) for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                                            "AWS_DEFAULT_REGION", "AWS_PROFILE", "AWS_ENDPOINT_URL_S3")}
    os.environ.update(AWS_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
                      AWS_DEFAULT_REGION="us-east-1")
    os.environ.pop("AWS_PROFILE", None)
    os.environ.pop("AWS_ENDPOINT_URL_S3", None)
    try:
        yield endpoint
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture
def bucket(s3_endpoint) -> str:
    """A new, empty bucket for one test: ``s3://name``."""
    name = f"mlbatch-test-{next(_bucket_ids)}"
    boto3.client("s3").create_bucket(Bucket=name)
    return f"s3://{name}"


SMALL_DATA = SynthConfig(train=240, val=80, test=60, seed=3)


@pytest.fixture(scope="session")
def small_dataset(tmp_path_factory) -> dict[str, str]:
    """A small synthetic dataset on local disk: {split: manifest path}."""
    return make_dataset(str(tmp_path_factory.mktemp("data")), SMALL_DATA)


@pytest.fixture(scope="session")
def small_model(small_dataset, tmp_path_factory) -> str:
    """A small model package trained for a few seconds: its local path."""
    from mlbatch.train import TrainConfig, train

    out = str(tmp_path_factory.mktemp("model") / "pkg")
    train(TrainConfig(manifests=[small_dataset["train"]], val_manifests=[small_dataset["val"]], output=out,
                      epochs=2, image_size=32, progress=False))
    return out


# ---- a real Ray cluster, once per session ---------------------------------------------------

def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class RayCluster:
    gcs_address: str
    dashboard_url: str
    env: dict  # what a client needs: token auth settings and the cluster address


@pytest.fixture(scope="session")
def ray_cluster(s3_endpoint, tmp_path_factory):
    """``ray start --head --block`` with token auth, in its own process group; ended by signalling that group.

    Started after the S3 server so its workers inherit the AWS settings, exactly as pods
    inherit them from their environment on a real cluster.
    """
    import shutil
    import signal
    import subprocess
    import time

    import ray

    base = tmp_path_factory.mktemp("ray")
    token = _TOKEN
    temp_dir = f"/tmp/mlbatch-ray-{os.getpid()}"  # short: Ray's socket paths have a length limit
    port, dash = _free_port(), _free_port()
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token),
           "RAY_DATA_DISABLE_PROGRESS_BARS": "1", "RAY_USAGE_STATS_ENABLED": "0"}
    log = open(base / "head.log", "w")
    head = subprocess.Popen(
        [*RAY, "start", "--head", "--block", f"--port={port}", f"--dashboard-port={dash}",
         "--dashboard-host=127.0.0.1", "--num-cpus=4", "--num-gpus=0", f"--temp-dir={temp_dir}",
         "--include-dashboard=true", "--disable-usage-stats",
         # ports of its own, not Ray's fixed defaults: another Ray on the machine (a developer's, or a run
         # that outlived its test) holding 52365 leaves this head's job agent without HTTP, and
         # `ray job submit` then answers "No available agent to submit job"
         f"--dashboard-agent-listen-port={_free_port()}", f"--ray-client-server-port={_free_port()}"],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    gcs = f"127.0.0.1:{port}"
    client_env = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token), "RAY_ADDRESS": gcs}
    saved = {k: os.environ.get(k) for k in client_env}
    os.environ.update(client_env)
    try:
        deadline = time.monotonic() + 90
        while True:
            if head.poll() is not None:
                raise RuntimeError(f"ray start exited with {head.returncode}: {(base / 'head.log').read_text()[-2000:]}")
            try:
                ray.init(address=gcs, logging_level="WARNING", log_to_driver=False)
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(1)
        yield RayCluster(gcs, f"http://127.0.0.1:{dash}", client_env)
    finally:
        ray.shutdown()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        try:
            os.killpg(head.pid, signal.SIGTERM)
            head.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait(timeout=30)
        except ProcessLookupError:
            pass
        try:  # workers of the group that outlived the head
            os.killpg(head.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


_SESSION = []


def pytest_sessionfinish(session, exitstatus):
    import shutil
    shutil.rmtree(_AUTH_DIR, ignore_errors=True)
    _SESSION.append(session)


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config):
    """End the test process with pytest's own exit status, without the interpreter's teardown.

    After a session of Ray drivers, Arrow's S3 clients, PyIceberg, DuckDB and torch in one process, the
    native libraries' destructors at interpreter exit race each other: CI once saw exit 139 after
    "266 passed" (apache/arrow#38352 is one such race). mlbatch releases its own S3 clients at exit
    (storage.release_clients), which is what a user's process needs; the test process, holding far
    more, ends here instead. Nothing is hidden: the status is pytest's, every fixture has finished.
    """
    import sys

    from mlbatch.core import storage

    if not _SESSION or os.environ.get("MLBATCH_TESTS_FULL_EXIT"):
        return
    storage.release_clients()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(int(_SESSION[0].exitstatus))
