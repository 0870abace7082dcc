"""A real S3-compatible object store for the tests: moto's threaded server on 127.0.0.1 (a free port, plain http), with
one bucket; the environment points boto3 and litdata at it (AWS_ENDPOINT_URL, dummy credentials)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

BUCKET = "hpa-test"


@dataclass(frozen=True)
class S3Server:
    endpoint: str
    bucket: str

    def env(self) -> dict[str, str]:
        """What a subprocess needs to reach the server."""
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
                "AWS_DEFAULT_REGION": "us-east-1"}

    def url(self, prefix: str) -> str:
        return f"s3://{self.bucket}/{prefix}"


@pytest.fixture(scope="module")
def s3_server() -> Iterator[S3Server]:
    """moto's ThreadedMotoServer on 127.0.0.1, a bucket created; the process environment set for it (restored
    after)."""
    boto3 = pytest.importorskip("boto3")
    moto_server = pytest.importorskip("moto.server")
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    s3 = S3Server(endpoint=f"http://{host}:{port}", bucket=BUCKET)
    saved = {key: os.environ.get(key) for key in s3.env()}
    os.environ.update(s3.env())
    try:
        boto3.client("s3", endpoint_url=s3.endpoint).create_bucket(Bucket=BUCKET)
        yield s3
    finally:
        server.stop()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
