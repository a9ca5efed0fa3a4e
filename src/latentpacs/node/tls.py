"""DICOM TLS for the node: the server side of the Secure Transport Connection Profiles.

PS3.15 B.1 (TLS) and B.9 (BCP 195 TLS Profile): the node presents ``security.tls_cert``
with ``security.tls_key``, speaks TLS 1.2 or newer, and checks client certificates
against ``security.tls_ca`` (always when ``security.tls_require_client_cert``, otherwise
only those a client offers). PS3.15 B.1 leaves the port to the site: TLS replaces plain
TCP on the node's port, so a plain client cannot associate at all.

The handshake is not done by the listener (pynetdicom wraps each accepted socket in its
accept loop, where one slow peer would block every other): the socket is wrapped without
a handshake and :func:`handshake_on_open` completes it in the connection's own thread,
under a socket timeout of ``node.network_timeout``. A peer that connects and sends
nothing, or part of a ClientHello, and never completes is dropped when that timeout
passes; the timeout stays on the socket, so a peer that stalls mid-record later is
dropped the same way.

The node is also a TLS client: a C-MOVE to a destination marked ``tls = true`` opens its
sub-association through :func:`client_context` (the node's certificate as client
certificate, ``security.tls_ca`` to verify the destination and its host name).
"""

from __future__ import annotations

import logging
import socket
import ssl
from typing import Any

from pynetdicom import events as evt

from latentpacs.config import Config
from latentpacs.errors import ConfigError

logger = logging.getLogger(__name__)


class DeferredHandshakeContext(ssl.SSLContext):
    """A server context whose sockets do the TLS handshake on first use, not on accept.

    pynetdicom wraps each accepted socket in the listener thread; a handshake there would
    block every other association behind one silent peer. Each wrapped socket gets
    ``handshake_timeout`` (seconds, ``node.network_timeout``) as its socket timeout.
    """

    handshake_timeout: float | None = None

    def wrap_socket(  # type: ignore[override]
        self, sock: socket.socket, server_side: bool = False,
        do_handshake_on_connect: bool = True, suppress_ragged_eofs: bool = True,
        server_hostname: str | None = None, session: Any = None,
    ) -> ssl.SSLSocket:
        sock.settimeout(self.handshake_timeout)
        return super().wrap_socket(
            sock, server_side=server_side, do_handshake_on_connect=False,
            suppress_ragged_eofs=suppress_ragged_eofs, server_hostname=server_hostname,
            session=session,
        )


def server_context(config: Config) -> ssl.SSLContext | None:
    """The TLS context the node listens with, or None when TLS is not configured.

    Raises
    ------
    ConfigError
        When the certificate, key or CA file cannot be read or do not belong together.
    """
    cert, key, ca = (config[f"security.tls_{name}"] for name in ("cert", "key", "ca"))
    if not cert:
        return None
    context = DeferredHandshakeContext(ssl.PROTOCOL_TLS_SERVER)
    context.handshake_timeout = config["node.network_timeout"]
    context.minimum_version = ssl.TLSVersion.TLSv1_2  # BCP 195 (PS3.15 B.9)
    try:
        context.load_cert_chain(certfile=cert, keyfile=key)
        if ca:
            context.load_verify_locations(cafile=ca)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"TLS certificate, key or CA not usable: {exc}") from exc
    if config["security.tls_require_client_cert"]:
        context.verify_mode = ssl.CERT_REQUIRED
    elif ca:
        context.verify_mode = ssl.CERT_OPTIONAL
    logger.info(
        "DICOM TLS on; client certificates %s",
        "required" if context.verify_mode == ssl.CERT_REQUIRED
        else "checked when offered" if ca else "not checked",
    )
    return context


def handshake_on_open(event: evt.Event) -> None:
    """``EVT_CONN_OPEN`` handler: complete a TLS connection's handshake in its own thread.

    pynetdicom runs this in the thread that serves the new connection, before the
    association starts. The socket timeout set by :class:`DeferredHandshakeContext` bounds
    the handshake. When it fails or times out, the association's ACSE timeout is set to
    zero, so the connection ends at once the way PS3.8 9.1.5 ends any connection that does
    not associate in time (ARTIM expiry: the transport is closed, no A-ASSOCIATE-RQ is
    awaited). Plain TCP connections are left alone.
    """
    sock = event.assoc.dul.socket.socket if event.assoc.dul.socket else None
    if not isinstance(sock, ssl.SSLSocket):
        return
    try:
        sock.do_handshake()
    except (OSError, ValueError) as exc:  # ssl.SSLError and TimeoutError are OSErrors
        reason = "timed out" if isinstance(exc, TimeoutError) else str(exc)
        logger.warning("TLS handshake with %s failed (%s); connection closed",
                       event.assoc.requestor.address, reason)
        event.assoc.acse_timeout = 0


def client_context(config: Config) -> ssl.SSLContext | None:
    """The TLS client context for C-MOVE sub-associations, or None without TLS.

    TLS 1.2 or newer (BCP 195, PS3.15 B.9); the destination's certificate must chain to
    ``security.tls_ca`` and name the destination's host; the node's own certificate and
    key are offered as client certificate.

    Raises
    ------
    ConfigError
        When the certificate, key or CA file cannot be read.
    """
    cert, key, ca = (config[f"security.tls_{name}"] for name in ("cert", "key", "ca"))
    if not cert or not ca:
        return None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # CERT_REQUIRED, host names checked
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_verify_locations(cafile=ca)
        context.load_cert_chain(certfile=cert, keyfile=key)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"TLS certificate, key or CA not usable: {exc}") from exc
    return context
