"""The PROXY protocol, version 2, in front of a DICOM connection (``node.proxy_protocol``).

Behind a TCP load balancer every connection comes from the balancer's address, so the
node's permissions (:mod:`latentpacs.node.peers`: loopback trust, the audit trail's
peer) would judge the balancer, not the modality. HAProxy's ``send-proxy-v2`` puts a
binary header in front of the connection's first byte (HAProxy's "The PROXY protocol",
version 2, section 2.2: the 12-byte signature, version and command, address family,
length, addresses); with ``node.proxy_protocol`` on, the node reads it before the
association starts (PS3.8 9.1.5: the upper layer only begins after the transport
connection is open) and takes the requestor's address from it.

- Command PROXY with a TCP over IPv4 or IPv6 address block: the requestor's address
  and port become the source named there.
- Command PROXY with another address family (UNSPEC, UNIX): the connection's own
  address stays.
- Command LOCAL: a connection the proxy made for itself, not for a peer (HAProxy's health
  checks send one when the server has ``send-proxy-v2``): it is closed at once, quietly;
  the check has succeeded by connecting.
- Anything else (no header, a wrong signature or version, a truncated block, a header
  that does not arrive within the ACSE timeout) closes the connection before any DICOM
  byte is read: a peer that reaches the node around the proxy gets nothing. The node's
  port must then be reachable from the proxy only (a firewall), since whoever can open a
  connection to it can claim any source address.

DICOM TLS is not combined with it here (HAProxy sends the header before the TLS
ClientHello; the node reads TLS from the first byte): :func:`conn_open_handlers` refuses
the combination.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
from dataclasses import dataclass

from pynetdicom import events as evt
from pynetdicom.association import Association
from pynetdicom.events import EventHandlerType
from pynetdicom.transport import AddressInformation

from latentpacs.config import Config
from latentpacs.errors import ConfigError, LatentPacsError

logger = logging.getLogger(__name__)

#: The first 12 bytes of every version 2 header (section 2.2).
SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
#: Version 2 in the high nibble of byte 13; the command in the low nibble.
VERSION = 0x2
COMMAND_LOCAL = 0x0
COMMAND_PROXY = 0x1
#: Byte 14: address family (high nibble) and transport (low nibble).
TCP_OVER_IPV4 = 0x11
TCP_OVER_IPV6 = 0x21
#: The largest address block (with TLVs) read; HAProxy sends far less.
MAX_BLOCK_BYTES = 1024


class ProxyHeaderError(LatentPacsError):
    """A connection that should start with a PROXY protocol v2 header does not.

    ``empty`` is true when the connection closed before its first byte (a TCP connect
    check, not an intruder).
    """

    def __init__(self, message: str, *, empty: bool = False) -> None:
        super().__init__(message)
        self.empty = empty


def _receive(sock: socket.socket, count: int, *, first: bool = False) -> bytes:
    data = bytearray()
    while len(data) < count:
        chunk = sock.recv(count - len(data))
        if not chunk:
            raise ProxyHeaderError(f"connection closed after {len(data)} of {count} header "
                                   "bytes", empty=first and not data)
        data += chunk
    return bytes(data)


@dataclass(frozen=True)
class ProxyHeader:
    """What one header says: command LOCAL, or the source ``(address, port)`` it names.

    ``source`` is None for LOCAL and for address families other than TCP over IPv4/IPv6.
    """

    local: bool
    source: tuple[str, int] | None


def read_header(sock: socket.socket) -> ProxyHeader:
    """Read one PROXY protocol v2 header from ``sock`` (exactly its bytes, no more).

    Raises
    ------
    ProxyHeaderError
        When the bytes are not a complete version 2 header.
    """
    fixed = _receive(sock, 16, first=True)
    if fixed[:12] != SIGNATURE:
        raise ProxyHeaderError("no PROXY protocol v2 signature")
    version, command = fixed[12] >> 4, fixed[12] & 0x0F
    if version != VERSION or command not in (COMMAND_LOCAL, COMMAND_PROXY):
        raise ProxyHeaderError(f"PROXY header version {version} command {command} unsupported")
    length = int.from_bytes(fixed[14:16], "big")
    if length > MAX_BLOCK_BYTES:
        raise ProxyHeaderError(f"PROXY header address block of {length} bytes")
    block = _receive(sock, length)
    if command == COMMAND_LOCAL:
        return ProxyHeader(local=True, source=None)
    family = fixed[13]
    if family == TCP_OVER_IPV4 and length >= 12:
        return ProxyHeader(False, (str(ipaddress.IPv4Address(block[0:4])),
                                   int.from_bytes(block[8:10], "big")))
    if family == TCP_OVER_IPV6 and length >= 36:
        return ProxyHeader(False, (str(ipaddress.IPv6Address(block[0:16])),
                                   int.from_bytes(block[32:34], "big")))
    if family in (TCP_OVER_IPV4, TCP_OVER_IPV6):
        raise ProxyHeaderError(f"PROXY header address block of {length} bytes is truncated")
    return ProxyHeader(local=False, source=None)


def _close(assoc: Association, sock: socket.socket) -> None:
    """End the connection before any A-ASSOCIATE-RQ is read (ARTIM expiry, PS3.8 9.1.5).

    The socket is shut down first, so pynetdicom's reader sees a plain end of stream
    (no error logged for a health check that resets its connection).
    """
    assoc.acse_timeout = 0
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass  # the peer is gone already


def on_open(event: evt.Event) -> None:
    """``EVT_CONN_OPEN`` handler: read the header, make its source the requestor's address.

    pynetdicom runs it in the thread that serves the new connection, before the
    association's reader starts, so nothing else has read from the socket yet. The read
    is bounded by the association's ACSE timeout. A missing or malformed header, or
    command LOCAL, ends the connection at once (:func:`_close`).
    """
    assoc = event.assoc
    sock = assoc.dul.socket.socket if assoc.dul.socket else None
    if sock is None:
        return
    connection = assoc.requestor.address
    previous = sock.gettimeout()
    sock.settimeout(assoc.acse_timeout)
    try:
        header = read_header(sock)
    except ProxyHeaderError as exc:
        if exc.empty:
            logger.debug("connection from %s closed before a PROXY header", connection)
        else:
            logger.warning("connection from %s closed: %s", connection, exc.message)
        _close(assoc, sock)
        return
    except OSError as exc:  # TimeoutError included
        logger.warning("connection from %s closed: no PROXY header (%s)", connection, exc)
        _close(assoc, sock)
        return
    finally:
        sock.settimeout(previous)
    if header.local:
        logger.debug("connection from %s: PROXY command LOCAL (a health check); closed",
                     connection)
        _close(assoc, sock)
    elif header.source is not None:
        assoc.requestor.address_info = AddressInformation(*header.source)
        logger.debug("connection from %s is %s:%d by its PROXY header", connection,
                     *header.source)


def conn_open_handlers(config: Config, tls: bool) -> list[EventHandlerType]:
    """The handlers to bind first when ``node.proxy_protocol`` is on (else none).

    Raises
    ------
    ConfigError
        When the PROXY protocol is asked for together with DICOM TLS.
    """
    if not config["node.proxy_protocol"]:
        return []
    if tls:
        raise ConfigError("node.proxy_protocol cannot be combined with DICOM TLS "
                          "(security.tls_cert): the node reads TLS from the first byte")
    return [(evt.EVT_CONN_OPEN, on_open)]
