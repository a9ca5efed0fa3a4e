"""Who may use the web server: bearer tokens, loopback trust, and TLS client certificates.

Refusals come before anything is read or written, and say nothing of the archive: a
401 or 403 body names no patient and no UID. With ``web.tls`` and
``security.tls_require_client_cert``, an HTTPS client without a certificate from
``security.tls_ca`` is refused in the handshake; a verified certificate opens the
connection, and the bearer token still decides what the request may do (uvicorn does
not hand the peer certificate to the application).
"""

from __future__ import annotations

import http.client
import json
import os
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest

from latentpacs import phantom
from netpeers import findscu
from test_node import write_config
from test_tls import pki  # noqa: F401  (the CA, server and client certificates)
from test_web_stow import BOUNDARY, multipart
from webpeers import start_web_node, token_entries

STOW_TYPE = f'multipart/related; type="application/dicom"; boundary={BOUNDARY}'
START_TIMEOUT_S = 60.0


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return phantom.generate(tmp_path_factory.mktemp("auth-phantoms"), 2, seed=47, size=(128, 104),
                            images_per_study=1)


def leaks(body: bytes, source: Path) -> list[str]:
    """The identifying values of ``source`` that ``body`` repeats."""
    ds = pydicom.dcmread(source, stop_before_pixels=True)
    values = [str(ds.PatientID), str(ds.PatientName), ds.StudyInstanceUID, ds.SOPInstanceUID]
    return [value for value in values if value.encode() in body]


def test_tokens_decide_and_refusals_say_nothing(tmp_path: Path, sources: list[Path]) -> None:
    with start_web_node(tmp_path / "node") as web:
        stored = web.request("POST", "/dicom-web/studies", body=multipart([sources[0].read_bytes()]),
                             headers={"Content-Type": STOW_TYPE})
        assert stored.status == 200
        assert "server" not in stored.headers
        study = pydicom.dcmread(sources[0]).StudyInstanceUID
        query = f"/dicom-web/studies?PatientID={pydicom.dcmread(sources[0]).PatientID}"

        anonymous = web.request("GET", query, token=None)
        assert anonymous.status == 401
        assert anonymous.headers["www-authenticate"].startswith("Bearer ")
        assert "error=" not in anonymous.headers["www-authenticate"]
        wrong = web.request("GET", query, token=None, headers={"Authorization": "Bearer not-a-token"})
        assert wrong.status == 401
        assert 'error="invalid_token"' in wrong.headers["www-authenticate"]
        # Refused before the path is looked at: no 400 that would tell a UID is malformed.
        assert web.request("GET", "/dicom-web/studies/1.2.x/series", token=None).status == 401

        assert web.request("GET", query, token="reader").status == 200
        reader_stow = web.request("POST", "/dicom-web/studies", token="reader",
                                  body=multipart([sources[1].read_bytes()]),
                                  headers={"Content-Type": STOW_TYPE})
        assert reader_stow.status == 403
        anonymous_stow = web.request("POST", f"/dicom-web/studies/{study}", token=None,
                                     body=multipart([sources[1].read_bytes()]),
                                     headers={"Content-Type": STOW_TYPE})
        assert anonymous_stow.status == 401
        for refused in (anonymous, wrong, reader_stow, anonymous_stow):
            assert not leaks(refused.body, sources[0]) and not leaks(refused.body, sources[1])
        found = findscu(web.node.port, web.node.aet, "STUDY", {"StudyInstanceUID": ""})
        assert [ds.StudyInstanceUID for ds in found.datasets] == [study]


def test_trusted_loopback_needs_no_token(tmp_path: Path, sources: list[Path]) -> None:
    with start_web_node(tmp_path / "node", web={"trust_loopback": True}) as web:
        stored = web.request("POST", "/dicom-web/studies", token=None,
                             body=multipart([sources[0].read_bytes()]),
                             headers={"Content-Type": STOW_TYPE})
        assert stored.status == 200
        answer = web.request("GET", "/dicom-web/studies", token=None)
        assert answer.status == 200 and len(json.loads(answer.body)) == 1
        # A presented token is still checked: a wrong one is refused, not trusted.
        assert web.request("GET", "/dicom-web/studies", token=None,
                           headers={"Authorization": "Bearer wrong"}).status == 401


@pytest.fixture
def tls_web(tmp_path: Path, pki: dict[str, tuple[Path, Path]]) -> Iterator[tuple[int, str]]:  # noqa: F811
    """``latentpacs serve`` with ``web.tls`` requiring client certificates; yields (web port, admin token)."""
    secrets, sections = token_entries({"admin": ("store", "query", "retrieve", "metrics")})
    security = {"tls_cert": str(pki["server"][1]), "tls_key": str(pki["server"][0]),
                "tls_ca": str(pki["ca"][1]), "tls_require_client_cert": True}
    config = write_config(tmp_path, f"sqlite:///{tmp_path / 'a.db'}", security=security,
                          codec={"tier": "lossless"}, web={"tls": True}, **sections)
    port_file, web_port_file, log = tmp_path / "node.port", tmp_path / "web.port", tmp_path / "node.log"
    script = Path(sys.executable).parent / "latentpacs"
    with log.open("ab") as handle:
        proc = subprocess.Popen(
            [str(script), "--config", str(config), "serve", "--port", "0", "--port-file",
             str(port_file), "--web-port", "0", "--web-port-file", str(web_port_file)],
            stdout=handle, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env={**os.environ, "PYTHONUNBUFFERED": "1"}, cwd=tmp_path)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        # The web port file is written first; once the DIMSE one exists, both serve.
        while not (port_file.exists() and port_file.read_text().endswith("\n")):
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"the TLS node did not start:\n{log.read_text()[-4000:]}")
            time.sleep(0.2)
        yield int(web_port_file.read_text()), secrets["admin"]
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def _https(port: int, context: ssl.SSLContext, token: str | None) -> int:
    request = urllib.request.Request(f"https://127.0.0.1:{port}/dicom-web/studies",
                                     headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(request, context=context, timeout=30) as answer:
            return int(answer.status)
    except urllib.error.HTTPError as error:
        return int(error.code)


def test_https_requires_a_client_certificate(tls_web: tuple[int, str],
                                             pki: dict[str, tuple[Path, Path]]) -> None:  # noqa: F811
    port, token = tls_web
    anonymous = ssl.create_default_context(cafile=str(pki["ca"][1]))
    with pytest.raises((urllib.error.URLError, ssl.SSLError, ConnectionError,
                        http.client.RemoteDisconnected)):
        _https(port, anonymous, token)
    rogue = ssl.create_default_context(cafile=str(pki["ca"][1]))
    rogue.load_cert_chain(str(pki["rogue"][1]), str(pki["rogue"][0]))
    with pytest.raises((urllib.error.URLError, ssl.SSLError, ConnectionError,
                        http.client.RemoteDisconnected)):
        _https(port, rogue, token)
    client = ssl.create_default_context(cafile=str(pki["ca"][1]))
    client.load_cert_chain(str(pki["client"][1]), str(pki["client"][0]))
    assert _https(port, client, token) == 204  # an empty archive: no study matches
    # The certificate opens the connection; the token still carries the permissions.
    assert _https(port, client, None) == 401
