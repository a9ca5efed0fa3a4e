"""DICOM TLS (PS3.15 B.1, B.9): the node behind a server certificate, driven by DCMTK ``+tls``.

A CA, a server certificate and client certificates are made with the ``openssl`` CLI in a
temporary folder. The node is started by hand (the harness's readiness probe speaks plain
TCP) and polled with ``echoscu +tls`` until it answers; it is stopped by its PID. As a
TLS client the node is checked against DCMTK's ``storescp +tls`` (C-MOVE destination).
"""

from __future__ import annotations

import os
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import pydicom
import pytest

from dicomtools import require
from latentpacs import phantom
from latentpacs.config import load_config
from latentpacs.errors import ConfigError, Status
from netpeers import HOST, SCU_TIMEOUT_S, _spawn, _stop, dimse_responses, free_port
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


@contextmanager
def _running_tls_node(folder: Path, pki: dict[str, tuple[Path, Path]], *, extra_toml: str = "",
                      **sections: dict[str, object]) -> Iterator[int]:
    """A node with TLS that requires a client certificate from our CA; yields its port.

    At the lossless tier: TLS is the same at every tier, and the node then starts without
    building a model engine."""
    security = {"tls_cert": str(pki["server"][1]), "tls_key": str(pki["server"][0]),
                "tls_ca": str(pki["ca"][1]), "tls_require_client_cert": "true"}
    config = write_config(folder, f"sqlite:///{folder / 'a.db'}", security=security,
                          **{"codec": {"tier": "lossless"}, **sections})
    config.write_text(config.read_text() + extra_toml)
    proc, port = _start_tls_node(config, _tls_args(pki, "client"))
    try:
        yield port
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


@pytest.fixture(scope="module")
def tls_node(tmp_path_factory: pytest.TempPathFactory, pki: dict[str, tuple[Path, Path]]) -> Iterator[int]:
    """A node with TLS that requires a client certificate from our CA, shared by the two
    tests that store into it (their images are distinct); yields its port."""
    with _running_tls_node(tmp_path_factory.mktemp("tls-node"), pki) as port:
        yield port


@pytest.fixture(scope="module")
def refused_phantoms(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Two phantoms with UIDs of their own, for the clients that must be refused."""
    return phantom.generate(tmp_path_factory.mktemp("refused"), 2, seed=6, size=(64, 52))


def _stored_count(port: int, pki: dict[str, tuple[Path, Path]]) -> int:
    """How many instances a trusted client's C-FIND at IMAGE level finds."""
    found = _scu("findscu", port, [*_tls_args(pki, "client"), "-S", "-k",
                                   "QueryRetrieveLevel=IMAGE", "-k", "SOPInstanceUID"])
    statuses = [r.status for r in dimse_responses(found)]
    assert statuses[-1:] == [Status.SUCCESS], (found.stdout + found.stderr)[-2000:]
    return statuses.count(Status.PENDING)


def test_storescu_over_tls_with_a_client_certificate(tls_node, pki, phantoms) -> None:
    stored = _scu("storescu", tls_node, _tls_args(pki, "client"), phantoms)
    assert [r.status for r in dimse_responses(stored)] == [Status.SUCCESS] * len(phantoms)
    assert _stored_count(tls_node, pki) == len(phantoms)  # the refused test adds none


def test_clients_without_a_trusted_certificate_or_without_tls_are_refused(tls_node, pki,
                                                                          refused_phantoms) -> None:
    before = _stored_count(tls_node, pki)
    anonymous = _scu("storescu", tls_node, _tls_args(pki, None), refused_phantoms)
    assert anonymous.returncode != 0 and not dimse_responses(anonymous)
    rogue = _scu("storescu", tls_node, _tls_args(pki, "rogue"), refused_phantoms)
    assert rogue.returncode != 0 and not dimse_responses(rogue)
    plain = _scu("storescu", tls_node, [], refused_phantoms)
    assert plain.returncode != 0 and not dimse_responses(plain)
    # None of them got an image in (their UIDs are new to the node), and the node still
    # serves a trusted client.
    assert _stored_count(tls_node, pki) == before


#: The first bytes of a TLS ClientHello: a handshake record (0x16, TLS 1.0 record version)
#: announcing 512 bytes, then a ClientHello header announcing 508; the rest never comes.
PARTIAL_CLIENT_HELLO = bytes([0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xFC, 0x03, 0x03])


def _dropped(sock: socket.socket, wait: float) -> bool:
    """Whether the node closes ``sock`` (EOF or reset) within ``wait`` seconds (a failure bound)."""
    sock.settimeout(wait)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def test_a_stalled_handshake_is_dropped_after_the_network_timeout(tmp_path, pki, phantoms) -> None:
    """Peers that connect and stall mid-handshake are dropped after ``node.network_timeout``
    (2 s here), while other associations are served. The association timeout is set far
    beyond the test's wait, so only the handshake's own timeout can end them."""
    with _running_tls_node(tmp_path, pki, node={"network_timeout": 2.0, "acse_timeout": 3600.0}) as port, \
            socket.create_connection((HOST, port)) as silent, \
            socket.create_connection((HOST, port)) as partial:
        partial.sendall(PARTIAL_CLIENT_HELLO)
        stored = _scu("storescu", port, _tls_args(pki, "client"), phantoms[:1])
        assert [r.status for r in dimse_responses(stored)] == [Status.SUCCESS]
        assert _dropped(silent, 60.0), "a connection that never sent a ClientHello stayed open"
        assert _dropped(partial, 60.0), "a connection that stalled mid-ClientHello stayed open"
        found = _scu("findscu", port, [*_tls_args(pki, "client"), "-S", "-k",
                                       "QueryRetrieveLevel=IMAGE", "-k", "SOPInstanceUID"])
        assert [r.status for r in dimse_responses(found)].count(Status.PENDING) == 1


@contextmanager
def _tls_storescp(directory: Path, pki: dict[str, tuple[Path, Path]], aet: str) -> Iterator[int]:
    """DCMTK ``storescp +tls``: TLS only, requiring a client certificate from our CA."""
    directory.mkdir(parents=True, exist_ok=True)
    port, log = free_port(), directory.parent / f"{directory.name}.storescp.log"
    proc = _spawn([require("storescp"), "-v", *_tls_args(pki, "server"), "-rc", "+xa", "-pm",
                   "-aet", aet, "-od", directory, "-fe", ".dcm", str(port)], log)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while subprocess.run([require("echoscu"), "-to", "2", "-ta", "5", *_tls_args(pki, "client"),
                              "-aec", aet, HOST, str(port)], capture_output=True, timeout=60,
                             stdin=subprocess.DEVNULL).returncode != 0:
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"storescp +tls did not answer:\n{log.read_text()[-4000:]}")
            time.sleep(0.2)
        yield port
    finally:
        _stop(proc)


def _move_over_tls(port: int, pki: dict[str, tuple[Path, Path]], study_uid: str,
                   destination: str) -> pydicom.Dataset:
    """C-MOVE a study with a pynetdicom SCU over TLS (DCMTK 3.6's movescu has no ``+tls``);
    returns the final response's status data set."""
    from pynetdicom import AE
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelMove as MOVE

    context = ssl.create_default_context(cafile=str(pki["ca"][1]))
    context.load_cert_chain(certfile=str(pki["client"][1]), keyfile=str(pki["client"][0]))
    ae = AE(ae_title="TLSSCU")
    ae.add_requested_context(MOVE)
    assoc = ae.associate(HOST, port, ae_title="LATENTPACS", tls_args=(context, HOST))
    assert assoc.is_established
    identifier = pydicom.Dataset()
    identifier.QueryRetrieveLevel = "STUDY"
    identifier.StudyInstanceUID = study_uid
    responses = [status for status, _ in assoc.send_c_move(identifier, destination, MOVE)]
    assoc.release()
    return responses[-1]


def test_move_to_a_tls_destination_uses_tls(tmp_path, pki, phantoms) -> None:
    """C-MOVE sub-associations to a ``tls = true`` destination are TLS, with the node's
    certificate as client certificate: a TLS-only storescp that requires one receives the
    images. The same storescp configured without ``tls`` receives nothing."""
    received = tmp_path / "received"
    with _tls_storescp(received, pki, "SECURE") as scp_port:
        destinations = (f"[destinations.SECURE]\nhost = \"{HOST}\"\nport = {scp_port}\ntls = true\n"
                        f"[destinations.PLAIN]\nhost = \"{HOST}\"\nport = {scp_port}\n")
        with _running_tls_node(tmp_path, pki, extra_toml=destinations) as port:
            stored = _scu("storescu", port, _tls_args(pki, "client"), phantoms)
            assert [r.status for r in dimse_responses(stored)] == [Status.SUCCESS] * len(phantoms)
            study_uid = str(pydicom.dcmread(phantoms[0]).StudyInstanceUID)
            moved = _move_over_tls(port, pki, study_uid, "SECURE")
            assert (moved.Status, moved.NumberOfCompletedSuboperations) == (Status.SUCCESS, len(phantoms))
            assert len(list(received.glob("*.dcm"))) == len(phantoms)
            plain = _move_over_tls(port, pki, study_uid, "PLAIN")
            assert plain.Status != Status.SUCCESS
            assert len(list(received.glob("*.dcm"))) == len(phantoms)


def test_a_tls_destination_needs_the_node_tls_settings(tmp_path) -> None:
    config = write_config(tmp_path, f"sqlite:///{tmp_path / 'a.db'}")
    config.write_text(config.read_text() + '[destinations.SAFE]\nhost = "127.0.0.1"\nport = 2762\ntls = true\n')
    result = subprocess.run([str(Path(sys.executable).parent / "latentpacs"), "--config", str(config),
                             "serve", "--port", "0"], capture_output=True, text=True, timeout=120,
                            stdin=subprocess.DEVNULL)
    assert result.returncode != 0 and "[destinations.SAFE] has tls = true" in result.stderr
    config.write_text(config.read_text().replace("tls = true", 'tls = "false"'))
    with pytest.raises(ConfigError, match="tls must be true or false"):
        load_config(config)


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
