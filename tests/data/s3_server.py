"""A real S3-compatible object store for the tests: moto's threaded server on 127.0.0.1 (a free port, plain http), with
one bucket; the environment points boto3 and litdata at it (AWS_ENDPOINT_URL, dummy credentials)."""

from __future__ import annotations

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
        from hpa_lightning.bench.loopback_s3 import LOOPBACK_CREDENTIALS

        return {"AWS_ENDPOINT_URL": self.endpoint, **LOOPBACK_CREDENTIALS}

    def url(self, prefix: str) -> str:
        return f"s3://{self.bucket}/{prefix}"


@pytest.fixture(scope="module")
def s3_server() -> Iterator[S3Server]:
    """moto's ThreadedMotoServer on 127.0.0.1 with a bucket (hpa_lightning/bench/loopback_s3.py, which the benchmark
    uses too); the process environment set for it, restored after."""
    pytest.importorskip("moto.server")
    from hpa_lightning.bench.loopback_s3 import loopback_s3

    with loopback_s3(BUCKET) as endpoint:
        yield S3Server(endpoint=endpoint, bucket=BUCKET)
