"""The web viewer: a static page at ``/`` and the JSON it needs beside DICOMweb.

The page (``static/index.html``, ``viewer.js``, ``viewer.css``: package data, vanilla
JavaScript, nothing fetched from elsewhere) holds no patient data and is served without
a token, with a strict Content-Security-Policy (no inline script or style, every
request to this origin only, images from blob URLs it makes itself). Everything it shows
comes from authorized requests it makes with ``fetch`` and ``Authorization: Bearer``:
QIDO-RS (PS3.18 10.6) for the studies and instances, WADO-RS metadata and frames
(10.4) for the pixels it windows itself, rendered thumbnails (10.4.1.1.3), and the two
routes here for what QIDO-RS cannot say: how the archive holds each study and instance
(fidelity tier, bytes received and archived, compression ratio;
:mod:`latentpacs.archive.summary`), with the ``query`` permission.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import BaseRoute, Route

from latentpacs.archive.summary import InstanceSummary, StorageSummary, StudySummary
from latentpacs.errors import InvalidIdentifierError
from latentpacs.uid import check_uid
from latentpacs.web.auth import authorize
from latentpacs.web.context import context

logger = logging.getLogger(__name__)

#: The page's files, installed with the package (``[tool.setuptools.package-data]``).
STATIC_DIR = Path(__file__).with_name("static")
#: Content types of the files the page is made of, by suffix; nothing else is served.
_MEDIA_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
                ".css": "text/css; charset=utf-8", ".svg": "image/svg+xml"}
#: The page may load its own script and style, fetch from this origin, draw blob images.
CONTENT_SECURITY_POLICY = ("default-src 'none'; script-src 'self'; style-src 'self'; "
                           "img-src 'self' blob: data:; connect-src 'self'; "
                           "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
_PAGE_HEADERS = {"Content-Security-Policy": CONTENT_SECURITY_POLICY,
                 "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer",
                 "Cache-Control": "no-cache"}
#: Studies per summary request (the page asks for one QIDO-RS page's worth).
MAX_STUDIES = 200
#: Instances per study summary; a larger study is summarised in part (the page says so).
MAX_INSTANCES = 2000


def _static(name: str) -> Response:
    path = STATIC_DIR / name
    media_type = _MEDIA_TYPES.get(path.suffix)
    if media_type is None or "/" in name or name.startswith(".") or not path.is_file():
        raise HTTPException(404, "no such file")
    return FileResponse(path, media_type=media_type, headers=_PAGE_HEADERS)


async def page(request: Request) -> Response:
    """``GET /``: the viewer's page (no token needed: it holds no data)."""
    return _static("index.html")


async def static_file(request: Request) -> Response:
    """``GET /viewer/static/{name}``: the page's script and style sheet."""
    return _static(str(request.path_params["name"]))


def _integer(request: Request, name: str, default: int, low: int, high: int) -> int:
    text = request.query_params.get(name)
    if text is None:
        return default
    if not text.isdigit() or not low <= int(text) <= high:
        raise InvalidIdentifierError(f"{name} must be an integer from {low} to {high}")
    return int(text)


def _figures(summary: StorageSummary) -> dict[str, Any]:
    ratio = summary.ratio
    return {"instances": summary.instances, "tiers": list(summary.tiers),
            "original_bytes": summary.original_bytes, "archived_bytes": summary.archived_bytes,
            "ratio": round(ratio, 2) if ratio is not None else None,
            "pending": summary.pending, "lossy_on_arrival": summary.lossy_on_arrival}


def _study_json(summary: StudySummary) -> dict[str, Any]:
    return {"StudyInstanceUID": summary.study_instance_uid, **_figures(summary)}


def _instance_json(summary: InstanceSummary) -> dict[str, Any]:
    return {"SeriesInstanceUID": summary.series_instance_uid,
            "SOPInstanceUID": summary.sop_instance_uid, **_figures(summary)}


async def studies(request: Request) -> Response:
    """``GET /viewer/api/studies``: tier, bytes and ratio per study (``query`` permission).

    ``StudyInstanceUID=UID,UID,...`` (at most :data:`MAX_STUDIES`, as QIDO-RS lists
    UIDs, PS3.18 8.3.4.1) names the studies; without it, ``limit`` (1 to
    :data:`MAX_STUDIES`, default 50) studies after ``offset``, in storage order.
    """
    authorize(request, "query")
    listed = request.query_params.get("StudyInstanceUID")
    uids = None
    if listed is not None:
        uids = [check_uid(uid, "Study Instance UID (0020,000D)")
                for uid in listed.replace("\\", ",").split(",") if uid.strip()]
        if len(uids) > MAX_STUDIES:
            raise InvalidIdentifierError(f"at most {MAX_STUDIES} Study Instance UIDs per request")
    limit = _integer(request, "limit", 50, 1, MAX_STUDIES)
    offset = _integer(request, "offset", 0, 0, 2**31 - 1)
    archive = context(request).service.archive
    found = await run_in_threadpool(archive.study_summaries, study_uids=uids, limit=limit,
                                    offset=offset)
    return JSONResponse({"studies": [_study_json(summary) for summary in found]},
                        headers={"Cache-Control": "no-store"})


async def study_instances(request: Request) -> Response:
    """``GET /viewer/api/studies/{uid}/instances``: tier, bytes and ratio per instance.

    Keyed by the effective Series and SOP Instance UIDs (those QIDO-RS and WADO-RS name);
    at most :data:`MAX_INSTANCES`, with ``truncated`` true when the study has more.
    """
    authorize(request, "query")
    uid = check_uid(request.path_params["uid"], "Study Instance UID (0020,000D)")
    archive = context(request).service.archive
    found = await run_in_threadpool(archive.instance_summaries, uid, limit=MAX_INSTANCES + 1)
    return JSONResponse({"StudyInstanceUID": uid, "truncated": len(found) > MAX_INSTANCES,
                         "instances": [_instance_json(summary) for summary in found[:MAX_INSTANCES]]},
                        headers={"Cache-Control": "no-store"})


ROUTES: list[BaseRoute] = [
    Route("/", page, methods=["GET"], name="viewer"),
    Route("/viewer/static/{name}", static_file, methods=["GET"], name="viewer-static"),
    Route("/viewer/api/studies", studies, methods=["GET"], name="viewer-studies"),
    Route("/viewer/api/studies/{uid}/instances", study_instances, methods=["GET"],
          name="viewer-study-instances"),
]
