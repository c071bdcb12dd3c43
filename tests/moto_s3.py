"""A moto S3 server on localhost for tests of stores on object storage (the tests' own fixtures start it)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import fsspec
import pytest

CREDENTIALS = {"key": "testing", "secret": "testing"}  # for processes that do not see this one's environment


@contextmanager
def moto_s3(bucket: str) -> Iterator[dict]:
    """A moto S3 server on a free localhost port with `bucket`; yields fsspec options that reach it (credentials
    included, so that a Ray replica started meanwhile reaches it too)."""
    from moto.server import ThreadedMotoServer

    with pytest.MonkeyPatch.context() as env:
        for name, value in {
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_EC2_METADATA_DISABLED": "true",
        }.items():
            env.setenv(name, value)
        env.delenv("AWS_PROFILE", raising=False)
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        host, port = server.get_host_and_port()
        options = {"endpoint_url": f"http://{host}:{port}", "skip_instance_cache": True} | CREDENTIALS
        fsspec.filesystem("s3", **options).mkdir(bucket)
        try:
            yield options
        finally:
            server.stop()
