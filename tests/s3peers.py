"""A real S3 API server on loopback for the object-store tests: ``moto_server``.

``moto[server]`` (a test dependency) installs ``moto_server`` beside the virtualenv's
Python; it is started as a separate process on an OS-assigned free port, polled over HTTP
until it answers (no fixed sleeps) and stopped by its PID (:func:`netpeers._stop`). A
missing ``moto_server`` fails the test, under ``CI=true`` or not, never a skip. moto keeps
its buckets in memory only: a server started again on the same port is empty, and
:func:`start_moto` creates the bucket on every start.
"""

from __future__ import annotations

import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from netpeers import HOST, START_TIMEOUT_S, _fail_if_exited, _log_tail, _spawn, _Stoppable, free_port

#: Credentials moto accepts (any); the tests pass them as settings or AWS_* variables.
ACCESS_KEY_ID = "testing"
SECRET_ACCESS_KEY = "testing-secret"
REGION = "us-east-1"
BUCKET = "latentpacs-test"


def moto_server() -> Path:
    """Path of ``moto_server``; fails the test (never skips) when it is not installed."""
    path = Path(sys.executable).parent / "moto_server"
    if not path.is_file():
        pytest.fail(f"{path} is required: pip install -e '.[test]' (moto[server])")
    return path


@dataclass(frozen=True)
class S3Server(_Stoppable):
    """A running ``moto_server`` on loopback with :data:`BUCKET` created."""

    port: int
    proc: Any
    log: Path

    @property
    def endpoint(self) -> str:
        """The server's URL, for ``archive.s3_endpoint``."""
        return f"http://{HOST}:{self.port}"

    def client(self) -> Any:
        """A boto3 S3 client on this server (for the test's own look at the bucket)."""
        import boto3

        return boto3.session.Session().client(
            "s3", endpoint_url=self.endpoint, region_name=REGION,
            aws_access_key_id=ACCESS_KEY_ID, aws_secret_access_key=SECRET_ACCESS_KEY)

    def keys(self, prefix: str = "") -> list[str]:
        """Every object key in :data:`BUCKET` under ``prefix``, sorted."""
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=BUCKET,
                                                                          Prefix=prefix)
        return sorted(item["Key"] for page in pages for item in page.get("Contents", []))


def _answers(endpoint: str) -> bool:
    try:
        with urllib.request.urlopen(endpoint + "/", timeout=2.0) as response:
            return bool(response.status)
    except urllib.error.HTTPError:
        return True  # an HTTP answer, whatever its status
    except OSError:
        return False


def start_moto(workdir: Path, *, port: int | None = None,
               timeout: float = START_TIMEOUT_S) -> S3Server:
    """Start ``moto_server`` on ``port`` (default: a free one), poll it, create the bucket.

    The log, ``moto.log`` in ``workdir``, is appended across restarts.
    """
    port = port or free_port()
    log = workdir / "moto.log"
    proc = _spawn([moto_server(), "-H", HOST, "-p", str(port)], log)
    server = S3Server(port=port, proc=proc, log=log)
    try:
        deadline = time.monotonic() + timeout
        pause = 0.05
        while not _answers(server.endpoint):
            _fail_if_exited(proc, "moto_server", log)
            if time.monotonic() > deadline:
                pytest.fail(f"moto_server gave no HTTP answer on port {port} within "
                            f"{timeout:.0f} s:\n{_log_tail(log)}")
            time.sleep(pause)
            pause = min(pause * 1.5, 0.25)
        server.client().create_bucket(Bucket=BUCKET)
    except BaseException:
        server.stop()
        raise
    return server
