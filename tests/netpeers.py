"""Real DICOM peers on loopback for network tests: the node, DCMTK and Orthanc.

Everything here drives real programs (PS3.7 DIMSE, PS3.8 upper layer): the
``latentpacs serve`` node, DCMTK's ``storescp`` and SCUs (``echoscu``, ``storescu``,
``findscu``, ``getscu``, ``movescu``) and Orthanc as the viewer. Servers listen on
OS-assigned free ports and are polled with C-ECHO (PS3.4 A.4) until they answer; no
fixed sleeps. Every server process is stopped by its PID (``stop``: SIGTERM, then
SIGKILL); the server objects are context managers that stop on exit. A missing tool
fails the test through :func:`dicomtools.require` (never a skip, under ``CI=true`` or
not). A server that dies or never answers fails the test with the tail of its log.
SCUs run with ``-d`` so that :func:`dimse_responses` can read every response's Status
and Error Comment (PS3.7 C) from their output.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import pydicom
import pytest

from dicomtools import require

logger = logging.getLogger(__name__)

HOST = "127.0.0.1"
START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 10.0
SCU_TIMEOUT_S = 120.0
LOG_TAIL_CHARS = 4000


#: Every server this module started; any still running when Python exits is stopped by PID.
_STARTED: list[subprocess.Popen[bytes]] = []


def free_port() -> int:
    """A TCP port the OS reports free on loopback (bind ``127.0.0.1:0``, close, return)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((HOST, 0))
        return int(probe.getsockname()[1])


def _log_tail(log: Path | None) -> str:
    if log is None or not log.exists():
        return "(no log)"
    text = log.read_text(errors="replace")
    return text[-LOG_TAIL_CHARS:] or "(empty log)"


def _spawn(argv: Sequence[str | Path], log: Path, *, env: Mapping[str, str] | None = None,
           cwd: Path | None = None) -> subprocess.Popen[bytes]:
    """Start ``argv`` with stdout and stderr appended to ``log``."""
    with log.open("ab") as handle:
        proc = subprocess.Popen([str(arg) for arg in argv], stdout=handle,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=dict(env) if env is not None else None, cwd=cwd)
    logger.info("started pid %d: %s", proc.pid, " ".join(map(str, argv)))
    _STARTED.append(proc)
    return proc


def _stop(proc: subprocess.Popen[bytes], *, kill: bool = False) -> None:
    """Stop ``proc`` by its PID (SIGTERM, or SIGKILL when asked or after a timeout); reap it."""
    if proc.poll() is None:
        if kill:
            proc.kill()
        else:
            proc.terminate()
        try:
            proc.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            logger.warning("pid %d ignored SIGTERM for %.0f s; killing", proc.pid, STOP_TIMEOUT_S)
            proc.kill()
            proc.wait(timeout=STOP_TIMEOUT_S)
    logger.info("pid %d stopped (exit %s)", proc.pid, proc.returncode)


@atexit.register
def _stop_leftovers() -> None:
    """Safety net for a test that forgot ``stop()``: no server outlives the test run."""
    for proc in _STARTED:
        _stop(proc)


def _fail_if_exited(proc: subprocess.Popen[bytes] | None, what: str, log: Path | None) -> None:
    if proc is not None and proc.poll() is not None:
        pytest.fail(f"{what} exited with {proc.returncode} before answering:\n{_log_tail(log)}")


def _run(argv: Sequence[str | Path], timeout: float) -> subprocess.CompletedProcess[str]:
    """Run a DCMTK client to completion; a hang past ``timeout`` fails the test."""
    command = [str(arg) for arg in argv]
    try:
        return subprocess.run(command, capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"{' '.join(command)} did not finish in {timeout:.0f} s: {exc.output!r}")


def echoscu(port: int, aet: str, *, calling: str = "ECHOSCU",
            timeout: float = SCU_TIMEOUT_S) -> subprocess.CompletedProcess[str]:
    """One C-ECHO (PS3.7 9.1.5, Verification SOP Class PS3.4 A.4) with DCMTK ``echoscu``."""
    return _run([require("echoscu"), "-to", "2", "-ta", "5", "-td", "5", "-aet", calling,
                 "-aec", aet, HOST, str(port)], timeout)


def wait_for_echo(port: int, aet: str, *, timeout: float = START_TIMEOUT_S,
                  proc: subprocess.Popen[bytes] | None = None, log: Path | None = None) -> None:
    """Poll ``port`` with C-ECHO until the peer ``aet`` answers Success.

    Fails the test when ``proc`` exits meanwhile or ``timeout`` seconds pass, showing the
    tail of ``log`` (the process's captured output) and the last ``echoscu`` output.
    """
    deadline = time.monotonic() + timeout
    pause = 0.05
    while True:
        _fail_if_exited(proc, f"the server on port {port}", log)
        result = echoscu(port, aet, timeout=15.0)
        if result.returncode == 0:
            return
        if time.monotonic() > deadline:
            pytest.fail(f"no C-ECHO answer from {aet} on port {port} within {timeout:.0f} s; "
                        f"echoscu said: {result.stdout}{result.stderr}\n{_log_tail(log)}")
        time.sleep(pause)
        pause = min(pause * 1.5, 0.25)


class _Stoppable:
    """Context-manager support for the server records below (``with start_x(...) as x``)."""

    proc: subprocess.Popen[bytes]

    def stop(self) -> None:
        """Stop the process by its PID: SIGTERM, wait, SIGKILL if it does not exit."""
        _stop(self.proc)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        self.stop()


@dataclass(frozen=True)
class NodeProcess(_Stoppable):
    """A running ``latentpacs serve`` node on loopback."""

    port: int
    aet: str
    proc: subprocess.Popen[bytes]
    log: Path
    #: The web server's port (DICOMweb, viewer, /metrics), None with ``web.enabled`` off.
    web_port: int | None = None

    @property
    def web_url(self) -> str:
        """The web server's base URL, ``http://127.0.0.1:PORT`` (fails without a web server)."""
        if self.web_port is None:
            pytest.fail("this node runs no web server (web.enabled is false)")
        return f"http://{HOST}:{self.web_port}"

    def kill(self) -> None:
        """SIGKILL the node (a crash: nothing gets to clean up) and reap it."""
        _stop(self.proc, kill=True)


def _port_written(port_file: Path) -> bool:
    """Whether ``port_file`` holds a whole line of digits (the node has finished writing it)."""
    text = port_file.read_text() if port_file.exists() else ""
    return text.endswith("\n") and text.strip().isdigit()


def start_node(config: Path, *, aet: str = "LATENTPACS", extra_args: Sequence[str] = (),
               env: Mapping[str, str] | None = None, workdir: Path | None = None,
               timeout: float = START_TIMEOUT_S) -> NodeProcess:
    """Start ``latentpacs --config CONFIG serve --port 0 --port-file FILE [extra_args]``.

    The node must write its listening port as one line (decimal digits, then a newline)
    to the port file once it accepts associations; the harness then polls it with
    C-ECHO to ``aet``. ``env`` is added to the current environment. The port file
    ``node.port`` and ``node.log`` (stdout and stderr, appended across restarts) go into
    ``workdir``, by default the config's folder: give concurrent nodes distinct workdirs.
    """
    script = Path(sys.executable).parent / "latentpacs"
    if not script.is_file():
        pytest.fail(f"{script} is missing: pip install -e . in the virtualenv")
    workdir = workdir or config.parent
    port_file = workdir / "node.port"
    port_file.unlink(missing_ok=True)
    web_port_file = workdir / "web.port"
    web_port_file.unlink(missing_ok=True)
    log = workdir / "node.log"
    environment = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    proc = _spawn([script, "--config", config, "serve", "--port", "0", "--port-file", port_file,
                   "--web-port", "0", "--web-port-file", web_port_file, *extra_args], log,
                  env=environment, cwd=workdir)
    try:
        deadline = time.monotonic() + timeout
        pause = 0.05
        while not _port_written(port_file):
            _fail_if_exited(proc, "latentpacs serve", log)
            if time.monotonic() > deadline:
                pytest.fail(f"latentpacs serve wrote no port to {port_file} within "
                            f"{timeout:.0f} s:\n{_log_tail(log)}")
            time.sleep(pause)
            pause = min(pause * 1.5, 0.25)
        port = int(port_file.read_text().strip())
        wait_for_echo(port, aet, timeout=max(deadline - time.monotonic(), 1.0), proc=proc,
                      log=log)
        # The node writes the web port file before the DIMSE one (when web.enabled).
        web_port = int(web_port_file.read_text().strip()) if _port_written(web_port_file) else None
    except BaseException:
        _stop(proc)
        raise
    return NodeProcess(port=port, aet=aet, proc=proc, log=log, web_port=web_port)


@dataclass(frozen=True)
class StoreSCP(_Stoppable):
    """A running DCMTK ``storescp`` (Storage SCP, PS3.4 Annex B) writing into ``directory``."""

    port: int
    aet: str
    directory: Path
    proc: subprocess.Popen[bytes]
    log: Path

    def files(self) -> list[Path]:
        """The received objects, one ``<Modality>.<SOPInstanceUID>.dcm`` file per instance."""
        return sorted(self.directory.glob("*.dcm"))


def start_storescp(directory: Path, *, aet: str = "STORESCP",
                   timeout: float = START_TIMEOUT_S) -> StoreSCP:
    """Start ``storescp`` on a free port, accepting every SOP class and transfer syntax.

    Options: ``+xa`` (all transfer syntaxes DCMTK knows), ``-pm`` (promiscuous: unknown
    SOP classes too), single-process (one association at a time), files written flat
    into ``directory`` as Part 10 files named ``<Modality>.<SOPInstanceUID>.dcm`` (no
    ``-su`` sorting; a re-sent instance overwrites its file). Log: ``directory.parent /
    <directory name>.storescp.log``.
    """
    directory.mkdir(parents=True, exist_ok=True)
    log = directory.parent / f"{directory.name}.storescp.log"
    port = free_port()
    proc = _spawn([require("storescp"), "-v", "+xa", "-pm", "-dhl", "-aet", aet,
                   "-od", directory, "-fe", ".dcm", str(port)], log)
    try:
        wait_for_echo(port, aet, timeout=timeout, proc=proc, log=log)
    except BaseException:
        _stop(proc)
        raise
    return StoreSCP(port=port, aet=aet, directory=directory, proc=proc, log=log)


#: Orthanc's DICOMweb plugin (Debian package orthanc-dicomweb).
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
#: Where Orthanc's own DICOMweb server answers (``DicomWeb.Root``).
DICOMWEB_ROOT = "/dicom-web"


@dataclass(frozen=True)
class DicomWebPeer:
    """A remote DICOMweb server Orthanc's plugin knows (one entry of ``DicomWeb.Servers``).

    ``url`` is the server's DICOMweb base (``http://host:port/dicom-web``); ``headers``
    are sent with every request (``HttpHeaders``, e.g. a bearer token).
    """

    url: str
    headers: Mapping[str, str]


def require_dicomweb_plugin() -> Path:
    """The plugin's path; fails the test (never skips) when it is not installed."""
    if not DICOMWEB_PLUGIN.exists():
        pytest.fail(f"{DICOMWEB_PLUGIN} is required: apt-get install orthanc-dicomweb")
    return DICOMWEB_PLUGIN


@dataclass(frozen=True)
class Orthanc(_Stoppable):
    """A running Orthanc (the viewer side): REST API on ``http_port``, DICOM on ``dicom_port``."""

    http_port: int
    dicom_port: int
    aet: str
    proc: subprocess.Popen[bytes]
    workdir: Path

    @property
    def log(self) -> Path:
        """Orthanc's stdout and stderr."""
        return self.workdir / "orthanc.log"

    def rest(self, method: str, path: str, body: bytes | dict[str, Any] | None = None,
             *, timeout: float = SCU_TIMEOUT_S) -> Any:
        """Call the REST API: a dict body goes as JSON, bytes as ``application/dicom``.

        JSON answers come back parsed, others as bytes.
        An HTTP error status fails the test with Orthanc's answer.
        """
        data = json.dumps(body).encode() if isinstance(body, dict) else body
        request = urllib.request.Request(f"http://{HOST}:{self.http_port}{path}", data=data,
                                         method=method)
        if data is not None:
            request.add_header("Content-Type", "application/json" if isinstance(body, dict)
                               else "application/dicom")
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                payload = response.read()
                kind = response.headers.get_content_type()
        except urllib.error.HTTPError as exc:
            pytest.fail(f"Orthanc {method} {path} -> HTTP {exc.code}: "
                        f"{exc.read().decode(errors='replace')}")
        return json.loads(payload) if kind == "application/json" else payload

    def upload(self, path: Path) -> str:
        """Store one Part 10 file through ``POST /instances``; returns its Orthanc instance id."""
        answer = self.rest("POST", "/instances", path.read_bytes())
        return str(answer["ID"])

    def instances(self) -> list[str]:
        """Orthanc ids of every stored instance (``GET /instances``)."""
        return [str(oid) for oid in self.rest("GET", "/instances")]

    def instance_tags(self, oid: str) -> dict[str, Any]:
        """The instance's attributes by keyword (``GET /instances/{id}/simplified-tags``)."""
        return dict(self.rest("GET", f"/instances/{oid}/simplified-tags"))

    def file(self, oid: str) -> bytes:
        """The stored Part 10 file (``GET /instances/{id}/file``)."""
        return bytes(self.rest("GET", f"/instances/{oid}/file"))

    def store_to(self, modality: str, resources: list[str]) -> dict[str, Any]:
        """C-STORE ``resources`` (any level) to a configured modality, synchronously.

        ``POST /modalities/{modality}/store``; returns Orthanc's job summary (counts of
        sent and failed instances).
        """
        return dict(self.rest("POST", f"/modalities/{modality}/store",
                              {"Resources": resources, "Synchronous": True}))

    @property
    def dicomweb_url(self) -> str:
        """Orthanc's own DICOMweb server (started with ``dicomweb``): ``http://127.0.0.1:PORT/dicom-web``."""
        return f"http://{HOST}:{self.http_port}{DICOMWEB_ROOT}"

    def stow_to(self, server: str, resources: list[str]) -> dict[str, Any]:
        """STOW-RS ``resources`` (Orthanc ids, any level) to the DICOMweb server ``server``.

        The plugin's ``POST /dicom-web/servers/{server}/stow``, synchronously; an HTTP
        error (the remote server refused the request) fails the test. Plugin 1.7 sends
        ``POST {url}/studies`` with ``Transfer-Encoding: chunked``, a 73-character
        boundary (two UUIDs joined by ``-``) and a Content-Length header in each part.
        """
        return dict(self.rest("POST", f"{DICOMWEB_ROOT}/servers/{server}/stow",
                              {"Resources": resources, "Synchronous": True}))

    def retrieve_from(self, server: str, study_uid: str) -> Any:
        """WADO-RS retrieve of one study from ``server`` into Orthanc, synchronously.

        The plugin's ``POST /dicom-web/servers/{server}/retrieve`` with ``{"Study": uid}``:
        ``GET {url}/studies/{uid}`` with ``Accept: multipart/related;
        type="application/dicom"; transfer-syntax=*`` (the plugin's default
        ``HasWadoRsUniversalTransferSyntax``); the objects are stored as they arrive.
        """
        return self.rest("POST", f"{DICOMWEB_ROOT}/servers/{server}/retrieve",
                         {"Resources": [{"Study": study_uid}], "Synchronous": True})

    def qido_from(self, server: str, uri: str, arguments: Mapping[str, str]) -> list[dict[str, Any]]:
        """QIDO-RS ``uri`` (e.g. ``/studies``) with ``arguments`` on ``server``, through the plugin.

        ``POST /dicom-web/servers/{server}/qido`` (the plugin asks with ``Accept: */*``);
        returns the answers as the plugin gives them back: per tag ``{"Value": ...,
        "vr": ...}`` with one value as a string.
        """
        return list(self.rest("POST", f"{DICOMWEB_ROOT}/servers/{server}/qido",
                              {"Uri": uri, "Arguments": dict(arguments)}))


def _dicomweb_config(servers: Mapping[str, DicomWebPeer]) -> dict[str, Any]:
    """The plugin's ``DicomWeb`` section: its own server at ``/dicom-web/`` and ``servers``."""
    return {
        "Enable": True,
        "Root": f"{DICOMWEB_ROOT}/",
        "EnableWado": False,
        "Servers": {name: {"Url": peer.url, "HttpHeaders": dict(peer.headers)}
                    for name, peer in servers.items()},
    }


def _orthanc_config(workdir: Path, aet: str, http_port: int, dicom_port: int,
                    modalities: Mapping[str, tuple[str, str, int]],
                    dicomweb: Mapping[str, DicomWebPeer] | None = None) -> dict[str, Any]:
    extra = {} if dicomweb is None else {"DicomWeb": _dicomweb_config(dicomweb)}
    return {
        **extra,
        "Name": f"latentpacs-test-{aet}",
        "StorageDirectory": str(workdir / "storage"),
        "IndexDirectory": str(workdir / "index"),
        "Plugins": [] if dicomweb is None else [str(require_dicomweb_plugin())],
        "HttpPort": http_port,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "HttpThreadsCount": 4,
        "OrthancExplorerEnabled": False,
        "WebDavEnabled": False,
        "DicomServerEnabled": True,
        "DicomAet": aet,
        "DicomPort": dicom_port,
        "DicomCheckCalledAet": False,
        "DicomThreadsCount": 2,
        "DicomAlwaysAllowEcho": True,
        "DicomAlwaysAllowStore": True,
        "DicomAlwaysAllowFind": True,
        "DicomAlwaysAllowGet": True,
        "DicomAlwaysAllowMove": True,
        "DicomModalities": {name: list(peer) for name, peer in modalities.items()},
        "DicomAssociationCloseDelay": 0,
        "DicomScuTimeout": 30,
        "UnknownSopClassAccepted": True,
        "SaveJobs": False,
        "SyncStorageArea": False,
        "StableAge": 60,
    }


def start_orthanc(workdir: Path, *, aet: str = "ORTHANC",
                  modalities: Mapping[str, tuple[str, str, int]] | None = None,
                  dicomweb: Mapping[str, DicomWebPeer] | None = None,
                  timeout: float = START_TIMEOUT_S) -> Orthanc:
    """Start Orthanc with a fresh configuration in ``workdir``; no authentication.

    ``modalities`` maps a modality name to ``(AET, host, port)``: the peers Orthanc
    sends to (``store_to``) and the C-MOVE destinations it knows (by AET). C-ECHO,
    C-STORE, C-FIND, C-GET and C-MOVE are allowed from any calling AE title.
    ``dicomweb`` (None: no plugin) loads the DICOMweb plugin: Orthanc's own DICOMweb
    server answers at ``dicomweb_url`` and the plugin's client knows each entry
    (name -> :class:`DicomWebPeer`) for ``stow_to``, ``retrieve_from`` and ``qido_from``
    (PS3.18 10.5, 10.4, 10.6). Returns once ``GET /system`` answers and the DICOM port
    answers C-ECHO.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    http_port, dicom_port = free_port(), free_port()
    while dicom_port == http_port:
        dicom_port = free_port()
    config = workdir / "orthanc.json"
    config.write_text(json.dumps(_orthanc_config(workdir, aet, http_port, dicom_port,
                                                 modalities or {}, dicomweb), indent=2))
    log = workdir / "orthanc.log"
    proc = _spawn([require("Orthanc"), "--no-jobs", config], log, cwd=workdir)
    try:
        deadline = time.monotonic() + timeout
        pause = 0.05
        while True:
            _fail_if_exited(proc, "Orthanc", log)
            try:
                with urllib.request.urlopen(f"http://{HOST}:{http_port}/system", timeout=5):
                    break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                if time.monotonic() > deadline:
                    pytest.fail(f"Orthanc REST did not answer within {timeout:.0f} s:\n"
                                f"{_log_tail(log)}")
                time.sleep(pause)
                pause = min(pause * 1.5, 0.25)
        wait_for_echo(dicom_port, aet, timeout=max(deadline - time.monotonic(), 1.0),
                      proc=proc, log=log)
    except BaseException:
        _stop(proc)
        raise
    return Orthanc(http_port=http_port, dicom_port=dicom_port, aet=aet, proc=proc,
                   workdir=workdir)


@dataclass(frozen=True)
class DimseResponse:
    """One DIMSE response an SCU received (PS3.7 9.3), read from DCMTK's ``-d`` log.

    ``status`` is the Status (0000,0900) code, comparable with
    :class:`latentpacs.errors.Status`; ``error_comment`` the Error Comment (0000,0902)
    of the status detail, if any; the sub-operation counts (C-GET/C-MOVE, PS3.7 9.3.3)
    are None where the response leaves them out.
    """

    kind: str
    status: int
    error_comment: str | None
    completed: int | None
    failed: int | None
    warning: int | None


_FIELD = re.compile(r"^D: ([A-Za-z][A-Za-z ]*?)\s+: (.*)$")
_ERROR_COMMENT = re.compile(r"\(0000,0902\) LO \[(.*?)\s*\]")


def _count(value: str | None) -> int | None:
    return int(value) if value is not None and value.strip().isdigit() else None


def dimse_responses(proc: subprocess.CompletedProcess[str]) -> list[DimseResponse]:
    """Every response (``... RSP``) a DCMTK SCU run with ``-d`` received, in order."""
    lines = (proc.stdout + proc.stderr).splitlines()
    found: list[DimseResponse] = []
    index = 0
    while index < len(lines):
        if "INCOMING DIMSE MESSAGE" not in lines[index]:
            index += 1
            continue
        fields: dict[str, str] = {}
        index += 1
        while index < len(lines) and "END DIMSE MESSAGE" not in lines[index]:
            if (match := _FIELD.match(lines[index])) is not None:
                fields[match[1]] = match[2]
            index += 1
        comment = None
        after = index + 1
        while after < len(lines) and "DIMSE MESSAGE" not in lines[after]:
            if (match := _ERROR_COMMENT.search(lines[after])) is not None:
                comment = match[1]
                break
            after += 1
        kind = fields.get("Message Type", "")
        if kind.endswith("RSP") and "DIMSE Status" in fields:
            found.append(DimseResponse(
                kind=kind, status=int(fields["DIMSE Status"].split(":")[0], 16),
                error_comment=comment, completed=_count(fields.get("Completed Suboperations")),
                failed=_count(fields.get("Failed Suboperations")),
                warning=_count(fields.get("Warning Suboperations"))))
    return found


def final_response(proc: subprocess.CompletedProcess[str]) -> DimseResponse:
    """The last response the SCU received (the final C-FIND/C-GET/C-MOVE status, or the
    last C-STORE's); fails the test when there was none (no association, abort)."""
    received = dimse_responses(proc)
    if not received:
        pytest.fail(f"{' '.join(map(str, proc.args))} received no DIMSE response:\n"
                    f"{(proc.stdout + proc.stderr)[-LOG_TAIL_CHARS:]}")
    return received[-1]


def storescu(port: int, aet: str, files: Sequence[Path], *, calling: str = "STORESCU",
             extra: Sequence[str] = (),
             timeout: float = SCU_TIMEOUT_S) -> subprocess.CompletedProcess[str]:
    """C-STORE (PS3.4 Annex B) ``files`` with DCMTK ``storescu``; folders are scanned recursively.

    Transfer-syntax choices (``-xs``, ``-xy``, ...) and ``-nh`` go through ``extra``.
    Returns the finished process, run with ``-d``: :func:`dimse_responses` gives each
    C-STORE response's status and Error Comment.
    """
    scan = ["+sd", "+r"] if any(Path(path).is_dir() for path in files) else []
    return _run([require("storescu"), "-d", "-to", "10", *scan, *extra, "-aet", calling,
                 "-aec", aet, HOST, str(port), *map(str, files)], timeout)


def _query_args(level: str, keys: Mapping[str, str], root: str) -> list[str]:
    models = {"STUDY": "-S", "PATIENT": "-P"}
    if root not in models:
        pytest.fail(f"query root must be STUDY or PATIENT, not {root!r}")
    args = [models[root], "-k", f"QueryRetrieveLevel={level}"]
    for key, value in keys.items():
        args += ["-k", f"{key}={value}"]
    return args


@dataclass(frozen=True)
class FindResult:
    """C-FIND responses: the identifiers in arrival order, and the finished ``findscu``."""

    datasets: list[pydicom.Dataset]
    proc: subprocess.CompletedProcess[str]

    @property
    def final(self) -> DimseResponse:
        """The final C-FIND response (its ``status`` is 0x0000 when matching completed)."""
        return final_response(self.proc)


def findscu(port: int, aet: str, level: str, keys: Mapping[str, str], *, root: str = "STUDY",
            calling: str = "FINDSCU", timeout: float = SCU_TIMEOUT_S) -> FindResult:
    """C-FIND (PS3.4 C.4.1) at ``level`` in the Study or Patient Root model.

    ``keys`` maps a keyword (or ``gggg,eeee``) to a matching value; ``""`` asks for the
    attribute back (a return key). Each pending response's identifier is extracted
    (``-X``) and read with pydicom; ``FindResult.final`` is the final status (``findscu``
    exits 0 even on a failure status).
    """
    with tempfile.TemporaryDirectory(prefix="findscu-") as out:
        proc = _run([require("findscu"), "-d", "-to", "10", *_query_args(level, keys, root), "-X",
                     "-od", out, "-aet", calling, "-aec", aet, HOST, str(port)], timeout)
        responses = sorted(Path(out).glob("rsp*.dcm"), key=lambda p: int(p.stem[3:]))
        datasets = [pydicom.dcmread(path) for path in responses]
    return FindResult(datasets=datasets, proc=proc)


@dataclass(frozen=True)
class GetResult:
    """C-GET outcome: the files that arrived (sorted), and the finished ``getscu``."""

    files: list[Path]
    proc: subprocess.CompletedProcess[str]

    @property
    def final(self) -> DimseResponse:
        """The final C-GET response: status and sub-operation counts."""
        return final_response(self.proc)


def getscu(port: int, aet: str, level: str, keys: Mapping[str, str], out_dir: Path, *,
           root: str = "STUDY", calling: str = "GETSCU",
           timeout: float = SCU_TIMEOUT_S) -> GetResult:
    """C-GET (PS3.4 C.4.3) with ``getscu``; received objects land in ``out_dir``.

    ``GetResult.files`` lists the files that were not in ``out_dir`` before the call
    (``<Modality>.<SOPInstanceUID>``); ``GetResult.final`` the final C-GET status
    (``getscu`` exits 0 even on a failure status).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    before = set(out_dir.iterdir())
    proc = _run([require("getscu"), "-d", "-to", "10", *_query_args(level, keys, root),
                 "-od", out_dir, "-aet", calling, "-aec", aet, HOST, str(port)], timeout)
    return GetResult(files=sorted(set(out_dir.iterdir()) - before), proc=proc)


def movescu(port: int, aet: str, level: str, keys: Mapping[str, str], destination: str, *,
            root: str = "STUDY", calling: str = "MOVESCU",
            timeout: float = SCU_TIMEOUT_S) -> subprocess.CompletedProcess[str]:
    """C-MOVE (PS3.4 C.4.2) with ``movescu`` to the AE title ``destination`` (a third party).

    Returns the finished process, run with ``-d``; ``final_response(proc)`` gives the final
    status and sub-operation counts (``movescu`` exits non-zero on a failure status).
    """
    return _run([require("movescu"), "-d", "-to", "10", *_query_args(level, keys, root),
                 "-aem", destination, "-aet", calling, "-aec", aet, HOST, str(port)], timeout)
