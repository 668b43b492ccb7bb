"""A throwaway S3-compatible server for tests: moto's server on a free loopback port.

Like the servers in ``tests/services.py``: missing packages skip the tests that need it outside
CI and fail them in CI (``CI=true``), where the ``dev`` extra installs ``moto`` and ``s3fs``.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from tests.services import unavailable

REGION = "us-east-1"


@dataclass
class S3:
    """A running S3 endpoint: fsspec options for it and a boto3 client to look behind the store's back."""

    endpoint_url: str
    client: Any

    @property
    def storage_options(self) -> dict[str, Any]:
        """``SIMMIM_ARTIFACT_STORAGE_OPTIONS`` / ``SIMMIM_DATASET_STORAGE_OPTIONS`` for this server."""
        return {"endpoint_url": self.endpoint_url, "key": "testing", "secret": "testing",
                "client_kwargs": {"region_name": REGION}}

    def new_bucket(self) -> str:
        name = f"simmim-{uuid.uuid4().hex[:12]}"
        self.client.create_bucket(Bucket=name)
        return name

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        """Every object key in ``bucket`` under ``prefix``, sorted."""
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        return sorted(obj["Key"] for page in pages for obj in page.get("Contents", []))

    def read(self, bucket: str, key: str) -> bytes:
        data: bytes = self.client.get_object(Bucket=bucket, Key=key)["Body"].read()
        return data


@contextmanager
def s3_server() -> Iterator[S3]:
    """moto's S3 server in a thread of this process; yields its endpoint and a client."""
    try:
        import boto3
        import s3fs  # noqa: F401  (the artifact store's driver; checked here so the tests fail early)
        from moto.server import ThreadedMotoServer
    except ImportError as err:
        unavailable(f"an S3 test server needs moto[server] and s3fs ({err}); pip install -e '.[dev]'")
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        client = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="testing",
                              aws_secret_access_key="testing", region_name=REGION)
        yield S3(endpoint, client)
    finally:
        server.stop()
