"""Serve the web application with uvicorn in a thread of the ``latentpacs serve`` process.

The listening socket is bound here, before the thread starts, so a port in use is a
one-line :class:`~latentpacs.errors.ConfigError` and the OS's choice of port (``web.port``
0) is known at once. uvicorn's access log is off: request lines carry query keys such
as PatientName, which never go to the log at INFO.
"""

from __future__ import annotations

import logging
import socket
import ssl
import threading
import time

import uvicorn

from latentpacs.config import Config
from latentpacs.errors import ConfigError
from latentpacs.service import Service
from latentpacs.web.app import build_app
from latentpacs.web.auth import Authenticator
from latentpacs.web.context import WebContext

logger = logging.getLogger(__name__)

#: Seconds to wait for uvicorn to start serving on the bound socket.
START_TIMEOUT_S = 30.0


class WebServer:
    """A running web server: uvicorn on its own event loop in a daemon thread.

    Parameters
    ----------
    config:
        The settings (``web.*``, ``security.tls_*`` for ``web.tls``).
    service:
        The service the DIMSE node answers from.
    """

    def __init__(self, config: Config, service: Service) -> None:
        self.config = config
        host, port = config["web.host"], config["web.port"]
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._socket = socket.socket(family, socket.SOCK_STREAM)
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self._socket.bind((host, port))
        except OSError as exc:
            self._socket.close()
            raise ConfigError(f"web server cannot listen on {host}:{port}: {exc.strerror}") from exc
        self._socket.listen(128)
        ctx = WebContext(service=service, config=config, auth=Authenticator.from_config(config))
        tls: dict[str, object] = {}
        if config["web.tls"]:
            tls = {"ssl_certfile": config["security.tls_cert"], "ssl_keyfile": config["security.tls_key"]}
            if config["security.tls_ca"]:
                tls["ssl_ca_certs"] = config["security.tls_ca"]
                tls["ssl_cert_reqs"] = (ssl.CERT_REQUIRED if config["security.tls_require_client_cert"]
                                        else ssl.CERT_OPTIONAL)
        self._server = uvicorn.Server(uvicorn.Config(
            build_app(ctx), log_level="warning", access_log=False, lifespan="off",
            server_header=False,
            timeout_graceful_shutdown=int(max(config["node.shutdown_grace"], 1)),
            **tls,  # type: ignore[arg-type]
        ))
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._socket]},
                                        name="latentpacs-web", daemon=True)

    @property
    def port(self) -> int:
        """The TCP port the web server listens on."""
        return int(self._socket.getsockname()[1])

    @property
    def url(self) -> str:
        """The server's base URL, e.g. ``http://127.0.0.1:8042``."""
        scheme = "https" if self.config["web.tls"] else "http"
        host = self.config["web.host"]
        host = f"[{host}]" if ":" in host else host
        return f"{scheme}://{host}:{self.port}"

    def start(self) -> None:
        """Start serving; returns once uvicorn accepts requests.

        Raises
        ------
        ConfigError
            When uvicorn did not start (a bad TLS certificate, for example).
        """
        self._thread.start()
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self._socket.close()
                raise ConfigError(f"web server on port {self.port} did not start (see the log)")
            time.sleep(0.01)
        logger.info("web server listening on %s", self.url)

    def stop(self) -> None:
        """Stop accepting, let requests in flight finish (``node.shutdown_grace``), join."""
        self._server.should_exit = True
        self._thread.join(self.config["node.shutdown_grace"] + 5.0)
        self._socket.close()


def start_web(config: Config, service: Service) -> WebServer:
    """Bind and start the web server for ``service`` (``web.enabled`` is the caller's check)."""
    server = WebServer(config, service)
    server.start()
    return server
