"""The peers a benchmark run drives: the node, DCMTK ``storescp`` and Orthanc, plus DCMTK SCUs.

Self-contained (no pytest): servers listen on OS-assigned loopback ports, are polled
with C-ECHO (PS3.4 A.4) until they answer, never waited for with fixed sleeps, and are
stopped by their PID (SIGTERM, then SIGKILL). Anything that goes wrong raises
:class:`BenchError` with the tail of the process's log.
"""

from __future__ import annotations

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
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

HOST = "127.0.0.1"
START_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 20.0
SCU_TIMEOUT_S = 600.0


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
    """A started server process: its DICOM port, AE title, log and working directory."""

    name: str
    port: int
    aet: str
    proc: subprocess.Popen[bytes]
    log: Path
    workdir: Path

    def peak_rss_kib(self) -> int:
        """Peak resident set size so far (VmHWM of /proc/<pid>/status), KiB."""
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
        raise BenchError(f"no VmHWM for pid {self.proc.pid}")

    def stop(self) -> None:
        """SIGTERM by PID, SIGKILL after a timeout; reap the process."""
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


def _poll(ready: object, proc: subprocess.Popen[bytes], what: str, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    pause = 0.05
    while not ready():  # type: ignore[operator]
        if proc.poll() is not None:
            raise BenchError(f"{what} exited with {proc.returncode}:\n{_tail(log)}")
        if time.monotonic() > deadline:
            proc.kill()
            raise BenchError(f"{what} did not answer in {START_TIMEOUT_S:.0f} s:\n{_tail(log)}")
        time.sleep(pause)
        pause = min(pause * 1.5, 0.25)


def _started(name: str, port: int, aet: str, proc: subprocess.Popen[bytes], log: Path,
             workdir: Path) -> Server:
    try:
        _poll(lambda: echo(port, aet), proc, name, log)
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    return Server(name, port, aet, proc, log, workdir)


def start_storescp(workdir: Path) -> Server:
    """DCMTK ``storescp`` writing every received instance as a Part 10 file."""
    workdir.mkdir(parents=True, exist_ok=True)
    port, log = free_port(), workdir / "storescp.log"
    proc = _spawn([tool("storescp"), "+xa", "-pm", "-dhl", "-aet", "STORESCP", "-od", workdir,
                   "-fe", ".dcm", str(port)], log, workdir)
    return _started("storescp", port, "STORESCP", proc, log, workdir)


def start_node(workdir: Path, *, settings: dict[str, str | int] | None = None,
               env: dict[str, str] | None = None) -> Server:
    """``latentpacs serve`` with a fresh SQLite archive in ``workdir``."""
    workdir.mkdir(parents=True, exist_ok=True)
    sections: dict[str, list[str]] = {"archive": [f"data_dir = {json.dumps(str(workdir / 'data'))}"]}
    for name, value in (settings or {}).items():
        section, key = name.split(".", 1)
        sections.setdefault(section, []).append(f"{key} = {json.dumps(value)}")
    lines = [line for section, body in sections.items() for line in (f"[{section}]", *body)]
    config = workdir / "node.toml"
    config.write_text("\n".join(lines) + "\n")
    port_file, log = workdir / "node.port", workdir / "node.log"
    script = Path(sys.executable).parent / "latentpacs"
    environment = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    proc = _spawn([script, "--config", config, "serve", "--host", HOST, "--port", "0",
                   "--port-file", port_file], log, workdir, environment)

    def written() -> bool:
        text = port_file.read_text() if port_file.exists() else ""
        return text.endswith("\n") and text.strip().isdigit()

    _poll(written, proc, "latentpacs serve", log)
    return _started("node", int(port_file.read_text()), "LATENTPACS", proc, log, workdir)


def start_pynetdicom_floor(workdir: Path, files: Sequence[Path]) -> Server:
    """A bare pynetdicom C-GET SCP serving ``files`` from memory (``pynetdicom_floor.py``)."""
    workdir.mkdir(parents=True, exist_ok=True)
    port, log = free_port(), workdir / "floor.log"
    script = Path(__file__).with_name("pynetdicom_floor.py")
    proc = _spawn([sys.executable, script, str(port), *files], log, workdir)
    return _started("pynetdicom-floor", port, "FLOOR", proc, log, workdir)


def start_orthanc(workdir: Path) -> Server:
    """Orthanc 1.x with a fresh storage area, no plugins, every DIMSE service allowed."""
    workdir.mkdir(parents=True, exist_ok=True)
    http_port, port = free_port(), free_port()
    config = {
        "Name": "latentpacs-bench", "StorageDirectory": str(workdir / "storage"),
        "IndexDirectory": str(workdir / "index"), "Plugins": [], "HttpPort": http_port,
        "RemoteAccessAllowed": False, "AuthenticationEnabled": False,
        "DicomServerEnabled": True, "DicomAet": "ORTHANC", "DicomPort": port,
        "DicomCheckCalledAet": False, "DicomAlwaysAllowEcho": True,
        "DicomAlwaysAllowStore": True, "DicomAlwaysAllowFind": True,
        "DicomAlwaysAllowGet": True, "DicomAlwaysAllowMove": True,
        "UnknownSopClassAccepted": True, "SaveJobs": False, "SyncStorageArea": False,
        "DicomAssociationCloseDelay": 0,
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
    return _started("orthanc", port, "ORTHANC", proc, log, workdir)


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


def storescu(server: Server, files: Sequence[Path]) -> float:
    """C-STORE ``files`` in one association (PS3.4 Annex B); wall seconds."""
    return run_scu([tool("storescu"), "-to", "30", "-aet", "BENCH", "-aec", server.aet, HOST,
                    str(server.port), *files])


def getscu_study(server: Server, study_uid: str, out_dir: Path, max_pdu: int | None = None) -> float:
    """C-GET one study (Study Root, PS3.4 C.4.3) into ``out_dir``; wall seconds.

    ``max_pdu`` is the largest PDU getscu receives (PS3.8 D.3.3.1; DCMTK's default 16 KiB).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    pdu = ["-pdu", str(max_pdu)] if max_pdu else []
    return run_scu([tool("getscu"), "-to", "30", *pdu, "-S", "-k", "QueryRetrieveLevel=STUDY",
                    "-k", f"StudyInstanceUID={study_uid}", "-od", out_dir, "-aet", "BENCH",
                    "-aec", server.aet, HOST, str(server.port)])
