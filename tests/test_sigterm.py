"""Graceful stop: ``latentpacs serve`` on SIGTERM or SIGINT (Node.stop, node/app.py).

The node stops accepting associations at once, lets the ones in flight finish for up to
``node.shutdown_grace`` seconds, aborts the rest (A-ABORT, PS3.8 7.3), and exits 0.

The in-flight association is a pynetdicom Storage SCU the test drives step by step, so
the signal lands deterministically between two C-STOREs of one association: the first
image is committed (Success), the signal is sent, the test waits until a new association
is refused, and only then sends the remaining images on the open association.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.association import Association

from latentpacs import phantom
from latentpacs.archive import Archive
from latentpacs.errors import Status
from netpeers import HOST, NodeProcess, echoscu, start_node
from test_node import write_config

#: Failure bound for waits on the node (never a timing assertion: a correct node is far faster).
WAIT_S = 120.0


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return phantom.generate(tmp_path_factory.mktemp("phantoms"), 4, seed=31, size=(64, 52),
                            images_per_study=4)


def _associate(node: NodeProcess, images: list[Path]) -> Association:
    """A Storage SCU association (PS3.4 B) for the phantoms' SOP classes."""
    ae = AE(ae_title="SENDER")
    for sop_class in sorted({str(pydicom.dcmread(path).SOPClassUID) for path in images}):
        ae.add_requested_context(sop_class, [ExplicitVRLittleEndian])
    ae.network_timeout = ae.acse_timeout = ae.dimse_timeout = 60
    assoc = ae.associate(HOST, node.port, ae_title=node.aet)
    assert assoc.is_established
    return assoc


def _store(assoc: Association, path: Path) -> int:
    status = assoc.send_c_store(pydicom.dcmread(path))
    return int(status.Status) if "Status" in status else -1


def _wait_until_refused(node: NodeProcess) -> None:
    """Poll with C-ECHO until a new association is refused (the listener is closed)."""
    deadline = time.monotonic() + WAIT_S
    while echoscu(node.port, node.aet, timeout=30).returncode == 0:
        if time.monotonic() > deadline:
            pytest.fail(f"the node still accepts associations {WAIT_S:.0f} s after the signal")
        time.sleep(0.1)


def _exit_code(node: NodeProcess) -> int:
    try:
        return node.proc.wait(timeout=WAIT_S)
    except Exception:
        pytest.fail(f"the node did not exit after the signal:\n{node.log.read_text()[-4000:]}")


def test_sigterm_lets_the_in_flight_association_finish(tmp_path: Path, images: list[Path]) -> None:
    database = f"sqlite:///{tmp_path / 'a.db'}"
    config = write_config(tmp_path, database, node={"shutdown_grace": 300.0})
    with start_node(config) as node:
        assoc = _associate(node, images)
        assert _store(assoc, images[0]) == Status.SUCCESS  # committed before the signal
        node.proc.send_signal(signal.SIGTERM)
        _wait_until_refused(node)
        assert assoc.is_established  # the in-flight association is untouched ...
        assert [_store(assoc, path) for path in images[1:]] == [Status.SUCCESS] * 3  # ... and served
        assoc.release()
        assert _exit_code(node) == 0
    log = node.log.read_text()
    assert "SIGTERM: accepting no new associations" in log and "aborting" not in log
    with Archive(database) as archive:  # every image of that association was stored
        assert archive.stats().instances == len(images)


def test_an_association_that_outlasts_the_grace_is_aborted(tmp_path: Path, images: list[Path]) -> None:
    # The idle timeout is far beyond the wait: only the grace can end the idle association.
    # (Lossless tier: nothing is coded after the signal, and no model engine is built.)
    config = write_config(tmp_path, f"sqlite:///{tmp_path / 'a.db'}", codec={"tier": "lossless"},
                          node={"shutdown_grace": 1.0, "network_timeout": 3600.0})
    with start_node(config) as node:
        idle = _associate(node, images)
        assert _store(idle, images[0]) == Status.SUCCESS
        idle.network_timeout = 3600.0  # neither side ends it by itself
        node.proc.send_signal(signal.SIGINT)  # SIGINT (Ctrl-C) stops the same way
        assert _exit_code(node) == 0
        idle.join(WAIT_S)
        assert idle.is_aborted and not idle.is_established
    log = node.log.read_text()
    assert "SIGINT: accepting no new associations" in log and "aborting the association" in log
