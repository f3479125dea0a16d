"""Shared test fixtures: a real moto S3 server over HTTP, small synthetic data and a small model.

The S3 server starts once per session and the standard AWS variables point at it, before
anything else (Ray included) starts, so every process reaches it exactly as it would reach
real S3. The code under test never knows it is talking to moto.
"""

from __future__ import annotations

import itertools
import os

import boto3
import pytest

from mlbatch.synth import SynthConfig, make_dataset

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
