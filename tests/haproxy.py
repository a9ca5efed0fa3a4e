"""HAProxy in TCP mode in front of node processes, for cluster tests (Debian package haproxy).

The configuration is ``deploy/haproxy.cfg`` as shipped, with only what a test machine
must change rewritten: the frontend binds an OS-assigned loopback port, the backend lists
the given nodes (each with the shipped ``check`` health check), the stats socket lives in
the work folder, and the global section's process settings (``chroot``, ``user``,
``group``, ``daemon``) are dropped and the log goes to stdout, so HAProxy runs in the foreground
(``-db``) as a child of the test and is stopped by its PID. A line the rewrite expects
but does not find fails the test: the recipe and the harness cannot drift apart.
The proxy is polled with C-ECHO (PS3.4 A.4) through the frontend until a node answers.
A missing ``haproxy`` fails the test (never a skip).
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from netpeers import (HOST, _Stoppable, START_TIMEOUT_S, NodeProcess, _fail_if_exited, _port_written, _spawn,
                      _stop, free_port, wait_for_echo)

DEPLOY_CONFIG = Path(__file__).resolve().parents[1] / "deploy" / "haproxy.cfg"
_DROPPED = re.compile(r"^\s*(chroot|user|group|daemon)\b.*$", re.MULTILINE)
_SYSLOG = re.compile(r"^(\s*)log /dev/log local0$", re.MULTILINE)
_BIND = re.compile(r"^(\s*)bind :11112$", re.MULTILINE)
_SERVERS = re.compile(r"^\s*server node\d .*check\n", re.MULTILINE)
_STATS = re.compile(r"^(\s*stats socket )/run/haproxy/admin\.sock( .*)$", re.MULTILINE)


def require_haproxy() -> str:
    """The path of ``haproxy``; fails the test (never skips) when it is not installed."""
    path = shutil.which("haproxy") or shutil.which("/usr/sbin/haproxy")
    if path is None:
        pytest.fail("haproxy is required: apt-get install haproxy")
    return path


def _substitute(pattern: re.Pattern[str], replacement: str, text: str, what: str,
                count: int = 1) -> str:
    new, found = pattern.subn(replacement, text)
    if found != count:
        pytest.fail(f"{DEPLOY_CONFIG}: expected {count} {what} line(s), found {found}")
    return new


def render_config(port: int, backends: Sequence[tuple[str, int]], stats_socket: Path, *,
                  server_options: str = "", frontend_lines: Sequence[str] = ()) -> str:
    """``deploy/haproxy.cfg`` for a test: frontend on ``HOST:port``, one server per backend.

    ``backends`` are ``(name, port)`` pairs of nodes on loopback; ``server_options`` are
    appended to each ``server`` line (e.g. ``send-proxy-v2 check-send-proxy``),
    ``frontend_lines`` follow the frontend's ``bind``.
    """
    text = DEPLOY_CONFIG.read_text()
    text = _substitute(_DROPPED, "", text, "process setting", count=4)
    text = _substitute(_SYSLOG, r"\1log stdout format raw local0 info", text, "syslog target")
    extra = "".join(f"\n    {line}" for line in frontend_lines)
    text = _substitute(_BIND, rf"\1bind {HOST}:{port}{extra}", text, "frontend bind")
    servers = "".join(f"    server {name} {HOST}:{node_port} check {server_options}".rstrip() + "\n"
                      for name, node_port in backends)
    text = _substitute(_SERVERS, "", text, "backend server", count=3)
    text = text.rstrip("\n") + "\n" + servers
    return _substitute(_STATS, rf"\g<1>{stats_socket}\2", text, "stats socket")


@dataclass(frozen=True)
class ServerStat:
    """One backend server as HAProxy's ``show stat`` reports it."""

    name: str
    #: ``UP``, ``DOWN``, ``UP 1/2`` (going down), ``DOWN 1/2`` (coming up), ``MAINT``...
    status: str
    #: Sessions open now (here: associations in progress on that node).
    current_sessions: int
    #: Sessions since start.
    total_sessions: int


@dataclass(frozen=True)
class Proxy(_Stoppable):
    """A running HAProxy: DICOM frontend on ``port``, admin socket at ``stats_socket``."""

    port: int
    proc: subprocess.Popen[bytes]
    config: Path
    log: Path
    stats_socket: Path

    def command(self, line: str) -> str:
        """One command on the admin socket (HAProxy management guide, section 9.3)."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
            client.settimeout(10.0)
            client.connect(str(self.stats_socket))
            client.sendall(line.encode() + b"\n")
            chunks = []
            while chunk := client.recv(65536):
                chunks.append(chunk)
        return b"".join(chunks).decode()

    def servers(self) -> dict[str, ServerStat]:
        """The backend's servers by name, from ``show stat`` (CSV: pxname, svname, ...)."""
        lines = self.command("show stat").splitlines()
        if not lines or not lines[0].startswith("# "):
            pytest.fail(f"HAProxy's show stat answered {lines[:3]!r}")
        header = lines[0][2:].split(",")
        found = {}
        for line in lines[1:]:
            row = dict(zip(header, line.split(","), strict=False))
            if row.get("pxname") == "latentpacs" and row.get("svname") not in ("BACKEND", None):
                found[row["svname"]] = ServerStat(
                    name=row["svname"], status=row["status"],
                    current_sessions=int(row["scur"] or 0), total_sessions=int(row["stot"] or 0))
        return found


def start_haproxy(workdir: Path, backends: Sequence[tuple[str, int]], *, aet: str,
                  server_options: str = "", frontend_lines: Sequence[str] = (),
                  timeout: float = START_TIMEOUT_S) -> Proxy:
    """Start HAProxy in front of ``backends`` (``(name, port)`` pairs); returns once a
    C-ECHO to ``aet`` through the frontend succeeds.

    ``server_options`` and ``frontend_lines``: see :func:`render_config`.

    Configuration ``workdir/haproxy.cfg`` (checked with ``haproxy -c`` first), log
    ``workdir/haproxy.log``.
    """
    binary = require_haproxy()
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    config = workdir / "haproxy.cfg"
    stats_socket = workdir / "haproxy.sock"
    config.write_text(render_config(port, backends, stats_socket, server_options=server_options,
                                    frontend_lines=frontend_lines))
    check = subprocess.run([binary, "-c", "-f", str(config)], capture_output=True, text=True,
                           timeout=30, stdin=subprocess.DEVNULL)
    if check.returncode != 0:
        pytest.fail(f"haproxy -c rejected {config}:\n{check.stdout}{check.stderr}")
    log = workdir / "haproxy.log"
    proc = _spawn([binary, "-db", "-f", config], log)
    try:
        wait_for_echo(port, aet, timeout=timeout, proc=proc, log=log)
    except BaseException:
        _stop(proc)
        raise
    return Proxy(port=port, proc=proc, config=config, log=log, stats_socket=stats_socket)


def start_node_behind_proxy(config: Path, workdir: Path,
                            timeout: float = START_TIMEOUT_S) -> NodeProcess:
    """Start ``latentpacs serve`` like :func:`netpeers.start_node`, but wait only for its
    port file: a node with ``node.proxy_protocol`` closes a direct C-ECHO (no PROXY
    header), so the proxy's C-ECHO in :func:`start_haproxy` is the readiness check.
    """
    script = Path(sys.executable).parent / "latentpacs"
    port_file = workdir / "node.port"
    port_file.unlink(missing_ok=True)
    log = workdir / "node.log"
    proc = _spawn([script, "--config", config, "serve", "--port", "0", "--port-file", port_file,
                   "--web-port", "0"], log,
                  env={**os.environ, "PYTHONUNBUFFERED": "1"}, cwd=workdir)
    deadline = time.monotonic() + timeout
    while not _port_written(port_file):
        _fail_if_exited(proc, "latentpacs serve", log)
        if time.monotonic() > deadline:
            _stop(proc)
            pytest.fail(f"latentpacs serve wrote no port to {port_file} within {timeout:.0f} s")
        time.sleep(0.05)
    return NodeProcess(port=int(port_file.read_text().strip()), aet="LATENTPACS", proc=proc,
                       log=log)
