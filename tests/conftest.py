"""Shared fixtures: a real PostgreSQL 15 server for the session, and archive databases.

The server runs from the Debian packages (``postgresql-15``) as user ``postgres`` in a
temporary directory, listening on 127.0.0.1 at a port the OS picks, with its unix socket
in the same directory. Missing binaries fail the tests that need it (never skip).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pydicom
import pytest

# Every node a test starts serves its web side on a port the OS picks, never the default
# 8042 (a test that needs a fixed port passes --web-port).
os.environ["LATENTPACS_WEB_PORT"] = "0"

PG_BIN = Path("/usr/lib/postgresql/15/bin")
PG_USER = "postgres"
START_TIMEOUT_S = 60.0
BIND_ATTEMPTS = 3


def _as_postgres(*command: str | Path) -> list[str]:
    return ["runuser", "-u", PG_USER, "--", *map(str, command)]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _admin(port: int) -> psycopg.Connection:
    return psycopg.connect(host="127.0.0.1", port=port, user=PG_USER, dbname="postgres",
                           autocommit=True, connect_timeout=5)


def _wait_until_answering(server: subprocess.Popen[bytes], port: int, log: Path, since: int) -> bool:
    """Poll ``port`` until the server answers (True), or until it exits because its port
    is taken (False, read from ``log`` past byte ``since``); fail on any other exit or
    after ``START_TIMEOUT_S``."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        try:
            _admin(port).close()
            return True
        except psycopg.OperationalError:
            if server.poll() is not None:
                if b"could not bind" in log.read_bytes()[since:]:
                    return False
                pytest.fail(f"PostgreSQL did not start: {log.read_text()}")
            if time.monotonic() > deadline:
                pytest.fail(f"PostgreSQL did not start within {START_TIMEOUT_S:.0f} s: {log.read_text()}")
            time.sleep(0.2)


@dataclass(frozen=True)
class PostgresCluster:
    """A running throw-away PostgreSQL 15 cluster."""

    port: int
    root: Path
    proc: subprocess.Popen[bytes]


@contextmanager
def postgres_cluster(prefix: str, settings: Sequence[str],
                     wrap: Callable[[list[str]], list[str]] = list) -> Iterator[PostgresCluster]:
    """initdb a cluster in a temporary directory, run ``postgres`` (``-c`` each of
    ``settings``; ``wrap`` may prefix the command, e.g. with strace), wait until it
    answers, and stop it and remove the directory afterwards."""
    for tool in ("initdb", "postgres", "pg_ctl"):
        if not (PG_BIN / tool).is_file():
            pytest.fail(f"{PG_BIN / tool} is required: apt-get install postgresql-15")
    if shutil.which("runuser") is None:
        pytest.fail("runuser is required: apt-get install util-linux")
    root = Path(tempfile.mkdtemp(prefix=prefix))
    shutil.chown(root, PG_USER, PG_USER)
    data = root / "data"
    subprocess.run(
        _as_postgres(PG_BIN / "initdb", "-D", data, "-U", PG_USER, "--auth=trust",
                     "--encoding=UTF8", "--locale=C", "--no-sync"),
        check=True, capture_output=True, timeout=120,
    )
    options = [item for setting in settings for item in ("-c", setting)]
    log = (root / "server.log").open("wb")
    server: subprocess.Popen[bytes] | None = None
    try:
        # The port is the OS's pick, probed and closed before postgres binds it: another
        # process (a second pytest worker, an outgoing connection) may take it in between.
        # A postgres that exits because the port is in use is started again on a new one.
        for attempt in range(BIND_ATTEMPTS):
            port = _free_port()
            since = (root / "server.log").stat().st_size
            server = subprocess.Popen(
                wrap(_as_postgres(PG_BIN / "postgres", "-D", data, "-h", "127.0.0.1", "-p", str(port),
                                  "-k", root, *options)),
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            )
            if _wait_until_answering(server, port, root / "server.log", since):
                break
            server.wait(timeout=30)
            if attempt + 1 == BIND_ATTEMPTS:
                pytest.fail(f"PostgreSQL found no free port in {BIND_ATTEMPTS} attempts: "
                            f"{(root / 'server.log').read_text()}")
        assert server is not None
        yield PostgresCluster(port=port, root=root, proc=server)
    finally:
        subprocess.run(_as_postgres(PG_BIN / "pg_ctl", "stop", "-D", data, "-m", "fast", "-w"),
                       capture_output=True, timeout=60)
        if server is not None:
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait(timeout=30)
        log.close()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[int]:
    """Start a throw-away PostgreSQL 15 cluster; yields its port, stops it at session end."""
    with postgres_cluster("latentpacs-pg-", ("fsync=off", "synchronous_commit=off",
                                             "full_page_writes=off")) as cluster:
        yield cluster.port


@pytest.fixture(scope="session")
def postgres_url(postgres_server: int) -> str:
    """URL of the database ``latentpacs`` on the session's PostgreSQL server."""
    with _admin(postgres_server) as admin:
        admin.execute("CREATE DATABASE latentpacs")
    return f"postgresql+psycopg://{PG_USER}@127.0.0.1:{postgres_server}/latentpacs"


@pytest.fixture(params=["sqlite", "postgresql"])
def archive_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh, empty archive database per test: a SQLite file, or a new PostgreSQL database."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'archive.db'}"
        return
    port = request.getfixturevalue("postgres_server")
    name = f"test_{uuid.uuid4().hex}"
    with _admin(port) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    yield f"postgresql+psycopg://{PG_USER}@127.0.0.1:{port}/{name}"
    with _admin(port) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def phantom_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """12 small phantom mammograms of 3 or more patients (the training tests' data)."""
    from latentpacs import phantom

    root = tmp_path_factory.mktemp("phantoms")
    paths = phantom.generate(root, 12, 7, size=(128, 104), studies_per_patient=1)
    patients = {pydicom.dcmread(p, stop_before_pixels=True).PatientID for p in paths}
    if len(patients) < 3:
        pytest.fail(f"phantom generator made {len(patients)} patients; the tests need 3")
    return root
