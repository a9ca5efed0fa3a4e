"""The DICOM node: a pynetdicom Application Entity wired to :class:`~latentpacs.service.Service`.

Services (PS3.4): Verification SCP (Annex A), Storage SCP for Digital Mammography X-Ray
Image Storage For Presentation and For Processing plus configured grayscale classes
(Annex B), Query/Retrieve SCP (Annex C) in Patient Root and Study Root, FIND, GET (with
SCP/SCU role selection, PS3.7 D.3.3.4) and MOVE to configured destinations.

Who may use which service is :class:`~latentpacs.node.peers.PeerPolicy`'s decision, asked
by every handler; an association is refused (A-ASSOCIATE-RJ, PS3.8 7.1.1.3) only for a
called AE title other than ``node.aet``. :meth:`Node.stop` is a graceful stop.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    RLELossless,
)
from pynetdicom import AE, evt
from pynetdicom import _config as pynetdicom_config
from pynetdicom.events import EventHandlerType
from pynetdicom.sop_class import (  # type: ignore[attr-defined]  # names generated at import time
    PatientRootQueryRetrieveInformationModelFind,
    PatientRootQueryRetrieveInformationModelGet,
    PatientRootQueryRetrieveInformationModelMove,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
    Verification,
)

from latentpacs import audit, metrics
from latentpacs.config import Config
from latentpacs.errors import ConfigError
from latentpacs.node import commitment, handlers, pdata
from latentpacs.node.peers import MoveDestinations, PeerPolicy
from latentpacs.node.proxy import conn_open_handlers
from latentpacs.node.tls import client_context, handshake_on_open, server_context
from latentpacs.image.pixels import LOSSY_TRANSFER_SYNTAXES
from latentpacs.service import Service, open_service

logger = logging.getLogger(__name__)

#: Digital Mammography X-Ray Image Storage - For Presentation / For Processing (PS3.4 B.5).
MAMMOGRAPHY_CLASSES = ("1.2.840.10008.5.1.4.1.1.1.2", "1.2.840.10008.5.1.4.1.1.1.2.1")

#: Transfer syntaxes the Storage SCP accepts: every one whose pixel data
#: :mod:`latentpacs.image.pixels` decodes (PS3.5 Section 10 and Annex A), in order of preference.
#: pynetdicom accepts the first of these that a context proposes, so the order is the policy:
#: lossless compressed syntaxes first (a peer offering its file's own compressed syntax sends
#: it unconverted), then native ones, and lossy ones last, accepted only when a context offers
#: nothing else (the image is then recorded as lossy on arrival). JPEG 2000 (.91) counts as
#: lossy: it may carry an irreversible wavelet.
STORE_LOSSLESS_COMPRESSED = (
    JPEGLSLossless,
    JPEG2000Lossless,
    JPEGLosslessSV1,
    JPEGLossless,
    RLELossless,
)
STORE_NATIVE = (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
)
#: Lossy transfer syntaxes (PS3.5 A.4): JPEG-LS near-lossless, JPEG 2000, JPEG baseline/extended.
STORE_LOSSY = tuple(UID(syntax) for syntax in LOSSY_TRANSFER_SYNTAXES)
STORE_TRANSFER_SYNTAXES = (*STORE_LOSSLESS_COMPRESSED, *STORE_NATIVE, *STORE_LOSSY)

#: Transfer syntaxes the node sends in: native (reconstructions are built uncompressed)
#: and, in a context of its own, JPEG-LS lossless, so a C-MOVE destination that takes it
#: gets a lossless stream as it is archived, with no decode (PS3.8 9.3.2.2: the acceptor
#: picks one syntax per context; pynetdicom sends each object on the context of its syntax).
SEND_TRANSFER_SYNTAXES = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
SEND_AS_ARCHIVED = (JPEGLSLossless,)

QUERY_RETRIEVE_CLASSES = (
    PatientRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelFind,
    PatientRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelGet,
    PatientRootQueryRetrieveInformationModelMove,
    StudyRootQueryRetrieveInformationModelMove,
)


def build_ae(config: Config, storage_classes: Sequence[str]) -> AE:
    """The Application Entity with the node's presentation contexts and limits."""
    ae = AE(ae_title=config["node.aet"])
    ae.add_supported_context(Verification)
    for sop_class in storage_classes:
        # scu_role/scp_role: accept a C-GET requestor's proposal to act as Storage SCP.
        ae.add_supported_context(sop_class, STORE_TRANSFER_SYNTAXES, scu_role=True, scp_role=True)
        ae.add_requested_context(sop_class, SEND_TRANSFER_SYNTAXES)
        ae.add_requested_context(sop_class, SEND_AS_ARCHIVED)
    for sop_class in QUERY_RETRIEVE_CLASSES:
        ae.add_supported_context(sop_class)
    # Storage Commitment Push Model SCP (PS3.4 J.3); its reports: node/commitment.py.
    ae.add_supported_context(commitment.STORAGE_COMMITMENT)
    # Any calling AE title may associate (unknown peers may still echo and store); the
    # called AE title must be the node's (A-ASSOCIATE-RJ "called AE title not recognized").
    ae.require_called_aet = True
    ae.maximum_associations = config["node.max_associations"]
    ae.maximum_pdu_size = config["node.max_pdu_size"]
    ae.network_timeout = config["node.network_timeout"]
    ae.acse_timeout = config["node.acse_timeout"]
    ae.dimse_timeout = config["node.dimse_timeout"]
    return ae


#: Seconds to wait for aborted associations to end before the service is closed.
ABORT_WAIT_S = 10.0


@dataclass
class Node:
    """A running node: the server, the service it answers from, and its stop grace."""

    service: Service
    server: object
    shutdown_grace: float = 30.0

    @property
    def port(self) -> int:
        """The TCP port the node listens on (the OS's choice when configured as 0)."""
        return int(self.server.server_address[1])  # type: ignore[attr-defined]

    def stop(self, grace: float | None = None) -> None:
        """Stop gracefully: accept nothing new, let in-flight associations finish, close.

        The listening socket is closed first, so a new connection is refused, and a
        connection that has not associated yet is closed (its ARTIM timer expires at once,
        PS3.8 9.1.5). Established associations may finish for up to ``grace`` seconds
        (``node.shutdown_grace`` by default); any still open then is aborted (A-ABORT,
        PS3.8 7.3). The engines and the database are released last, once no handler runs.
        A C-STORE answered Success was committed; one aborted before its response was not
        acknowledged, so the peer sends it again.
        """
        grace = self.shutdown_grace if grace is None else grace
        deadline = time.monotonic() + max(grace, 0.0)
        server: Any = self.server
        server.shutdown()  # ends the accept loop, closes the socket, joins connection threads
        associations = list(server.active_associations)
        in_flight = [association for association in associations if association.is_established]
        unassociated = [association for association in associations if association not in in_flight]
        for association in unassociated:
            association.acse_timeout = 0
        if in_flight:
            logger.info("stopping: waiting up to %.0f s for %d association(s)", grace,
                        len(in_flight))
        for association in in_flight:
            association.join(max(deadline - time.monotonic(), 0.0))
        left = [association for association in in_flight if association.is_alive()]
        for association in left:
            logger.warning("stopping: aborting the association with %s after %.0f s",
                           association.requestor.address, grace)
            association.abort()
        for association in left:
            association.join(ABORT_WAIT_S)
        for association in unassociated:
            _end_closed(association)
        self.service.close()
        logger.info("stopped")


def _end_closed(association: Any) -> None:
    """End an association whose transport is closing: once its state machine is idle
    (Sta1, PS3.8 9.2), stop its DUL thread instead of waiting out the ACSE timeout."""
    deadline = time.monotonic() + ABORT_WAIT_S
    while association.dul.state_machine.current_state != "Sta1":
        if time.monotonic() > deadline:
            return
        time.sleep(0.01)
    association.kill()


def _handshake_counted(event: evt.Event) -> None:
    """:func:`handshake_on_open`, counting a failed handshake as a refused association
    (it sets the ACSE timeout to 0 to end the connection)."""
    handshake_on_open(event)
    if event.assoc.acse_timeout == 0:
        metrics.refused(metrics.TLS_HANDSHAKE)
        audit.on_tls_failure(event)


def start_node(config: Config) -> Node:
    """Open the service and start listening (PS3.8 association acceptor).

    Raises
    ------
    LatentPacsError
        For an unusable configuration, model or database (named in the message).
    """
    # A C-STORE data set is received into a temporary file, not memory (pynetdicom's
    # chunked receive), so concurrent large images keep the node's memory bounded.
    pynetdicom_config.STORE_RECV_CHUNKED_DATASET = True
    policy = PeerPolicy.from_config(config)  # settings first: they fail fast
    ssl_context = server_context(config)
    proxy_handlers = conn_open_handlers(config, tls=ssl_context is not None)
    destinations = MoveDestinations(config.destinations, client_context(config),
                                    evt_handlers=(pdata.ON_ACCEPTED,))
    service = open_service(config, background=True)
    storage_classes = (*MAMMOGRAPHY_CLASSES, *config["node.extra_storage_classes"])
    ae = build_ae(config, storage_classes)
    committer = commitment.CommitmentSCP(
        service, policy, commitment.Reporter(
            config["node.aet"], destinations, acse_timeout=config["node.acse_timeout"],
            dimse_timeout=config["node.dimse_timeout"],
            network_timeout=config["node.network_timeout"]),
        retrieve_aet=config["node.aet"])
    bound: list[EventHandlerType] = [
        (evt.EVT_C_ECHO, metrics.timed("C-ECHO", handlers.handle_echo), [policy]),
        (evt.EVT_C_STORE, metrics.timed("C-STORE", handlers.handle_store), [service, policy]),
        (evt.EVT_C_FIND, metrics.timed_iter("C-FIND", handlers.handle_find), [service, policy]),
        (evt.EVT_C_GET, metrics.timed_iter("C-GET", handlers.handle_get), [service, policy]),
        (evt.EVT_C_MOVE, metrics.timed_iter("C-MOVE", handlers.handle_move),
         [service, destinations, policy]),
        (evt.EVT_N_ACTION, metrics.timed("N-ACTION", commitment.handle_n_action), [committer]),
        pdata.ON_ACCEPTED,  # every message the node sends goes out in large writes
        # /metrics: associations accepted and refused, each final response's status
        (evt.EVT_ESTABLISHED, metrics.on_established),
        (evt.EVT_REJECTED, metrics.on_rejected),
        # audit trail (PS3.15 A.5.3.11 Node Authentication): accepted and refused
        (evt.EVT_ESTABLISHED, audit.on_established),
        (evt.EVT_REJECTED, audit.on_rejected),
        (evt.EVT_DIMSE_SENT, metrics.on_dimse_sent),
    ]
    # PROXY protocol first: every later handler sees the peer the header names.
    bound[:0] = proxy_handlers
    if ssl_context is not None:
        bound.append((evt.EVT_CONN_OPEN, _handshake_counted))
    try:
        server = ae.start_server(
            (config["node.host"], config["node.port"]), block=False, evt_handlers=bound,
            ssl_context=ssl_context,
        )
    except OSError as exc:
        service.close()
        raise ConfigError(
            f"cannot listen on {config['node.host']}:{config['node.port']}: {exc.strerror}"
        ) from exc
    node = Node(service, server, config["node.shutdown_grace"])
    if server is not None:  # never None with block=False
        metrics.watch_associations(server)
    card = service.engines.primary_card
    logger.info(
        "%s listening on %s:%d, model %s (sha256 %s), tier %s",
        config["node.aet"],
        config["node.host"],
        node.port,
        card.name,
        card.sha256[:16],
        config.tier,
    )
    return node
