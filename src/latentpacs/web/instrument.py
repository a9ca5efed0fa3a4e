"""Metrics of the web server: every HTTP request timed and counted, and ``GET /metrics``.

:class:`MetricsMiddleware` is pure ASGI (no ``BaseHTTPMiddleware``, so streamed WADO-RS
answers stay streamed): it times each request from its arrival to the last body byte
sent and counts its status and its request and response body bytes into
:mod:`latentpacs.metrics`, under the service the route belongs to
(:func:`service_of`: QIDO-RS, WADO-RS, STOW-RS, rendered, viewer, metrics; from the
method and the shape of the path, never the path itself, so no UID reaches a label).

:data:`METRICS_ROUTE` serves the process's registry in the Prometheus text format
(version 0.0.4) to a principal with the ``metrics`` permission (a bearer token whose
``services`` name it, or a loopback client under ``web.trust_loopback``); the
scrape-time figures (associations open, archive size per tier, coding backlog) are read
as it renders, on a worker thread, not on the event loop.
"""

from __future__ import annotations

import time

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from latentpacs import metrics
from latentpacs.web.auth import authorize
from latentpacs.web.context import BASE_PATH

#: Service names of the web server's requests (the ``service`` label).
QIDO, WADO, STOW, RENDERED, VIEWER, METRICS = (
    "QIDO-RS", "WADO-RS", "STOW-RS", "rendered", "viewer", "metrics")
#: A DICOMweb request that is none of the above (another method, say).
OTHER = "DICOMweb-other"

#: Resource collections (PS3.18 10.6.1): a path that ends in one is a search.
_COLLECTIONS = frozenset({"studies", "series", "instances"})
#: Path segments of the rendered and thumbnail resources (PS3.18 10.4.1.1.3, 10.4.1.1.4).
_RENDERED = frozenset({"rendered", "thumbnail"})


def service_of(method: str, path: str) -> str:
    """The service an HTTP request belongs to, from its method and the shape of its path.

    Under :data:`~latentpacs.web.context.BASE_PATH`: ``POST`` is STOW-RS (PS3.18 10.5);
    a ``GET`` (or ``HEAD``) whose path has a ``rendered`` or ``thumbnail`` segment is
    rendered (10.4.1.1.3), one that ends in a collection (``/studies``,
    ``.../series``, ``.../instances``) is QIDO-RS (10.6), any other WADO-RS (10.4:
    a study, series, instance, its metadata, frames or bulk data). ``/metrics`` is
    metrics; every other path belongs to the viewer.
    """
    if path == "/metrics":
        return METRICS
    if path != BASE_PATH and not path.startswith(BASE_PATH + "/"):
        return VIEWER
    segments = [segment for segment in path[len(BASE_PATH):].split("/") if segment]
    if method == "POST":
        return STOW
    if method not in ("GET", "HEAD"):
        return OTHER
    if _RENDERED.intersection(segments):
        return RENDERED
    if not segments or segments[-1] in _COLLECTIONS:
        return QIDO
    return WADO


class MetricsMiddleware:
    """ASGI middleware: ``latentpacs_request_seconds``, ``latentpacs_requests_total``,
    ``latentpacs_received_bytes_total`` and ``latentpacs_sent_bytes_total`` per request.

    A request whose handler raised before answering counts as status 500 (what the
    outer error middleware then sends). Lifespan and websocket scopes pass untouched.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        service = service_of(str(scope.get("method", "")), str(scope.get("path", "")))
        start = time.perf_counter()
        status = 500
        received = sent = 0

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
            return message

        async def counting_send(message: Message) -> None:
            nonlocal status, sent
            if message["type"] == "http.response.start":
                status = int(message["status"])
            elif message["type"] == "http.response.body":
                sent += len(message.get("body", b""))
            await send(message)

        try:
            await self.app(scope, counting_receive, counting_send)
        finally:
            metrics.REQUEST_SECONDS.labels(service).observe(time.perf_counter() - start)
            metrics.REQUESTS.labels(service, str(status)).inc()
            metrics.received(service, received)
            metrics.sent(service, sent)


def metrics_endpoint(request: Request) -> Response:
    """``GET /metrics``: the registry in the Prometheus text format (``metrics`` permission).

    A plain function: Starlette runs it on a worker thread, so the archive figures'
    query never blocks the event loop.
    """
    authorize(request, "metrics")
    return Response(metrics.exposition(), media_type=metrics.CONTENT_TYPE)


#: The ``/metrics`` route, for :func:`latentpacs.web.app.routes`.
METRICS_ROUTE = Route("/metrics", metrics_endpoint, methods=["GET"], name="metrics")
