"""WADO-RS (PS3.18 10.4): instances, metadata, frames, bulk data and rendered images.

Every route authorizes ``retrieve`` first, validates the UIDs of its path (400) before
anything names a row, negotiates the Accept header (406, :mod:`latentpacs.web.negotiate`)
and selects the instances as a C-GET identifier would (``Service.matches`` at STUDY,
SERIES or IMAGE level, Study Root): unknown UIDs are 404, more than
``limits.max_retrieve_instances`` the HTTP status of
:class:`~latentpacs.errors.LimitExceededError`. Objects come from ``Service.returned`` /
``returned_ahead``, the C-GET path, so a WADO-RS retrieval returns the same derived
UIDs, lossy marking and pixels as C-GET, within the same decode budget.

Answers are streamed: ``multipart/related`` parts (:mod:`latentpacs.web.multipart`) are
produced one at a time while at most ``PREFETCH_DEPTH`` further instances decode ahead.
An instance that fails (too many pixels, no decode slot, a damaged stream) is left out
and logged, as a failed C-GET sub-operation is; when none could be returned, the
failure is the HTTP status (the first part is produced before the status line is
sent). Endpoints and body iterators are plain functions: Starlette runs them on worker
threads, so archive reads and decodes never block the event loop.

Metadata (PS3.18 10.4.1.1.2, F.2) is built from the archived header and overrides
without decoding pixels: the header of the returned object is the archived header
updated with the overrides and the Image Pixel module. Pixel Data, and any other binary
element over :data:`BULK_THRESHOLD` bytes, is a BulkDataURI to ``.../bulkdata/{tag}``.
"""

from __future__ import annotations

import base64
import io
import json
import logging
from collections.abc import Callable, Iterator
from contextlib import closing
from dataclasses import dataclass
from typing import Any

from pydicom.dataset import Dataset
from pydicom.encaps import generate_frames
from pydicom.uid import UID, ExplicitVRLittleEndian
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import BaseRoute, Route

from latentpacs import audit
from latentpacs.archive import ArchivedImage
from latentpacs.dicomjson import AS_RECEIVED_VR
from latentpacs.errors import InvalidIdentifierError, LatentPacsError, NotFoundError
from latentpacs.image.record import ImageRecord
from latentpacs.uid import is_valid_uid
from latentpacs.web import multipart, negotiate, render
from latentpacs.web.auth import authorize
from latentpacs.web.context import BASE_PATH, WebContext, context
from latentpacs.web.qido import wado_base

logger = logging.getLogger(__name__)

#: Binary elements (other than Pixel Data) longer than this go out as BulkDataURI.
BULK_THRESHOLD = 1024
#: Value representations whose values are bulk data (PS3.18 F.2.6).
BINARY_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "UN"})
PIXEL_DATA = "7FE00010"
#: Elements a returned object never carries beside native Pixel Data (PS3.3 C.7.6.3.1.3,
#: C.7.6.3.1.8): Planar Configuration, Extended Offset Table (Lengths).
_NOT_RETURNED = ("00280006", "7FE00001", "7FE00002")


@dataclass(frozen=True)
class Target:
    """The resource of a request: a study, a series or an instance, by validated UIDs."""

    study: str
    series: str | None = None
    instance: str | None = None

    @property
    def level(self) -> str:
        """The Query/Retrieve Level of the resource (PS3.4 C.6.2)."""
        return "IMAGE" if self.instance else "SERIES" if self.series else "STUDY"

    def identifier(self) -> Dataset:
        """The C-GET identifier selecting this resource (PS3.4 C.4.3.1.3, Study Root)."""
        ds = Dataset()
        ds.QueryRetrieveLevel = self.level
        ds.StudyInstanceUID = self.study
        if self.series:
            ds.SeriesInstanceUID = self.series
        if self.instance:
            ds.SOPInstanceUID = self.instance
        return ds


def _uid(request: Request, name: str, what: str) -> str:
    value = str(request.path_params[name])
    if not is_valid_uid(value):
        shown = value if value.isprintable() and len(value) <= 24 else repr(value[:24])
        raise InvalidIdentifierError(f"{what} {shown} is not a UID (digits and dots, PS3.5 9.1)")
    return value


def target(request: Request) -> Target:
    """The validated UIDs of the request's path.

    Raises
    ------
    InvalidIdentifierError
        (400) For a UID that is not digits and dots of at most 64 characters.
    """
    params = request.path_params
    return Target(
        _uid(request, "study", "Study Instance UID"),
        _uid(request, "series", "Series Instance UID") if "series" in params else None,
        _uid(request, "instance", "SOP Instance UID") if "instance" in params else None,
    )


def matched(ctx: WebContext, resource: Target) -> list[int]:
    """Archive rows of the resource's instances, as a C-GET of the same UIDs selects them.

    Raises
    ------
    NotFoundError
        (404) When nothing matches.
    LimitExceededError
        When more than ``limits.max_retrieve_instances`` match.
    """
    rows = ctx.service.matches(resource.level, resource.identifier(), root="STUDY")
    if not rows:
        uid = resource.instance or resource.series or resource.study
        raise NotFoundError(f"no {resource.level.lower()} {uid} is archived")
    return rows


def _base(request: Request) -> str:
    """The DICOMweb base URL of BulkDataURI and Content-Location: the one of Retrieve URLs
    (:func:`latentpacs.web.qido.wado_base`, ``web.public_url`` when set)."""
    return wado_base(request)


def _instance_url(request: Request, header: dict[str, Any]) -> str:
    def value(tag: str) -> str:
        return str(((header.get(tag) or {}).get("Value") or [""])[0])

    return (f"{_base(request)}/studies/{value('0020000D')}/series/{value('0020000E')}"
            f"/instances/{value('00080018')}")


def part10(ds: Dataset) -> bytes:
    """``ds`` as a PS3.10 file: preamble, ``DICM``, File Meta Information, data set (PS3.10 7.1)."""
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _syntax(ds: Dataset) -> str:
    return str(ds.file_meta.TransferSyntaxUID)


def _returned(ctx: WebContext, rows: list[int], sendable: frozenset[tuple[str, str]],
              build: Callable[[Dataset], multipart.Part]) -> Iterator[multipart.Part]:
    """One part per returned object, decoded ``PREFETCH_DEPTH`` ahead (``Service.returned_ahead``).

    A failed instance is logged and left out, as a failed C-GET sub-operation is; when
    no instance could be returned at all (a single one that failed, say), the last
    failure is raised, before any part: the caller answers it as the HTTP status.
    """
    failure: Exception | None = None
    sent = 0
    with closing(ctx.service.returned_ahead(rows, sendable=sendable)) as decoded:
        for row, future in decoded:
            try:
                part = build(future.result())
            except LatentPacsError as exc:
                logger.warning("WADO-RS: archive row %s left out: %s", row, exc.message)
                failure = exc
                continue
            except Exception as exc:
                logger.exception("WADO-RS: archive row %s left out", row)
                failure = exc
                continue
            sent += 1
            yield part
    if not sent and failure is not None:
        raise failure


def _started(parts: Iterator[multipart.Part]) -> Iterator[multipart.Part]:
    """``parts`` with its first part produced now, so its failure becomes the status."""
    first = next(parts, None)

    def chained() -> Iterator[multipart.Part]:
        if first is not None:
            yield first
        yield from parts

    return chained()


def _multipart(parts: Iterator[multipart.Part], part_type: str) -> StreamingResponse:
    boundary = multipart.new_boundary()
    return StreamingResponse(multipart.stream(_started(parts), boundary),
                             media_type=multipart.content_type(part_type, boundary))


# --- Retrieve instances (PS3.18 10.4.1.1.1) ------------------------------------------


def retrieve_instances(request: Request) -> Response:
    """``GET .../studies/{s}[/series/{se}[/instances/{i}]]``: PS3.10 parts of each instance.

    ``multipart/related; type="application/dicom"``, one part per instance in the
    transfer syntax the Accept header allows (:func:`negotiate.dicom_syntaxes`): Explicit
    VR Little Endian by default, ``transfer-syntax=*`` the archived JPEG-LS stream as it
    is, or a named JPEG-LS, JPEG 2000 or RLE lossless syntax.
    """
    authorize(request, "retrieve")
    ctx = context(request)
    resource = target(request)
    syntaxes = negotiate.dicom_syntaxes(request.headers.get("accept"))
    rows = matched(ctx, resource)
    base = _base(request)

    transfer = audit.Transfer()

    def build(ds: Dataset) -> multipart.Part:
        transfer.add(ds)
        location = (f"{base}/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}"
                    f"/instances/{ds.SOPInstanceUID}")
        return multipart.Part(f"{negotiate.DICOM}; transfer-syntax={_syntax(ds)}", part10(ds),
                              location)

    return _multipart(_audited(request, _returned(ctx, rows, negotiate.sendable(syntaxes), build),
                               transfer, len(rows)), negotiate.DICOM)


def _audited(request: Request, parts: Iterator[multipart.Part], transfer: audit.Transfer,
             matched_count: int) -> Iterator[multipart.Part]:
    """``parts``, then DICOM Instances Transferred (PS3.15 A.5.3.4) for what was sent."""
    principal = context(request).auth.principal(request)
    client = audit.web_participant(principal.name if principal else "",
                                   request.client.host if request.client else "",
                                   audit.DESTINATION)
    try:
        yield from parts
    finally:
        audit.transferred(client, client, transfer,
                          audit.SUCCESS if transfer.count == matched_count else audit.MINOR_FAILURE,
                          f"WADO-RS: {transfer.count} of {matched_count} instance(s) sent")


# --- Metadata (PS3.18 10.4.1.1.2, F.2) --------------------------------------------------


def _strip_received_vr(element: dict[str, Any]) -> dict[str, Any]:
    """An archived element as plain DICOM JSON: latentpacs' own keys removed, at any depth."""
    element = {key: value for key, value in element.items() if key != AS_RECEIVED_VR}
    if element.get("vr") == "SQ" and element.get("Value"):
        element["Value"] = [{tag: _strip_received_vr(item_element) for tag, item_element in item.items()}
                            for item in element["Value"]]
    return element


def returned_header(archived: ArchivedImage) -> dict[str, Any]:
    """DICOM JSON of the returned object's header (no Pixel Data), with no pixel decoded.

    The archived header updated with the archived overrides (what C-GET delivers,
    :func:`latentpacs.image.derive.assemble`) and the Image Pixel module as the returned
    object writes it (PS3.3 C.7.6.3).
    """
    module = Dataset()
    ImageRecord.from_archived(archived).module.apply_to(module)
    header = {**archived.header, **archived.overrides, **module.to_json_dict()}
    for tag in _NOT_RETURNED:
        header.pop(tag, None)
    return {tag: _strip_received_vr(header[tag]) for tag in sorted(header)}


def instance_metadata(archived: ArchivedImage, instance_url: str) -> dict[str, Any]:
    """The metadata of one returned instance (PS3.18 F.2): header, bulk data as BulkDataURI.

    Pixel Data (as the default retrieval sends it, OW) and top-level binary elements over
    :data:`BULK_THRESHOLD` bytes point at ``{instance_url}/bulkdata/{tag}`` (PS3.18 F.2.6).
    """
    header = returned_header(archived)
    for tag, element in header.items():
        inline = element.get("InlineBinary")
        if element.get("vr") in BINARY_VRS and inline and len(inline) * 3 // 4 > BULK_THRESHOLD:
            header[tag] = {"vr": element["vr"], "BulkDataURI": f"{instance_url}/bulkdata/{tag}"}
    header[PIXEL_DATA] = {"vr": "OW", "BulkDataURI": f"{instance_url}/bulkdata/{PIXEL_DATA}"}
    return header


def metadata(request: Request) -> Response:
    """``GET .../metadata`` at study, series or instance level: a DICOM JSON array (F.2).

    One object per returned instance, read from the archive without decoding pixels;
    the array is streamed, one instance at a time.
    """
    authorize(request, "retrieve")
    ctx = context(request)
    resource = target(request)
    negotiate.metadata_acceptable(request.headers.get("accept"))
    rows = matched(ctx, resource)

    def one(row: int) -> bytes:
        archived = ctx.service.archive.load(row)
        url = _instance_url(request, {**archived.header, **archived.overrides})
        return json.dumps(instance_metadata(archived, url), separators=(",", ":")).encode()

    first = one(rows[0])

    def body() -> Iterator[bytes]:
        yield b"[" + first
        for row in rows[1:]:
            try:
                yield b"," + one(row)
            except LatentPacsError as exc:
                logger.warning("WADO-RS metadata: archive row %s left out: %s", row, exc.message)
        yield b"]"

    return StreamingResponse(body(), media_type=negotiate.DICOM_JSON)


# --- Frames and bulk data (PS3.18 10.4.1.1.4, 10.4.1.1.5) --------------------------------


def _single(ctx: WebContext, request: Request, syntaxes: tuple[str, ...]) -> Dataset:
    """The one returned object of an instance resource, in one of ``syntaxes``."""
    (row, *_) = matched(ctx, target(request))
    return ctx.service.returned(row, sendable=negotiate.sendable(syntaxes))


def _pixel_bytes(ds: Dataset, media_type: str) -> tuple[bytes, str]:
    """The single frame of a returned object and its transfer syntax (PS3.18 8.7.3.5.3).

    Native: the pixel cells, little endian, without the padding byte of an odd length;
    JPEG-LS: the frame's codestream from the encapsulated Pixel Data.
    """
    syntax = _syntax(ds)
    if media_type == negotiate.OCTET_STREAM:
        if UID(syntax).is_compressed:  # pragma: no cover - only native was offered
            raise HTTPException(500, "a native object was expected")
        length = int(ds.Rows) * int(ds.Columns) * (int(ds.BitsAllocated) // 8)
        return bytes(ds.PixelData[:length]), syntax
    if not UID(syntax).is_compressed:
        raise HTTPException(406, "these pixels go out native only (application/octet-stream)")
    return next(generate_frames(ds.PixelData, number_of_frames=1)), syntax


def _frame_numbers(text: str) -> list[int]:
    """The frame list of a frames URL (PS3.18 10.4.1.1.4): 1-based numbers, comma-separated.

    Raises
    ------
    HTTPException
        400 for a malformed list; 404 for a frame the (single-frame) image does not have.
    """
    try:
        numbers = [int(value) for value in text.split(",")]
    except ValueError:
        raise HTTPException(400, f"frame list {text[:32]!r} is not comma-separated numbers") from None
    if not numbers or min(numbers) < 1:
        raise HTTPException(400, "frame numbers start at 1")
    if max(numbers) > 1:
        raise HTTPException(404, f"frame {max(numbers)} does not exist: the image has 1 frame")
    return numbers


def frames(request: Request) -> Response:
    """``GET .../instances/{i}/frames/{list}``: the frames' pixel data, one part each.

    ``application/octet-stream`` (native little-endian cells, the default) or
    ``image/jls`` (the archived JPEG-LS stream, or coded losslessly now).
    """
    authorize(request, "retrieve")
    ctx = context(request)
    target(request)
    numbers = _frame_numbers(str(request.path_params["frames"]))
    media_type, syntaxes = negotiate.frame_media(request.headers.get("accept"))
    data, syntax = _pixel_bytes(_single(ctx, request, syntaxes), media_type)
    part = f"{media_type}; transfer-syntax={syntax}"
    return _multipart(iter([multipart.Part(part, data) for _ in numbers]), media_type)


def bulkdata(request: Request) -> Response:
    """``GET .../instances/{i}/bulkdata/{tag}``: a BulkDataURI of the metadata (PS3.18 10.4.1.1.5).

    Pixel Data is the returned object's (decoded as a frames request is); any other tag
    is read from the archived header without decoding.
    """
    authorize(request, "retrieve")
    ctx = context(request)
    resource = target(request)
    tag = str(request.path_params["tag"]).upper()
    if len(tag) != 8 or any(c not in "0123456789ABCDEF" for c in tag):
        raise HTTPException(400, "a bulk data tag is 8 hexadecimal digits")
    media_type, syntaxes = negotiate.frame_media(request.headers.get("accept"))
    if tag == PIXEL_DATA:
        data, syntax = _pixel_bytes(_single(ctx, request, syntaxes), media_type)
        return _multipart(iter([multipart.Part(f"{media_type}; transfer-syntax={syntax}", data)]),
                          media_type)
    if media_type != negotiate.OCTET_STREAM:
        raise HTTPException(406, "bulk data other than Pixel Data is application/octet-stream")
    (row, *_) = matched(ctx, resource)
    element = returned_header(ctx.service.archive.load(row)).get(tag) or {}
    inline = element.get("InlineBinary")
    if element.get("vr") not in BINARY_VRS or not inline:
        raise HTTPException(404, f"the instance has no bulk data element {tag}")
    return _multipart(iter([multipart.Part(negotiate.OCTET_STREAM, base64.b64decode(inline))]),
                      negotiate.OCTET_STREAM)


# --- Rendered (PS3.18 10.4.1.1.3, 8.3.5.1) ----------------------------------------------


@dataclass(frozen=True)
class RenderRequest:
    """What a rendered request asks for: media type and the query parameters of 8.3.5.1."""

    media_type: str
    window: render.Window | None
    viewport: tuple[int, int] | None
    quality: int

    @classmethod
    def of(cls, request: Request) -> RenderRequest:
        """The Accept header and ``window``, ``viewport``, ``quality`` of ``request``.

        Raises
        ------
        HTTPException
            400 for a malformed parameter, 406 for an Accept without PNG or JPEG.
        """
        media_type = negotiate.rendered_media(request.headers.get("accept"))
        query = request.query_params
        try:
            window = render.parse_window(query["window"]) if "window" in query else None
            viewport = render.parse_viewport(query["viewport"]) if "viewport" in query else None
            quality = int(query.get("quality", render.DEFAULT_QUALITY))
        except ValueError as exc:
            raise HTTPException(400, f"rendered parameters: {exc}") from None
        if not 1 <= quality <= 100:
            raise HTTPException(400, "quality is 1 to 100")
        return cls(media_type, window, viewport, quality)

    def image(self, ds: Dataset) -> bytes:
        """The rendered image of a returned object."""
        return render.render(ds, self.media_type, window=self.window, viewport=self.viewport,
                             quality=self.quality)


def rendered(request: Request) -> Response:
    """``GET .../rendered``: PNG (default) or JPEG, 8-bit, with the object's or the given window.

    An instance (or its frame 1) answers one image; a series or study a
    ``multipart/related`` of one rendered image per instance.
    """
    authorize(request, "retrieve")
    ctx = context(request)
    resource = target(request)
    if "frames" in request.path_params:
        _frame_numbers(str(request.path_params["frames"]))
    asked = RenderRequest.of(request)
    rows = matched(ctx, resource)
    native = negotiate.sendable((ExplicitVRLittleEndian,))
    if resource.instance:
        return Response(asked.image(ctx.service.returned(rows[0], sendable=native)),
                        media_type=asked.media_type)
    return _multipart(_returned(ctx, rows, native,
                                lambda ds: multipart.Part(asked.media_type, asked.image(ds))),
                      asked.media_type)


_STUDY = BASE_PATH + "/studies/{study}"
_SERIES = _STUDY + "/series/{series}"
_INSTANCE = _SERIES + "/instances/{instance}"

#: The WADO-RS routes, for :func:`latentpacs.web.app.routes`.
ROUTES: list[BaseRoute] = [
    Route(_STUDY, retrieve_instances, methods=["GET"], name="wado_study"),
    Route(_SERIES, retrieve_instances, methods=["GET"], name="wado_series"),
    Route(_INSTANCE, retrieve_instances, methods=["GET"], name="wado_instance"),
    Route(_STUDY + "/metadata", metadata, methods=["GET"], name="wado_study_metadata"),
    Route(_SERIES + "/metadata", metadata, methods=["GET"], name="wado_series_metadata"),
    Route(_INSTANCE + "/metadata", metadata, methods=["GET"], name="wado_instance_metadata"),
    Route(_INSTANCE + "/frames/{frames}", frames, methods=["GET"], name="wado_frames"),
    Route(_INSTANCE + "/bulkdata/{tag}", bulkdata, methods=["GET"], name="wado_bulkdata"),
    Route(_STUDY + "/rendered", rendered, methods=["GET"], name="wado_study_rendered"),
    Route(_SERIES + "/rendered", rendered, methods=["GET"], name="wado_series_rendered"),
    Route(_INSTANCE + "/rendered", rendered, methods=["GET"], name="wado_instance_rendered"),
    Route(_INSTANCE + "/frames/{frames}/rendered", rendered, methods=["GET"],
          name="wado_frame_rendered"),
]
