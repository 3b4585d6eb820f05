"""A local S3 (moto's server mode on 127.0.0.1, a free port) for tests that need `s3://` URLs.

Use the context manager `moto_s3()` or the pytest fixture `s3` (import it into a test module:
`from s3_server import s3`; test modules outside `tests/` put that folder on `sys.path` first).
Fake credentials are set in the environment, so no real account is ever reached. Readers and
writers get the endpoint through `storage_options` (`endpoint.storage_options`) or through the
`BATCHV4_S3_ENDPOINT` environment variable (`endpoint.env`).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

FAKE_AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


@dataclass(frozen=True)
class S3Endpoint:
    endpoint_url: str
    bucket: str
    storage_options: dict = field(default_factory=dict)

    def url(self, key: str = "") -> str:
        return f"s3://{self.bucket}/{key.lstrip('/')}"

    @property
    def env(self) -> dict[str, str]:
        return {"BATCHV4_S3_ENDPOINT": self.endpoint_url}


@contextlib.contextmanager
def _patched_env(values: dict[str, str]) -> Iterator[None]:
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def moto_s3(bucket: str = "batchv4-test", set_env: bool = True) -> Iterator[S3Endpoint]:
    """Start moto's S3 server, create `bucket`, yield its endpoint; stop the server on exit."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one access-log line per request otherwise
    env = _patched_env(FAKE_AWS_ENV) if set_env else contextlib.nullcontext()
    with env:
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        try:
            host, port = server.get_host_and_port()
            endpoint = f"http://{host}:{port}"
            options = {"client_kwargs": {"endpoint_url": endpoint}, "skip_instance_cache": True}
            import s3fs

            s3fs.S3FileSystem(**options).mkdir(bucket)
            yield S3Endpoint(endpoint, bucket, options)
        finally:
            server.stop()


@pytest.fixture
def s3(monkeypatch: pytest.MonkeyPatch) -> Iterator[S3Endpoint]:
    for k, v in FAKE_AWS_ENV.items():
        monkeypatch.setenv(k, v)
    with moto_s3(set_env=False) as endpoint:
        yield endpoint
