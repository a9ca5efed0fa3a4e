"""Who may use the web server: bearer tokens (RFC 6750) with permissions, loopback trust.

A request carries ``Authorization: Bearer TOKEN``. The token's SHA-256 names one
``[web.tokens.NAME]`` entry, whose ``services`` are its permissions: ``store``
(STOW-RS, as C-STORE), ``query`` (QIDO-RS, as C-FIND), ``retrieve`` (WADO-RS and
rendered, as C-GET) and ``metrics``. Without a token, a request is refused with 401 and
``WWW-Authenticate: Bearer`` (RFC 6750 3), unless ``web.trust_loopback`` is on and it
comes from the loopback interface, which is then allowed everything (as
``security.trust_loopback`` does for DIMSE peers). A known token without the permission
gets 403. Every route calls :func:`authorize` before it reads or writes any data.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass

from starlette.exceptions import HTTPException
from starlette.requests import HTTPConnection

from latentpacs import audit
from latentpacs.config import WEB_PERMISSIONS, Config, WebToken
from latentpacs.node.peers import Requestor

logger = logging.getLogger(__name__)

#: The principal of a trusted loopback client (``web.trust_loopback``).
LOOPBACK = "loopback"


@dataclass(frozen=True)
class Principal:
    """Who a request was authenticated as, and what it may do."""

    name: str
    services: frozenset[str]


def token_sha256(token: str) -> str:
    """The SHA-256 (hex) a ``[web.tokens.NAME]`` entry holds for ``token``."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def _is_loopback(host: str | None) -> bool:
    """Whether ``host`` is a loopback address: the DIMSE rule (:class:`Requestor`), applied once."""
    return bool(host) and Requestor(ae_title="", address=str(host)).is_loopback


class Authenticator:
    """The web server's tokens and loopback trust (``web.*`` settings).

    Parameters
    ----------
    tokens:
        The configured tokens; looked up by the SHA-256 of the presented token, so the
        comparison never depends on how much of a secret matched.
    trust_loopback:
        Allow loopback clients everything without a token.
    """

    def __init__(self, tokens: list[WebToken] | tuple[WebToken, ...], *, trust_loopback: bool) -> None:
        self._by_digest = {token.sha256: Principal(token.name, token.services) for token in tokens}
        self.trust_loopback = trust_loopback

    @classmethod
    def from_config(cls, config: Config) -> Authenticator:
        """The authenticator the settings describe."""
        return cls(tuple(config.web_tokens.values()), trust_loopback=config["web.trust_loopback"])

    def principal(self, request: HTTPConnection) -> Principal | None:
        """Who ``request`` is: its token's principal, the loopback principal, or None."""
        header = request.headers.get("authorization", "")
        scheme, _, credentials = header.partition(" ")
        if scheme.lower() == "bearer" and credentials.strip():
            return self._by_digest.get(token_sha256(credentials.strip()))
        if self.trust_loopback and _is_loopback(request.client.host if request.client else None):
            return Principal(LOOPBACK, frozenset(WEB_PERMISSIONS))
        return None

    def authorize(self, request: HTTPConnection, permission: str) -> Principal:
        """The principal of ``request`` if it may use ``permission``.

        Raises
        ------
        HTTPException
            401 with ``WWW-Authenticate: Bearer`` without a valid token (RFC 6750 3.1),
            403 for a token without ``permission``.
        """
        if permission not in WEB_PERMISSIONS:
            raise ValueError(f"unknown web permission {permission!r}")
        principal = self.principal(request)
        address = request.client.host if request.client else ""
        if principal is None:
            invalid = "authorization" in request.headers
            audit.web_refused("", address, 401, request.url.path,
                              "invalid bearer token" if invalid else "no bearer token")
            raise HTTPException(
                401, "a valid bearer token is required",
                headers={"WWW-Authenticate": 'Bearer realm="latentpacs"'
                         + (', error="invalid_token"' if invalid else "")})
        if permission not in principal.services:
            logger.info("web: %s may not %s", principal.name, permission)
            audit.web_refused(principal.name, address, 403, request.url.path,
                              f"token {principal.name!r} may not {permission}")
            raise HTTPException(403, f"token {principal.name!r} may not {permission}")
        return principal


def authorize(request: HTTPConnection, permission: str) -> Principal:
    """:meth:`Authenticator.authorize` with the application's authenticator."""
    auth: Authenticator = request.app.state.ctx.auth
    return auth.authorize(request, permission)
