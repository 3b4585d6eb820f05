"""A local S3 (moto's server mode on 127.0.0.1, a free port) for tests that need `s3://` URLs.

Use the context manager `moto_s3()` or the pytest fixture `s3` (import it into a test module with
`from s3_server import moto_endpoint, s3`; test modules outside `tests/` put that folder on `sys.path` first).
Fake credentials are set in the environment, so no real account is ever reached. Readers and
writers get the endpoint through `storage_options` (`endpoint.storage_options`) or through the
`BATCHV4_S3_ENDPOINT` environment variable (`endpoint.env`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import urllib.request
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


def _reset(endpoint: str) -> None:
    # moto keeps its state per process, not per server: start every use from an empty store.
    req = urllib.request.Request(f"{endpoint}/moto-api/reset", method="POST")
    with urllib.request.urlopen(req, timeout=10):
        pass


def _endpoint(endpoint: str, bucket: str) -> S3Endpoint:
    import s3fs

    _reset(endpoint)
    options = {"client_kwargs": {"endpoint_url": endpoint}}
    fs = s3fs.S3FileSystem(**options)  # fsspec caches this instance: later opens reuse it
    fs.invalidate_cache()
    fs.mkdir(bucket)
    return S3Endpoint(endpoint, bucket, options)


@contextlib.contextmanager
def moto_server() -> Iterator[str]:
    """Run moto's server on 127.0.0.1 (a free port); yield its endpoint URL."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one access-log line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        yield f"http://{host}:{port}"
    finally:
        server.stop()


@contextlib.contextmanager
def moto_s3(bucket: str = "batchv4-test", set_env: bool = True) -> Iterator[S3Endpoint]:
    """A fresh moto S3 with an empty `bucket`; fake credentials are set while it runs."""
    env = _patched_env(FAKE_AWS_ENV) if set_env else contextlib.nullcontext()
    with env, moto_server() as endpoint:
        yield _endpoint(endpoint, bucket)


@pytest.fixture(scope="session")
def moto_endpoint() -> Iterator[str]:
    with moto_server() as endpoint:
        yield endpoint


@pytest.fixture
def s3(moto_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> S3Endpoint:
    """An empty bucket on a session-wide moto server, with fake credentials in the environment.
    Modules that import `s3` must import `moto_endpoint` too."""
    for k, v in FAKE_AWS_ENV.items():
        monkeypatch.setenv(k, v)
    return _endpoint(moto_endpoint, "batchv4-test")
