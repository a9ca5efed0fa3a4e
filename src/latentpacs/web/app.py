"""The web application: DICOMweb routes, the viewer and ``/metrics``, in one Starlette app.

:func:`build_app` is the whole wiring: a list of routes from the route modules and the
exception handlers that turn the service's named errors into HTTP answers (PS3.18 8.6:
the status codes of a failed request). Routes are small functions that authorize, call
the :class:`~latentpacs.service.Service` and return a response.
"""

from __future__ import annotations

import logging

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import BaseRoute

from latentpacs.errors import (
    ArchiveError,
    ConstraintViolationError,
    InvalidIdentifierError,
    LatentPacsError,
    LimitExceededError,
    ModelError,
    NotAuthorizedError,
    NotFoundError,
    PixelChecksumError,
    StreamHashError,
)
from latentpacs import metrics
from latentpacs.web import instrument, qido, stow, viewer, wado
from latentpacs.web.context import WebContext

logger = logging.getLogger(__name__)

#: HTTP status of each named error (PS3.18 8.5), the first that matches; any other
#: LatentPacsError is a 400, an unexpected exception a 500 (logged with its traceback, not
#: shown to the client). A limit is 413 (Payload Too Large): PS3.18 10.6.3.1 names it for
#: a search too broad (more than ``limits.max_find_answers``); a retrieval beyond
#: ``limits.max_retrieve_instances`` is answered the same way. A
#: failing database or model is the server's state, not the request's: 503 (PS3.18 8.5);
#: an archived stream that no longer verifies, 500.
HTTP_STATUS: tuple[tuple[type[LatentPacsError], int], ...] = (
    (NotFoundError, 404),
    (NotAuthorizedError, 403),
    (LimitExceededError, 413),
    (InvalidIdentifierError, 400),
    (ConstraintViolationError, 400),
    (PixelChecksumError, 500),
    (StreamHashError, 500),
    (ArchiveError, 503),
    (ModelError, 503),
)


def http_status(exc: LatentPacsError) -> int:
    """The HTTP status a request that raised ``exc`` is answered with."""
    for kind, status in HTTP_STATUS:
        if isinstance(exc, kind):
            return status
    return 400


async def _latentpacs_error(request: Request, exc: Exception) -> Response:
    if not isinstance(exc, LatentPacsError):  # pragma: no cover - registered for that class
        raise exc
    status = http_status(exc)
    logger.info("web: %s %s -> %d: %s", request.method, request.url.path, status,
                type(exc).__name__)
    return PlainTextResponse(exc.message + "\n", status_code=status)


async def _http_error(request: Request, exc: Exception) -> Response:
    if not isinstance(exc, HTTPException):  # pragma: no cover - registered for that class
        raise exc
    return PlainTextResponse(f"{exc.detail}\n", status_code=exc.status_code, headers=exc.headers)


def routes() -> list[BaseRoute]:
    """Every route of the application, DICOMweb under :data:`~latentpacs.web.context.BASE_PATH`."""
    return [instrument.METRICS_ROUTE, *qido.ROUTES, *wado.ROUTES, *stow.ROUTES, *viewer.ROUTES]


def middleware() -> list[Middleware]:
    """The middleware stack, outermost first."""
    return [Middleware(instrument.MetricsMiddleware)]


def build_app(ctx: WebContext) -> Starlette:
    """The web application answering from ``ctx.service`` with ``ctx.auth``'s permissions."""
    app = Starlette(
        routes=routes(),
        middleware=middleware(),
        exception_handlers={LatentPacsError: _latentpacs_error, HTTPException: _http_error},
    )
    app.state.ctx = ctx
    metrics.watch_archive(ctx.service.archive.stats)  # /metrics: archive size per tier
    return app
