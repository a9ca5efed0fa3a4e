"""DICOM TLS for the node: the server side of the Secure Transport Connection Profiles.

PS3.15 B.1 (TLS) and B.9 (BCP 195 TLS Profile): the node presents ``security.tls_cert``
with ``security.tls_key``, speaks TLS 1.2 or newer, and checks client certificates
against ``security.tls_ca`` (always when ``security.tls_require_client_cert``, otherwise
only those a client offers). PS3.15 B.1 leaves the port to the site: TLS replaces plain
TCP on the node's port, so a plain client cannot associate at all.

The handshake is deferred to the association's own thread (its first read), so a peer
that connects and never speaks cannot stall the listener's accept loop; the association's
network timeout (``node.network_timeout``) then ends it like any silent peer.
"""

from __future__ import annotations

import logging
import socket
import ssl
from typing import Any

from latentpacs.config import Config
from latentpacs.errors import ConfigError

logger = logging.getLogger(__name__)


class DeferredHandshakeContext(ssl.SSLContext):
    """A server context whose sockets do the TLS handshake on first use, not on accept.

    pynetdicom wraps each accepted socket in the listener thread; a handshake there would
    block every other association behind one silent peer.
    """

    def wrap_socket(  # type: ignore[override]
        self, sock: socket.socket, server_side: bool = False,
        do_handshake_on_connect: bool = True, suppress_ragged_eofs: bool = True,
        server_hostname: str | None = None, session: Any = None,
    ) -> ssl.SSLSocket:
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
