"""Peers and permissions: which DIMSE services a requestor may use, and where C-MOVE goes.

The policy (PS3.15 has no standard for it; this follows Orthanc's ``DicomAlwaysAllow*``):

- A *listed* peer may use every service: its calling AE title (PS3.8 7.1.1.3, trailing
  spaces not significant, PS3.5 6.2) is in ``security.allowed_calling_aets``, or, with
  ``security.trust_loopback`` (the default), it connects from a loopback address
  (127.0.0.0/8, ``::1``, or an IPv4-mapped loopback address).
- Any other peer may use only the services in ``security.unknown_peers`` (default
  ``echo`` and ``store``): a hospital's modalities can send without being configured,
  but query and retrieve need a listed peer.

Nobody is refused at association (A-ASSOCIATE-RJ would stop unknown peers from storing);
each DIMSE handler asks :meth:`PeerPolicy.check` before any data leaves or is stored, and
a refusal is answered with Refused: Not authorized (0124H, PS3.7 C.5.25) and an
ErrorComment. The calling AE title is not authentication: on an untrusted network use
DICOM TLS with client certificates (``security.tls_require_client_cert``).
"""

from __future__ import annotations

import ipaddress
import logging
import ssl
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any

from pydicom.dataset import Dataset
from pynetdicom import events as evt
from pynetdicom.dimse_primitives import C_MOVE

from latentpacs.config import SERVICES, Config, Destination
from latentpacs.errors import ConfigError, NotAuthorizedError

logger = logging.getLogger(__name__)


class DimseService(Enum):
    """The DIMSE-C services the node provides (PS3.7 9.1), by their settings name."""

    ECHO = "echo"
    STORE = "store"
    FIND = "find"
    GET = "get"
    MOVE = "move"

    @property
    def dimse_name(self) -> str:
        """The service's name in PS3.7, e.g. ``C-FIND``."""
        return f"C-{self.value.upper()}"


if tuple(service.value for service in DimseService) != SERVICES:  # one list of names
    raise ImportError("latentpacs.node.peers.DimseService disagrees with config.SERVICES")


@dataclass(frozen=True)
class Requestor:
    """Who asked: the association requestor's calling AE title and IP address."""

    ae_title: str
    address: str

    @classmethod
    def of(cls, event: evt.Event) -> Requestor:
        """The requestor of the association an event belongs to."""
        requestor = event.assoc.requestor
        return cls(str(requestor.ae_title), str(requestor.address))

    @property
    def is_loopback(self) -> bool:
        """Whether the address is on the loopback interface (127.0.0.0/8, ::1, ::ffff:127.x)."""
        try:
            address = ipaddress.ip_address(self.address.split("%", 1)[0])
        except ValueError:
            return False
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            return address.ipv4_mapped.is_loopback
        return address.is_loopback


def _ae_title(value: str) -> str:
    """An AE title as compared: leading and trailing spaces are not significant (PS3.5 6.2)."""
    return value.strip()


@dataclass(frozen=True)
class PeerPolicy:
    """Which services each requestor may use.

    Parameters
    ----------
    listed_aets:
        Calling AE titles that may use every service (``security.allowed_calling_aets``).
    unknown_peers:
        Services any other peer may use (``security.unknown_peers``).
    trust_loopback:
        Treat requestors on a loopback address as listed (``security.trust_loopback``).
    """

    listed_aets: frozenset[str]
    unknown_peers: frozenset[DimseService]
    trust_loopback: bool

    @classmethod
    def of(cls, listed_aets: Iterable[str], unknown_peers: Iterable[str],
           trust_loopback: bool) -> PeerPolicy:
        """Build a policy from setting values.

        Raises
        ------
        ConfigError
            For a service name that is not one of echo, store, find, get, move.
        """
        try:
            services = frozenset(DimseService(name) for name in unknown_peers)
        except ValueError as exc:
            raise ConfigError(f"security.unknown_peers: {exc}") from exc
        return cls(frozenset(_ae_title(aet) for aet in listed_aets if _ae_title(aet)),
                   services, bool(trust_loopback))

    @classmethod
    def from_config(cls, config: Config) -> PeerPolicy:
        """The policy the ``security.*`` settings describe."""
        return cls.of(config["security.allowed_calling_aets"], config["security.unknown_peers"],
                      config["security.trust_loopback"])

    def is_listed(self, requestor: Requestor) -> bool:
        """Whether the requestor may use every service."""
        return (_ae_title(requestor.ae_title) in self.listed_aets
                or (self.trust_loopback and requestor.is_loopback))

    def allowed(self, requestor: Requestor) -> frozenset[DimseService]:
        """The services the requestor may use."""
        return frozenset(DimseService) if self.is_listed(requestor) else self.unknown_peers

    def check(self, requestor: Requestor, service: DimseService) -> None:
        """Refuse a request the requestor may not make.

        Raises
        ------
        NotAuthorizedError
            When ``service`` is not among :meth:`allowed`; its ErrorComment names the
            calling AE title and the service (PS3.7 C.5.25).
        """
        if service not in self.allowed(requestor):
            raise NotAuthorizedError(
                f"calling AE title {_ae_title(requestor.ae_title) or '(empty)'} "
                f"may not use {service.dimse_name}"
            )

    def refusal(self, event: evt.Event, service: DimseService) -> Dataset | None:
        """The failure status for an event's request, or None when it is allowed.

        The status data set has Status 0124H and the ErrorComment (PS3.7 C.4, C.5.25);
        the refusal is logged at WARNING with the requestor's AE title and address.
        """
        requestor = Requestor.of(event)
        try:
            self.check(requestor, service)
        except NotAuthorizedError as exc:
            logger.warning("%s from %s (%s) refused: not authorized", service.dimse_name,
                           _ae_title(requestor.ae_title), requestor.address)
            status = Dataset()
            status.Status = int(exc.status)
            status.ErrorComment = exc.error_comment
            return status
        return None


def refuse_move(event: evt.Event, refusal: Dataset) -> tuple[None, None]:
    """Answer a C-MOVE with ``refusal`` without opening any sub-association.

    pynetdicom's C-MOVE SCP asks its handler for the destination first and can then only
    answer Move Destination Unknown (A801, no comment) or associate with the destination
    before it reads a status. To refuse before any destination is looked up or contacted,
    the handler yields ``(None, None)`` (what this returns) and the one response that
    pynetdicom then sends for this request is given ``refusal``'s Status and ErrorComment
    on its way out: one final C-MOVE-RSP (PS3.7 9.3.4.2), no sub-operation. pynetdicom
    still logs "Unknown Move Destination" for it, after the node's own WARNING that names
    the refusal.
    """
    dimse = event.assoc.dimse
    message_id = event.request.MessageID
    send_msg = dimse.send_msg

    def send_refusal(primitive: Any, context_id: int) -> None:
        if isinstance(primitive, C_MOVE) and primitive.MessageIDBeingRespondedTo == message_id:
            setattr(dimse, "send_msg", send_msg)  # one response only: back to the sender before
            primitive.Status = int(refusal.Status)
            setattr(primitive, "ErrorComment", str(refusal.ErrorComment))
        send_msg(primitive, context_id)

    setattr(dimse, "send_msg", send_refusal)
    return None, None


@dataclass(frozen=True)
class MoveDestinations:
    """C-MOVE destinations (PS3.4 C.4.2.1.2) by AE title, and how to reach each.

    ``tls`` is the client context for destinations marked ``tls = true`` (PS3.15 B.1).
    ``evt_handlers`` are bound on every sub-association (``ae.associate(evt_handlers=...)``),
    e.g. :data:`latentpacs.node.pdata.ON_ACCEPTED` for the fast sending path.

    Raises
    ------
    ConfigError
        When a destination is marked ``tls = true`` and there is no client context.
    """

    by_aet: Mapping[str, Destination]
    tls: ssl.SSLContext | None = None
    evt_handlers: tuple[Any, ...] = ()

    def __post_init__(self) -> None:
        if self.tls is None:
            needing = sorted(aet for aet, dest in self.by_aet.items() if dest.tls)
            if needing:
                raise ConfigError(
                    f"[destinations.{needing[0]}] has tls = true: set security.tls_cert, "
                    "security.tls_key and security.tls_ca"
                )

    def address(self, move_destination: str, extra_handlers: Sequence[Any] = ()
                ) -> tuple[str, int] | tuple[str, int, dict[str, Any]] | None:
        """What a C-MOVE handler yields first: ``(host, port[, associate kwargs])``, or None.

        None for an AE title that is not configured. A TLS destination gets
        ``tls_args``: the client context and the host name the destination's certificate
        must name (checked, BCP 195); ``evt_handlers`` and ``extra_handlers`` (this
        request's), when there are any, go along as ``evt_handlers``.
        """
        destination = self.by_aet.get(_ae_title(move_destination))
        if destination is None:
            return None
        kwargs: dict[str, Any] = {}
        if destination.tls and self.tls is not None:
            kwargs["tls_args"] = (self.tls, destination.host)
        if self.evt_handlers or extra_handlers:
            kwargs["evt_handlers"] = [*self.evt_handlers, *extra_handlers]
        if kwargs:
            return destination.host, destination.port, kwargs
        return destination.host, destination.port
