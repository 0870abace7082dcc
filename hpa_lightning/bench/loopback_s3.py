"""A real S3-compatible object store on this machine: moto's threaded server on 127.0.0.1 (a free port, plain http),
for the streaming benchmark (section 10) and the tests (tests/data/s3_server.py). moto is the dev extra's."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from unittest import mock

LOOPBACK_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "loopback", "AWS_SECRET_ACCESS_KEY": "loopback",
                        "AWS_DEFAULT_REGION": "us-east-1"}


@contextlib.contextmanager
def loopback_s3(bucket: str) -> Iterator[str]:
    """moto's S3 server on 127.0.0.1 (a free port, plain http) with `bucket`, the process environment pointed at it
    (AWS_ENDPOINT_URL and dummy credentials, restored after); yields the endpoint."""
    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto's server logs every request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    env = {"AWS_ENDPOINT_URL": endpoint, **LOOPBACK_CREDENTIALS}
    try:
        with mock.patch.dict(os.environ, env):
            boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=bucket)
            yield endpoint
    finally:
        server.stop()
