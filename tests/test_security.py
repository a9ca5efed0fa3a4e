"""Safe by default: unknown peers may echo and store only (``security.*``, node/peers.py).

The policy is tested as pure logic, then through a real node driven by DCMTK's SCUs. The
test machine only has loopback, and loopback peers are trusted by default
(``security.trust_loopback``), so the network tests turn that off: a calling AE title then
decides. A refusal is Refused: Not authorized (0124H, PS3.7 C.5.25) with an ErrorComment,
and nothing leaves the archive: no C-STORE sub-operation, no C-MOVE sub-association.
"""

from __future__ import annotations

import ssl
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest

from latentpacs import phantom
from latentpacs.config import Destination, load_config
from latentpacs.errors import ConfigError, NotAuthorizedError, Status
from latentpacs.node.peers import DimseService, MoveDestinations, PeerPolicy, Requestor
from netpeers import (
    NodeProcess,
    StoreSCP,
    dimse_responses,
    echoscu,
    final_response,
    findscu,
    getscu,
    movescu,
    start_node,
    start_storescp,
    storescu,
)
from test_node import write_config

ALL = frozenset(DimseService)
ECHO_STORE = frozenset({DimseService.ECHO, DimseService.STORE})


# --- the policy, as pure logic ----------------------------------------------------------


def test_defaults_let_unknown_peers_echo_and_store_only() -> None:
    policy = PeerPolicy.from_config(load_config(environ={}))
    assert policy.allowed(Requestor("MODALITY", "10.1.2.3")) == ECHO_STORE
    assert policy.allowed(Requestor("MODALITY", "2001:db8::7")) == ECHO_STORE
    # Loopback peers count as listed (the README walkthrough on one machine).
    for address in ("127.0.0.1", "127.8.9.10", "::1", "::ffff:127.0.0.1"):
        assert policy.allowed(Requestor("ANYONE", address)) == ALL, address
    # Addresses that merely look local are not loopback.
    for address in ("10.127.0.1", "::ffff:10.0.0.1", "localhost", ""):
        assert policy.allowed(Requestor("ANYONE", address)) == ECHO_STORE, address


def test_listed_ae_titles_may_do_everything() -> None:
    policy = PeerPolicy.of(["FRIEND", " VIEWER "], ["echo", "store"], trust_loopback=False)
    assert policy.allowed(Requestor("FRIEND", "10.1.2.3")) == ALL
    assert policy.allowed(Requestor("VIEWER  ", "10.1.2.3")) == ALL  # PS3.5: padding not significant
    assert policy.allowed(Requestor("friend", "10.1.2.3")) == ECHO_STORE  # AE titles are case-sensitive
    assert policy.allowed(Requestor("STRANGER", "127.0.0.1")) == ECHO_STORE  # loopback not trusted


def test_a_refusal_names_the_ae_title_and_the_service() -> None:
    policy = PeerPolicy.of([], ["echo", "store", "find"], trust_loopback=False)
    stranger = Requestor("STRANGER", "10.1.2.3")
    policy.check(stranger, DimseService.FIND)  # allowed: no exception
    with pytest.raises(NotAuthorizedError) as refused:
        policy.check(stranger, DimseService.GET)
    assert refused.value.status == Status.NOT_AUTHORIZED == 0x0124
    assert refused.value.error_comment == "calling AE title STRANGER may not use C-GET"
    with pytest.raises(NotAuthorizedError, match="may not use C-MOVE"):
        policy.check(stranger, DimseService.MOVE)


def test_unknown_peer_services_are_checked() -> None:
    assert PeerPolicy.from_config(load_config(environ={"LATENTPACS_SECURITY_UNKNOWN_PEERS": ""})
                                  ).allowed(Requestor("X", "10.0.0.1")) == frozenset()
    with pytest.raises(ConfigError, match="retrieve not among"):
        load_config(environ={"LATENTPACS_SECURITY_UNKNOWN_PEERS": "echo,retrieve"})
    with pytest.raises(ConfigError, match="unknown_peers"):
        PeerPolicy.of([], ["echo", "delete"], trust_loopback=True)


def test_move_destinations_reach_tls_ones_over_tls() -> None:
    plain, secure = Destination("VIEWER", "10.0.0.5", 104), Destination("SAFE", "pacs.example", 2762, tls=True)
    with pytest.raises(ConfigError, match=r"destinations.SAFE\] has tls = true"):
        MoveDestinations({"VIEWER": plain, "SAFE": secure})
    context = ssl.create_default_context()
    destinations = MoveDestinations({"VIEWER": plain, "SAFE": secure}, context)
    assert destinations.address("VIEWER") == ("10.0.0.5", 104)
    assert destinations.address("SAFE ") == ("pacs.example", 2762, {"tls_args": (context, "pacs.example")})
    assert destinations.address("NOWHERE") is None


# --- a node with loopback not trusted ----------------------------------------------------

#: The refusals' ErrorComment (0000,0902) as DCMTK prints it.
REFUSED = "calling AE title STRANGER may not use {}"


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Two small images of one study."""
    return phantom.generate(tmp_path_factory.mktemp("phantoms"), 2, seed=21, size=(64, 52),
                            images_per_study=2)


@pytest.fixture(scope="module")
def viewer(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StoreSCP]:
    folder = tmp_path_factory.mktemp("viewer")
    with start_storescp(folder / "received", aet="VIEWER") as scp:
        yield scp


def _strict_node(folder: Path, viewer: StoreSCP, unknown_peers: list[str]) -> NodeProcess:
    """A node with access control; at the lossless tier (the checks are the same at every
    tier, and it starts without building a model engine)."""
    config = write_config(
        folder, f"sqlite:///{folder / 'a.db'}", codec={"tier": "lossless"},
        security={"allowed_calling_aets": ["FRIEND"], "trust_loopback": "false",
                  "unknown_peers": unknown_peers},
        **{"destinations.VIEWER": {"host": "127.0.0.1", "port": viewer.port}},
    )
    return start_node(config)


@pytest.fixture(scope="module")
def strict_node(tmp_path_factory: pytest.TempPathFactory, viewer: StoreSCP) -> Iterator[NodeProcess]:
    """Loopback not trusted, FRIEND listed, unknown peers: the defaults (echo, store)."""
    with _strict_node(tmp_path_factory.mktemp("strict"), viewer, ["echo", "store"]) as node:
        yield node


def _associations(scp: StoreSCP) -> int:
    """How many associations the storescp has received (its ``-v`` log)."""
    return scp.log.read_text(errors="replace").count("Association Received")


def test_a_stranger_may_echo_and_store_but_not_query_or_retrieve(
    strict_node: NodeProcess, viewer: StoreSCP, images: list[Path], tmp_path: Path
) -> None:
    node = strict_node
    assert echoscu(node.port, node.aet, calling="STRANGER").returncode == 0
    stored = storescu(node.port, node.aet, images, calling="STRANGER")
    assert [r.status for r in dimse_responses(stored)] == [Status.SUCCESS] * len(images)
    study = str(pydicom.dcmread(images[0]).StudyInstanceUID)

    found = findscu(node.port, node.aet, "STUDY", {"StudyInstanceUID": study}, calling="STRANGER")
    assert found.datasets == []
    assert (found.final.status, found.final.error_comment) == (Status.NOT_AUTHORIZED, REFUSED.format("C-FIND"))

    got = getscu(node.port, node.aet, "STUDY", {"StudyInstanceUID": study}, tmp_path / "got",
                 calling="STRANGER")
    assert (got.final.status, got.final.error_comment) == (Status.NOT_AUTHORIZED, REFUSED.format("C-GET"))
    assert got.final.completed in (None, 0)
    assert list((tmp_path / "got").iterdir()) == []  # no C-STORE sub-operation arrived

    before, files = _associations(viewer), viewer.files()
    for destination in ("VIEWER", "NOWHERE"):  # refused before the destination is looked up
        proc = movescu(node.port, node.aet, "STUDY", {"StudyInstanceUID": study}, destination,
                       calling="STRANGER")
        assert len(dimse_responses(proc)) == 1  # one final response, nothing before or after
        moved = final_response(proc)
        assert (moved.status, moved.error_comment) == (Status.NOT_AUTHORIZED, REFUSED.format("C-MOVE"))
        assert moved.completed in (None, 0)
    assert viewer.files() == files
    assert _associations(viewer) == before  # no sub-association was even opened


def test_a_listed_ae_title_may_do_everything(
    strict_node: NodeProcess, viewer: StoreSCP, images: list[Path], tmp_path: Path
) -> None:
    node = strict_node
    stored = storescu(node.port, node.aet, images, calling="FRIEND")
    assert [r.status for r in dimse_responses(stored)] == [Status.SUCCESS] * len(images)
    study = str(pydicom.dcmread(images[0]).StudyInstanceUID)
    found = findscu(node.port, node.aet, "IMAGE", {"StudyInstanceUID": study, "SOPInstanceUID": ""},
                    calling="FRIEND")
    assert found.final.status == Status.SUCCESS and len(found.datasets) == len(images)
    got = getscu(node.port, node.aet, "STUDY", {"StudyInstanceUID": study}, tmp_path / "got",
                 calling="FRIEND")
    assert got.final.status == Status.SUCCESS and len(got.files) == len(images)
    associations = _associations(viewer)
    moved = final_response(movescu(node.port, node.aet, "STUDY", {"StudyInstanceUID": study},
                                   "VIEWER", calling="FRIEND"))
    assert (moved.status, moved.completed) == (Status.SUCCESS, len(images))
    assert len(viewer.files()) >= len(images)
    assert _associations(viewer) == associations + 1  # what the stranger's refusal never opened
    unknown = final_response(movescu(node.port, node.aet, "STUDY", {"StudyInstanceUID": study},
                                     "NOWHERE", calling="FRIEND"))
    assert unknown.status == Status.MOVE_DESTINATION_UNKNOWN  # a listed peer learns that


def test_a_wrong_called_ae_title_is_rejected_at_association(strict_node: NodeProcess) -> None:
    wrong = echoscu(strict_node.port, "WRONG", calling="FRIEND")
    assert wrong.returncode != 0
    assert "Called AE Title Not Recognized" in wrong.stdout + wrong.stderr
    assert echoscu(strict_node.port, strict_node.aet, calling="FRIEND").returncode == 0


def test_unknown_peers_setting_can_allow_find_but_not_get(
    tmp_path: Path, viewer: StoreSCP, images: list[Path]
) -> None:
    with _strict_node(tmp_path, viewer, ["echo", "store", "find"]) as node:
        storescu(node.port, node.aet, images, calling="STRANGER")
        study = str(pydicom.dcmread(images[0]).StudyInstanceUID)
        found = findscu(node.port, node.aet, "IMAGE", {"StudyInstanceUID": study, "SOPInstanceUID": ""},
                        calling="STRANGER")
        assert found.final.status == Status.SUCCESS and len(found.datasets) == len(images)
        got = getscu(node.port, node.aet, "STUDY", {"StudyInstanceUID": study}, tmp_path / "got",
                     calling="STRANGER")
        assert (got.final.status, got.final.error_comment) == (Status.NOT_AUTHORIZED, REFUSED.format("C-GET"))
        assert got.files == []
