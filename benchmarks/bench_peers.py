"""The peers a benchmark run drives: the node, DCMTK ``storescp`` and Orthanc, plus DCMTK SCUs.

Self-contained (no pytest): servers listen on OS-assigned loopback ports, are polled
with C-ECHO (PS3.4 A.4) until they answer, never waited for with fixed sleeps, and are
stopped by their PID (SIGTERM, then SIGKILL). Each server's peak memory is watched from
its start (``bench_memory``). Anything that goes wrong raises :class:`BenchError` with
the tail of the process's log.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from bench_memory import PeakMemory

from latentpacs.archive import Archive

logger = logging.getLogger(__name__)

HOST = "127.0.0.1"
START_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 20.0
SCU_TIMEOUT_S = 600.0
CODED_TIMEOUT_S = 1800.0
#: The node's ``archive.data_dir`` under its work folder; the SQLite archive is ``archive.db`` in it.
NODE_DATA_DIR = "data"
#: Orthanc's DICOMweb plugin (Debian package orthanc-dicomweb).
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")


class BenchError(RuntimeError):
    """A peer did not start, answer or finish as the benchmark needs."""


def tool(name: str) -> str:
    """The path of an external program, or BenchError naming the Debian package."""
    found = shutil.which(name)
    if found is None:
        raise BenchError(f"{name} is not installed (Debian packages: dcmtk, orthanc)")
    return found


def free_port() -> int:
    """A TCP port the OS reports free on loopback."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((HOST, 0))
        return int(probe.getsockname()[1])


def _tail(log: Path) -> str:
    return log.read_text(errors="replace")[-3000:] if log.exists() else "(no log)"


@dataclass(frozen=True)
class Server:
    """A started server process: its DICOM port, AE title, log, working directory and memory."""

    name: str
    port: int
    aet: str
    proc: subprocess.Popen[bytes]
    log: Path
    workdir: Path
    memory: PeakMemory
    #: Orthanc's REST port (the instance count is read there); None for the others.
    http_port: int | None = None
    #: The node's web server port (DICOMweb), Orthanc's REST port with its DICOMweb plugin.
    web_port: int | None = None

    def peak_memory_kib(self) -> int:
        """Peak resident memory so far of the process and what it forked, KiB (see bench_memory)."""
        return self.memory.peak_kib()

    def stop(self) -> None:
        """SIGTERM by PID, SIGKILL after a timeout; reap the process."""
        self.memory.stop()
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=STOP_TIMEOUT_S)

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()


def _spawn(argv: Sequence[str | Path], log: Path, cwd: Path,
           env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    with log.open("ab") as handle:
        return subprocess.Popen([str(a) for a in argv], stdout=handle, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, cwd=cwd, env=env)


def echo(port: int, aet: str) -> bool:
    """Whether ``aet`` on ``port`` answers one C-ECHO with Success."""
    done = subprocess.run([tool("echoscu"), "-to", "2", "-ta", "5", "-td", "5", "-aec", aet,
                           HOST, str(port)], capture_output=True, timeout=30)
    return done.returncode == 0


def _poll(ready: Callable[[], bool], proc: subprocess.Popen[bytes], what: str, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    pause = 0.05
    while not ready():
        if proc.poll() is not None:
            raise BenchError(f"{what} exited with {proc.returncode}:\n{_tail(log)}")
        if time.monotonic() > deadline:
            proc.kill()
            raise BenchError(f"{what} did not answer in {START_TIMEOUT_S:.0f} s:\n{_tail(log)}")
        time.sleep(pause)
        pause = min(pause * 1.5, 0.25)


def _started(name: str, port: int, aet: str, proc: subprocess.Popen[bytes], log: Path,
             workdir: Path, http_port: int | None = None) -> Server:
    try:
        _poll(lambda: echo(port, aet), proc, name, log)
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    return Server(name, port, aet, proc, log, workdir, PeakMemory(proc.pid), http_port)


def start_storescp(workdir: Path, *, name: str = "storescp", aet: str = "STORESCP",
                   fork: bool = False, max_pdu: int | None = None) -> Server:
    """DCMTK ``storescp`` writing every received instance as a Part 10 file into ``workdir``.

    Parameters
    ----------
    fork:
        One child process per association (``--fork``), so associations run in parallel;
        without it storescp serves them one after another.
    max_pdu:
        The largest P-DATA PDU it receives (PS3.8 D.3.3.1; DCMTK's default 16 KiB).
    """
    workdir.mkdir(parents=True, exist_ok=True)
    port, log = free_port(), workdir / "storescp.log"
    options = [*(["--fork"] if fork else []), *(["-pdu", str(max_pdu)] if max_pdu else [])]
    proc = _spawn([tool("storescp"), "+xa", "-pm", "-dhl", *options, "-aet", aet, "-od", workdir,
                   "-fe", ".dcm", str(port)], log, workdir)
    return _started(name, port, aet, proc, log, workdir)


def start_node(workdir: Path, *, name: str = "node",
               settings: Mapping[str, str | int | list[str]] | None = None,
               env: dict[str, str] | None = None,
               destinations: Sequence[Server] = ()) -> Server:
    """``latentpacs serve`` with a fresh SQLite archive in ``workdir``.

    ``destinations`` become its C-MOVE destinations (``[destinations.AET]`` host and port,
    README "Settings"). Its web server (``web.enabled``) listens on an OS-assigned port,
    ``Server.web_port`` (None with ``web.enabled`` off), so several nodes run at once.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    data_dir = json.dumps(str(workdir / NODE_DATA_DIR))
    sections: dict[str, list[str]] = {"archive": [f"data_dir = {data_dir}"]}
    for setting, value in (settings or {}).items():
        section, key = setting.split(".", 1)
        sections.setdefault(section, []).append(f"{key} = {json.dumps(value)}")
    for dest in destinations:
        sections[f"destinations.{dest.aet}"] = [f"host = {json.dumps(HOST)}", f"port = {dest.port}"]
    lines = [line for section, body in sections.items() for line in (f"[{section}]", *body)]
    config = workdir / "node.toml"
    config.write_text("\n".join(lines) + "\n")
    port_file, log = workdir / "node.port", workdir / "node.log"
    web_port_file = workdir / "web.port"
    web_port_file.unlink(missing_ok=True)
    script = Path(sys.executable).parent / "latentpacs"
    environment = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    proc = _spawn([script, "--config", config, "serve", "--host", HOST, "--port", "0",
                   "--port-file", port_file, "--web-port", "0", "--web-port-file", web_port_file],
                  log, workdir, environment)

    def written(path: Path = port_file) -> bool:
        text = path.read_text() if path.exists() else ""
        return text.endswith("\n") and text.strip().isdigit()

    _poll(written, proc, "latentpacs serve", log)
    # The node writes the web port file before the DIMSE one (when web.enabled).
    web_port = int(web_port_file.read_text()) if written(web_port_file) else None
    server = _started(name, int(port_file.read_text()), "LATENTPACS", proc, log, workdir)
    return dataclasses.replace(server, web_port=web_port)


def start_pynetdicom_floor(workdir: Path, files: Sequence[Path],
                           destination: Server | None = None) -> Server:
    """A bare pynetdicom C-GET / C-MOVE SCP serving ``files`` from memory (``pynetdicom_floor.py``),
    sending through the node's own sending path (``--fast``): the cost of sending alone."""
    workdir.mkdir(parents=True, exist_ok=True)
    port, log = free_port(), workdir / "floor.log"
    script = Path(__file__).with_name("pynetdicom_floor.py")
    move = ["--move-destination", destination.aet, HOST, str(destination.port)] if destination else []
    proc = _spawn([sys.executable, script, str(port), "--fast", *move, *files], log, workdir)
    return _started("pynetdicom-floor", port, "FLOOR", proc, log, workdir)


def start_orthanc(workdir: Path, *, destinations: Sequence[Server] = (),
                  dicomweb: bool = False) -> Server:
    """Orthanc 1.x with a fresh storage area, every DIMSE service allowed.

    ``destinations`` become its known modalities (``DicomModalities``), so a C-MOVE to
    their AE titles is sent there. ``dicomweb`` loads its DICOMweb plugin (PS3.18 server
    at ``/dicom-web/`` of the REST port, ``Server.web_port``); otherwise no plugins.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    if dicomweb and not DICOMWEB_PLUGIN.exists():
        raise BenchError(f"{DICOMWEB_PLUGIN} is missing (Debian package orthanc-dicomweb)")
    http_port, port = free_port(), free_port()
    config = {
        "Name": "latentpacs-bench", "StorageDirectory": str(workdir / "storage"),
        "IndexDirectory": str(workdir / "index"), "HttpPort": http_port,
        "Plugins": [str(DICOMWEB_PLUGIN)] if dicomweb else [],
        "RemoteAccessAllowed": False, "AuthenticationEnabled": False,
        "DicomServerEnabled": True, "DicomAet": "ORTHANC", "DicomPort": port,
        "DicomCheckCalledAet": False, "DicomAlwaysAllowEcho": True,
        "DicomAlwaysAllowStore": True, "DicomAlwaysAllowFind": True,
        "DicomAlwaysAllowGet": True, "DicomAlwaysAllowMove": True,
        "UnknownSopClassAccepted": True, "SaveJobs": False, "SyncStorageArea": False,
        "DicomAssociationCloseDelay": 0,
        "DicomModalities": {dest.aet.lower(): [dest.aet, HOST, dest.port] for dest in destinations},
        **({"DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": False}} if dicomweb else {}),
    }
    (workdir / "orthanc.json").write_text(json.dumps(config, indent=2))
    log = workdir / "orthanc.log"
    proc = _spawn([tool("Orthanc"), "--no-jobs", workdir / "orthanc.json"], log, workdir)

    def rest_up() -> bool:
        try:
            with urllib.request.urlopen(f"http://{HOST}:{http_port}/system", timeout=5):
                return True
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return False

    _poll(rest_up, proc, "Orthanc", log)
    server = _started("orthanc", port, "ORTHANC", proc, log, workdir, http_port)
    return dataclasses.replace(server, web_port=http_port if dicomweb else None)


def stored_instances(server: Server) -> int:
    """How many instances ``server`` holds now: files storescp wrote, Orthanc's count, the node's."""
    if server.http_port is not None:  # Orthanc's REST API (GET /statistics)
        url = f"http://{HOST}:{server.http_port}/statistics"
        with urllib.request.urlopen(url, timeout=30) as answer:
            return int(json.load(answer)["CountInstances"])
    if (server.workdir / NODE_DATA_DIR / "archive.db").exists():
        with node_archive(server) as archive:
            return archive.stats().instances
    return len(list(server.workdir.glob("*.dcm")))


def clear_received(server: Server) -> None:
    """Delete the Part 10 files a ``storescp`` wrote (between C-MOVE runs to it)."""
    for path in server.workdir.glob("*.dcm"):
        path.unlink()


def run_scu(argv: Sequence[str | Path]) -> float:
    """Run a DCMTK SCU to completion; its wall time in seconds. BenchError unless it exits 0."""
    command = [str(a) for a in argv]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, timeout=SCU_TIMEOUT_S,
                          stdin=subprocess.DEVNULL)
    elapsed = time.perf_counter() - start
    if done.returncode != 0:
        raise BenchError(f"{' '.join(command)} exited {done.returncode}:\n"
                         f"{(done.stdout + done.stderr)[-3000:]}")
    return elapsed


def _storescu_argv(server: Server, files: Sequence[Path]) -> list[str]:
    return [tool("storescu"), "-to", "30", "-aet", "BENCH", "-aec", server.aet, HOST,
            str(server.port), *map(str, files)]


def storescu(server: Server, files: Sequence[Path]) -> float:
    """C-STORE ``files`` in one association (PS3.4 Annex B); wall seconds."""
    return run_scu(_storescu_argv(server, files))


def storescu_parallel(server: Server, groups: Sequence[Sequence[Path]], logs: Path) -> float:
    """One ``storescu`` per group, all started together, each in its own association.

    Returns the wall seconds from the first start to the last exit. BenchError unless
    every one exits 0; the others are then stopped by their PID.
    """
    logs.mkdir(parents=True, exist_ok=True)
    handles = [(logs / f"storescu-{n}.log").open("wb") for n in range(len(groups))]
    procs: list[subprocess.Popen[bytes]] = []
    try:
        start = time.perf_counter()
        for group, handle in zip(groups, handles):
            procs.append(subprocess.Popen(_storescu_argv(server, group), stdout=handle,
                                          stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL))
        codes = [proc.wait(timeout=SCU_TIMEOUT_S) for proc in procs]
        elapsed = time.perf_counter() - start
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        for handle in handles:
            handle.close()
    failed = [n for n, code in enumerate(codes) if code != 0]
    if failed:
        raise BenchError(f"storescu {failed} into {server.name} failed:\n"
                         f"{_tail(logs / f'storescu-{failed[0]}.log')}")
    return elapsed


def getscu_study(server: Server, study_uid: str, out_dir: Path, max_pdu: int | None = None,
                 *, jpeg_ls: bool = False) -> float:
    """C-GET one study (Study Root, PS3.4 C.4.3) into ``out_dir``; wall seconds.

    ``max_pdu`` is the largest PDU getscu receives (PS3.8 D.3.3.1; DCMTK's default 16 KiB).
    ``jpeg_ls``: getscu prefers JPEG-LS lossless for what it receives (``+xt``), so a
    server may send a JPEG-LS stream it keeps without decoding it.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    pdu = ["-pdu", str(max_pdu)] if max_pdu else []
    syntax = ["+xt"] if jpeg_ls else []
    return run_scu([tool("getscu"), "-to", "30", *pdu, *syntax, "-S", "-k", "QueryRetrieveLevel=STUDY",
                    "-k", f"StudyInstanceUID={study_uid}", "-od", out_dir, "-aet", "BENCH",
                    "-aec", server.aet, HOST, str(server.port)])


def movescu_study(server: Server, study_uid: str, destination: Server) -> float:
    """C-MOVE one study (Study Root, PS3.4 C.4.2) to ``destination``'s AE title; wall seconds.

    movescu opens no port of its own, so the sub-operations go to the third party that
    ``server`` knows under that AE title; movescu exits once the final response came.
    """
    return run_scu([tool("movescu"), "-to", "30", "-S", "-k", "QueryRetrieveLevel=STUDY",
                    "-k", f"StudyInstanceUID={study_uid}", "-aet", "BENCH",
                    "-aec", server.aet, "-aem", destination.aet, HOST, str(server.port)])


def node_archive(node: Server) -> Archive:
    """The node's SQLite archive, opened beside it (no migration, no blob sweep); close it after use."""
    database = node.workdir / NODE_DATA_DIR / "archive.db"
    return Archive(f"sqlite:///{database}", migrate=False, sweep=False)


def pending_instances(archive: Archive) -> int:
    """Instances the node has acknowledged but not yet coded (deferred coding, issue 10).

    The one place that knows how "pending" is read: ``ArchiveStats.pending``, the figure
    ``latentpacs archive stats --json`` prints as ``pending`` (latent rows whose stream
    coder is still ``received``). It is read in this process on an archive opened once,
    since starting the CLI for every poll would cost about 1.5 s of CPU on the cores
    being measured.
    """
    return archive.stats().pending


def wait_until_coded(node: Server) -> float:
    """Poll :func:`pending_instances` until it is 0; seconds from the call to that answer.

    BenchError if the node exits, or anything is still pending after CODED_TIMEOUT_S.
    """
    start = time.perf_counter()
    pause = 0.005
    with node_archive(node) as archive:
        while (pending := pending_instances(archive)) > 0:
            if node.proc.poll() is not None:
                raise BenchError(f"{node.name} exited with {pending} pending:\n{_tail(node.log)}")
            if time.perf_counter() - start > CODED_TIMEOUT_S:
                raise BenchError(f"{node.name}: {pending} instances still pending after "
                                 f"{CODED_TIMEOUT_S:.0f} s:\n{_tail(node.log)}")
            time.sleep(pause)
            pause = min(pause * 1.5, 0.05)
    return time.perf_counter() - start
