"""DICOM TLS (PS3.15 B.1, B.9): the node behind a server certificate, driven by DCMTK ``+tls``.

A CA, a server certificate and client certificates are made with the ``openssl`` CLI in a
temporary folder. The node is started by hand (the harness's readiness probe speaks plain
TCP) and polled with ``echoscu +tls`` until it answers; it is stopped by its PID.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from dicomtools import require
from latentpacs import phantom
from latentpacs.config import load_config
from latentpacs.errors import ConfigError, Status
from netpeers import HOST, SCU_TIMEOUT_S, dimse_responses
from test_node import write_config

START_TIMEOUT_S = 60.0


def _openssl(*args: str | Path) -> None:
    subprocess.run([require("openssl"), *map(str, args)], check=True, capture_output=True,
                   timeout=60, stdin=subprocess.DEVNULL)


def _ca(folder: Path, name: str) -> tuple[Path, Path]:
    key, cert = folder / f"{name}.key", folder / f"{name}.pem"
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", cert,
             "-days", "2", "-subj", f"/CN={name}", "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    return key, cert


def _signed(folder: Path, name: str, ca: tuple[Path, Path]) -> tuple[Path, Path]:
    key, csr, cert = folder / f"{name}.key", folder / f"{name}.csr", folder / f"{name}.pem"
    extensions = folder / f"{name}.ext"
    extensions.write_text("basicConstraints=CA:FALSE\nsubjectAltName=IP:127.0.0.1,DNS:localhost\n")
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", csr,
             "-subj", f"/CN={name}")
    _openssl("x509", "-req", "-in", csr, "-CA", ca[1], "-CAkey", ca[0], "-CAcreateserial",
             "-out", cert, "-days", "2", "-extfile", extensions)
    return key, cert


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    """CA, server and client key/certificate pairs, plus a client from a CA the node does not trust."""
    folder = tmp_path_factory.mktemp("pki")
    ca = _ca(folder, "ca")
    rogue_ca = _ca(folder, "rogue-ca")
    return {"ca": ca, "server": _signed(folder, "server", ca),
            "client": _signed(folder, "client", ca),
            "rogue": _signed(folder, "rogue", rogue_ca)}


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return phantom.generate(tmp_path_factory.mktemp("phantoms"), 2, seed=5, size=(64, 52))


def _tls_args(pki: dict[str, tuple[Path, Path]], client: str | None) -> list[str]:
    """DCMTK TLS options: ``+tls KEY CERT`` (or ``+tla``: no certificate) trusting our CA."""
    identity = ["+tls", *map(str, pki[client])] if client else ["+tla"]
    return [*identity, "+cf", str(pki["ca"][1])]


def _scu(tool: str, port: int, args: Sequence[str], files: Sequence[Path] = ()) -> subprocess.CompletedProcess[str]:
    return subprocess.run([require(tool), "-d", "-to", "10", "-ta", "10", "-td", "10", *args,
                           "-aet", "TLSSCU", "-aec", "LATENTPACS", HOST, str(port),
                           *map(str, files)],
                          capture_output=True, text=True, timeout=SCU_TIMEOUT_S,
                          stdin=subprocess.DEVNULL)


def _start_tls_node(config: Path, tls_client: list[str]) -> tuple[subprocess.Popen[bytes], int]:
    script = Path(sys.executable).parent / "latentpacs"
    port_file, log = config.parent / "node.port", config.parent / "node.log"
    with log.open("ab") as handle:
        proc = subprocess.Popen([str(script), "--config", str(config), "serve", "--port", "0",
                                 "--port-file", str(port_file)], stdout=handle,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"}, cwd=config.parent)
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        if proc.poll() is not None:
            pytest.fail(f"node exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
        text = port_file.read_text() if port_file.exists() else ""
        if text.endswith("\n"):
            port = int(text)
            if _scu("echoscu", port, tls_client).returncode == 0:
                return proc, port
        if time.monotonic() > deadline:
            proc.kill()
            proc.wait(timeout=10)
            pytest.fail(f"TLS node did not answer C-ECHO:\n{log.read_text()[-4000:]}")
        time.sleep(0.2)


@pytest.fixture
def tls_node(tmp_path: Path, pki: dict[str, tuple[Path, Path]]) -> Iterator[int]:
    """A node with TLS that requires a client certificate from our CA; yields its port."""
    security = {"tls_cert": str(pki["server"][1]), "tls_key": str(pki["server"][0]),
                "tls_ca": str(pki["ca"][1]), "tls_require_client_cert": "true"}
    config = write_config(tmp_path, f"sqlite:///{tmp_path / 'a.db'}", security=security)
    proc, port = _start_tls_node(config, _tls_args(pki, "client"))
    yield port
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)


def test_storescu_over_tls_with_a_client_certificate(tls_node, pki, phantoms) -> None:
    stored = _scu("storescu", tls_node, _tls_args(pki, "client"), phantoms)
    assert [r.status for r in dimse_responses(stored)] == [Status.SUCCESS] * len(phantoms)
    found = _scu("findscu", tls_node, [*_tls_args(pki, "client"), "-S", "-k",
                                        "QueryRetrieveLevel=IMAGE", "-k", "SOPInstanceUID"])
    assert [r.status for r in dimse_responses(found)].count(Status.PENDING) == len(phantoms)


def test_clients_without_a_trusted_certificate_or_without_tls_are_refused(tls_node, pki, phantoms) -> None:
    anonymous = _scu("storescu", tls_node, _tls_args(pki, None), phantoms)
    assert anonymous.returncode != 0 and not dimse_responses(anonymous)
    rogue = _scu("storescu", tls_node, _tls_args(pki, "rogue"), phantoms)
    assert rogue.returncode != 0 and not dimse_responses(rogue)
    plain = _scu("storescu", tls_node, [], phantoms)
    assert plain.returncode != 0 and not dimse_responses(plain)
    # None of them got an image in, and the node still serves a trusted client.
    found = _scu("findscu", tls_node, [*_tls_args(pki, "client"), "-S", "-k",
                                        "QueryRetrieveLevel=IMAGE", "-k", "SOPInstanceUID"])
    assert [r.status for r in dimse_responses(found)] == [Status.SUCCESS]


def test_a_silent_connection_does_not_block_other_clients(tls_node, pki, phantoms) -> None:
    with socket.create_connection((HOST, tls_node)) as silent:  # connects, never speaks TLS
        stored = _scu("storescu", tls_node, _tls_args(pki, "client"), phantoms[:1])
        assert [r.status for r in dimse_responses(stored)] == [Status.SUCCESS]
        assert silent.fileno() >= 0


def test_tls_settings_are_checked(tmp_path, pki) -> None:
    env = {"LATENTPACS_SECURITY_TLS_CERT": str(pki["server"][1]),
           "LATENTPACS_SECURITY_TLS_KEY": str(pki["server"][0]),
           "LATENTPACS_SECURITY_TLS_CA": str(pki["ca"][1])}
    assert load_config(environ={**env, "LATENTPACS_SECURITY_TLS_REQUIRE_CLIENT_CERT": "yes"})[
        "security.tls_require_client_cert"] is True
    with pytest.raises(ConfigError, match="not a valid bool"):
        load_config(environ={**env, "LATENTPACS_SECURITY_TLS_REQUIRE_CLIENT_CERT": "maybe"})
    with pytest.raises(ConfigError, match="set together"):
        load_config(environ={"LATENTPACS_SECURITY_TLS_CERT": str(pki["server"][1])})
    with pytest.raises(ConfigError, match="needs security.tls_ca"):
        load_config(environ={**env, "LATENTPACS_SECURITY_TLS_CA": "",
                             "LATENTPACS_SECURITY_TLS_REQUIRE_CLIENT_CERT": "true"})
    swapped = {**env, "LATENTPACS_SECURITY_TLS_KEY": str(pki["client"][0])}  # not the cert's key
    config = write_config(tmp_path, f"sqlite:///{tmp_path / 'a.db'}")
    result = subprocess.run([str(Path(sys.executable).parent / "latentpacs"), "--config", str(config),
                             "serve", "--port", "0"], capture_output=True, text=True, timeout=120,
                            env={**os.environ, **swapped}, stdin=subprocess.DEVNULL)
    assert result.returncode != 0 and "TLS certificate, key or CA not usable" in result.stderr
