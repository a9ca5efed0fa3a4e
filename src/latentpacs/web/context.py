"""What every web route works with: the service, the settings and the authenticator."""

from __future__ import annotations

from dataclasses import dataclass

from starlette.requests import HTTPConnection

from latentpacs.config import Config
from latentpacs.service import Service
from latentpacs.web.auth import Authenticator

#: Where the DICOMweb routes live (PS3.18 8.2: the service's base URL).
BASE_PATH = "/dicom-web"


@dataclass(frozen=True)
class WebContext:
    """The process's service and settings, as the web application sees them.

    Parameters
    ----------
    service:
        The same :class:`~latentpacs.service.Service` the DIMSE node answers from.
    config:
        The resolved settings.
    auth:
        Who may do what (bearer tokens, loopback trust).
    """

    service: Service
    config: Config
    auth: Authenticator

    @property
    def aet(self) -> str:
        """The node's AE title (Retrieve AE Title in QIDO-RS answers, PS3.18 10.6.3)."""
        return str(self.config["node.aet"])


def context(request: HTTPConnection) -> WebContext:
    """The :class:`WebContext` of the application serving ``request``."""
    ctx: WebContext = request.app.state.ctx
    return ctx
