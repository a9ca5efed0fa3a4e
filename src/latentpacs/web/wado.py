"""Routes of ``wado`` (being written for issue 11)."""

from __future__ import annotations

from starlette.routing import BaseRoute

ROUTES: list[BaseRoute] = []
