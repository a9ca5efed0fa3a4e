"""STOW-RS (PS3.18 10.5): ``POST /studies`` and ``POST /studies/{study}``, as C-STORE stores.

The body is ``multipart/related; type="application/dicom"`` (PS3.18 8.6.1.2, RFC 2387),
one PS3.10 file per part. It is read as it arrives, each part into a temporary file
(never the whole body in memory), at most ``web.max_stow_bytes`` bytes in all (more:
413, nothing stored). Each part is then read with pydicom and stored through
:meth:`Service.store <latentpacs.service.Service.store>` with the part's file as the
received file, exactly as the node's C-STORE handler stores a data set it received into
a file: the same validation, the same deferred coding at the ``lossless`` tier, the same
duplicate policy, and an answer only after the archive committed.

A part is refused as the node refuses it: a SOP Class the node does not store
(mammography and ``node.extra_storage_classes``; 0122, Referenced SOP Class not
supported) or a transfer syntax it does not accept (C122) is checked first; then every
:class:`~latentpacs.errors.LatentPacsError` gives its C-STORE status as the Failure
Reason (0008,1197) (PS3.18 Table I.2-2: A7xx out of resources, A9xx data set does not
match, Cxxx cannot understand, 0110 processing failure). On ``/studies/{study}`` a part
of another study fails with A901 (:data:`STUDY_MISMATCH`, in the A9xx range PS3.18
10.5.3 names for a "Study Instance UID mismatch"). No stored part carries a Warning
Reason: the archive never coerces or discards an attribute (the header is kept as
received), so there is nothing to warn about.

The answer (PS3.18 10.5.3, Annex I) is DICOM JSON with Referenced SOP Sequence
(0008,1199) for the stored instances (each with its WADO-RS Retrieve URL), Failed SOP
Sequence (0008,1198) for the others, and status 200 (all stored), 202 (some stored),
409 (none stored), 400 (a body that is not a multipart/related payload), 415 (another
media type) or 413 (too large).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import pydicom
from pydicom.dataset import Dataset
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from latentpacs import audit
from latentpacs.errors import LatentPacsError, Status
from latentpacs.node.app import MAMMOGRAPHY_CLASSES, STORE_TRANSFER_SYNTAXES
from latentpacs.web.auth import authorize
from latentpacs.web.context import BASE_PATH, WebContext, context
from latentpacs.web.qido import DICOM_JSON, path_uid, wado_base

logger = logging.getLogger(__name__)

#: The media type of each part (PS3.18 8.6.1.2: PS3.10 files).
APPLICATION_DICOM = "application/dicom"
#: Failure Reason of a SOP Class the node does not store (PS3.18 Table I.2-2).
SOP_CLASS_NOT_SUPPORTED = 0x0122
#: Failure Reason of a transfer syntax the node does not accept (PS3.18 Table I.2-2).
TRANSFER_SYNTAX_NOT_SUPPORTED = 0xC122
#: Failure Reason of a part whose Study Instance UID differs from ``/studies/{study}``:
#: A9xx (data set does not match, PS3.18 Table I.2-2), the first code after A900, as
#: other origin servers answer it; listed in the conformance statement.
STUDY_MISMATCH = 0xA901
#: Largest header block of one part, bytes; more is not a multipart/related body.
MAX_PART_HEADERS = 16384


@dataclass(frozen=True)
class Part:
    """One body part, received into ``path``, with its media type (lower case, no parameters)."""

    path: Path
    media_type: str


@dataclass(frozen=True)
class Outcome:
    """What became of one part: stored (``reason`` None) or refused with a Failure Reason."""

    sop_class: str
    sop_instance: str
    reason: int | None = None
    retrieve_url: str = ""
    study: str = ""


def _parameters(header: str) -> tuple[str, dict[str, str]]:
    """The media type (lower case) and parameters of a Content-Type value (RFC 9110 8.3.1).

    Parameter names are case-insensitive, values token or quoted-string (a backslash
    escapes the next character inside quotes).
    """
    media_type, _, rest = header.partition(";")
    parameters: dict[str, str] = {}
    index = 0
    while index < len(rest):
        while index < len(rest) and rest[index] in " \t;":
            index += 1
        equals = rest.find("=", index)
        if equals < 0:
            break
        name = rest[index:equals].strip().lower()
        index = equals + 1
        if index < len(rest) and rest[index] == '"':
            index += 1
            value = []
            while index < len(rest) and rest[index] != '"':
                if rest[index] == "\\" and index + 1 < len(rest):
                    index += 1
                value.append(rest[index])
                index += 1
            index += 1
            parameters[name] = "".join(value)
        else:
            end = rest.find(";", index)
            end = len(rest) if end < 0 else end
            parameters[name] = rest[index:end].strip()
            index = end
    return media_type.strip().lower(), parameters


def boundary_of(content_type: str) -> str:
    """The boundary of a STOW-RS request's Content-Type (PS3.18 10.5.1.1, RFC 2387).

    ``multipart/related`` with ``type`` ``application/dicom`` (quoted or not; a missing
    ``type`` is taken as ``application/dicom``, each part's own Content-Type then
    decides); ``start`` and other parameters are ignored.

    Raises
    ------
    HTTPException
        415 for another media type or another ``type``; 400 without a boundary.
    """
    media_type, parameters = _parameters(content_type)
    if media_type != "multipart/related":
        raise HTTPException(415, f"STOW-RS takes multipart/related; type=\"{APPLICATION_DICOM}\", "
                                 f"not {media_type or 'no Content-Type'}")
    part_type = parameters.get("type", APPLICATION_DICOM).split(";")[0].strip().lower()
    if part_type != APPLICATION_DICOM:
        raise HTTPException(415, f"only {APPLICATION_DICOM} parts are stored (PS3.10 files), "
                                 f"not {part_type}")
    boundary = parameters.get("boundary", "")
    # RFC 2046 5.1.1 says at most 70 characters, but a receiver is lenient: Orthanc's
    # DICOMweb plugin (1.7) sends 73, two UUIDs joined by "-" (tests/test_web_orthanc.py).
    if not 1 <= len(boundary) <= 256:
        raise HTTPException(400, "multipart/related needs a boundary of 1 to 256 characters")
    return boundary


class MultipartReader:
    """A streaming multipart/related parser (RFC 2046 5.1.1) writing each part to a file.

    Lenient as receivers should be: a preamble before the first delimiter and an epilogue
    after the last are ignored, transport padding after a delimiter is skipped, and a
    bare LF is taken where CRLF is due. At most ``max_bytes`` body bytes are accepted.
    """

    def __init__(self, boundary: str, directory: Path, max_bytes: int) -> None:
        self._delimiter = b"\n--" + boundary.encode("latin-1")
        self._directory = directory
        self._max_bytes = max_bytes
        self._buffer = bytearray(b"\r\n")  # the first delimiter may open the body
        self._state = "preamble"
        self._received = 0
        self._file: BinaryIO | None = None
        self.parts: list[Part] = []

    async def read(self, chunks: AsyncIterator[bytes]) -> list[Part]:
        """Read the whole body from ``chunks``; returns the parts in order.

        Raises
        ------
        HTTPException
            413 past ``max_bytes``; 400 for a body without a complete multipart payload.
        """
        try:
            async for chunk in chunks:
                self._received += len(chunk)
                if self._received > self._max_bytes:
                    raise HTTPException(413, f"the body exceeds web.max_stow_bytes "
                                             f"({self._max_bytes} bytes); nothing was stored")
                self._buffer += chunk
                self._advance()
                if self._state == "done":
                    break
            self._advance(final=True)
        finally:
            if self._file is not None:
                self._file.close()
        if self._state != "done":
            raise HTTPException(400, "the multipart/related body ends before its close delimiter")
        if not self.parts:
            raise HTTPException(400, "the multipart/related body holds no part")
        return self.parts

    def _advance(self, final: bool = False) -> None:
        while True:
            if self._state == "preamble":
                found = self._buffer.find(self._delimiter)
                if found < 0:
                    del self._buffer[:max(len(self._buffer) - len(self._delimiter), 0)]
                    return
                del self._buffer[:found + len(self._delimiter)]
                self._state = "delimiter"
            elif self._state == "delimiter":
                if self._buffer.startswith(b"--"):
                    self._state = "done"
                    return
                end = self._buffer.find(b"\n")
                if end < 0:
                    if len(self._buffer) > MAX_PART_HEADERS:
                        raise HTTPException(400, "a multipart delimiter line is too long")
                    return
                del self._buffer[:end + 1]  # transport padding and CRLF
                self._state = "headers"
            elif self._state == "headers":
                if not self._headers():
                    return
            elif self._state == "body":
                if not self._body(final):
                    return
            else:
                return

    def _headers(self) -> bool:
        """Consume one part's header block; False when more bytes are needed."""
        media_type = APPLICATION_DICOM
        position = 0
        while True:
            end = self._buffer.find(b"\n", position)
            if end < 0:
                if len(self._buffer) > MAX_PART_HEADERS:
                    raise HTTPException(400, "a part's headers are too long")
                return False
            line = bytes(self._buffer[position:end]).rstrip(b"\r")
            position = end + 1
            if not line:
                break
            name, _, value = line.decode("latin-1").partition(":")
            if name.strip().lower() == "content-type":
                media_type = _parameters(value.strip())[0]
        del self._buffer[:position]
        handle, name = tempfile.mkstemp(prefix="part-", suffix=".dcm", dir=self._directory)
        self._file = os.fdopen(handle, "wb")
        self.parts.append(Part(Path(name), media_type))
        self._state = "body"
        return True

    def _body(self, final: bool) -> bool:
        """Write the part's bytes up to the next delimiter; False when more are needed."""
        out = self._file
        if out is None:  # pragma: no cover - opened by _headers
            raise RuntimeError("no part file is open")
        found = self._buffer.find(self._delimiter)
        if found < 0:
            # Keep what could be the start of a delimiter (and the CR before its LF).
            cut = len(self._buffer) - len(self._delimiter) - 1
            if cut > 0 and not final:
                out.write(self._buffer[:cut])
                del self._buffer[:cut]
            return False
        end = found - 1 if found > 0 and self._buffer[found - 1] == 0x0D else found
        out.write(self._buffer[:end])
        out.close()
        self._file = None
        del self._buffer[:found + len(self._delimiter)]
        self._state = "delimiter"
        return True


def _failed(sop_class: str, sop_instance: str, reason: int, message: str) -> Outcome:
    logger.warning("STOW-RS part refused (%04X): %s", reason, message)
    return Outcome(sop_class, sop_instance, reason)


def store_part(ctx: WebContext, part: Part, study: str | None, wado: str,
               source: audit.Participant | None = None) -> Outcome:
    """Store one part as the node's C-STORE handler stores a received data set.

    Runs on a worker thread. Returns the :class:`Outcome`; never raises for the part's
    own faults (each becomes its Failure Reason, PS3.18 I.2.2).
    """
    if part.media_type != APPLICATION_DICOM:
        return _failed("", "", int(Status.CANNOT_UNDERSTAND), f"a part of type {part.media_type}")
    try:
        ds = pydicom.dcmread(part.path)
    except Exception as exc:  # not a PS3.10 file, or undecodable
        return _failed("", "", int(Status.CANNOT_UNDERSTAND), f"not a readable PS3.10 file: {exc}")
    try:
        sop_class = str(ds.get("SOPClassUID", "") or "").strip()
        sop_instance = str(ds.get("SOPInstanceUID", "") or "").strip()
        part_study = str(ds.get("StudyInstanceUID", "") or "").strip()
        syntax = str(ds.file_meta.get("TransferSyntaxUID", "") or "").strip()
    except Exception as exc:
        return _failed("", "", int(Status.CANNOT_UNDERSTAND), f"identity cannot be read: {exc}")
    accepted = (*MAMMOGRAPHY_CLASSES, *ctx.config["node.extra_storage_classes"])
    if sop_class not in accepted:
        return _failed(sop_class, sop_instance, SOP_CLASS_NOT_SUPPORTED,
                       f"SOP Class {sop_class or '(none)'} is not stored here")
    if syntax not in STORE_TRANSFER_SYNTAXES:
        return _failed(sop_class, sop_instance, TRANSFER_SYNTAX_NOT_SUPPORTED,
                       f"transfer syntax {syntax or '(none)'} is not accepted")
    if study is not None and part_study != study:
        return _failed(sop_class, sop_instance, STUDY_MISMATCH,
                       f"Study Instance UID {part_study} is not the requested {study}")
    try:
        result = ctx.service.store(ds, received=part.path)
    except LatentPacsError as exc:
        if source is not None:
            audit.stored(source, ds, "stored", audit.MINOR_FAILURE, exc.message)
        return _failed(sop_class, sop_instance, int(exc.status), exc.message)
    except Exception as exc:
        logger.exception("STOW-RS store failed")
        return _failed(sop_class, sop_instance, int(Status.PROCESSING_FAILURE),
                       f"internal error: {exc.__class__.__name__}")
    if source is not None:  # PS3.15 A.5.3.4 DICOM Instances Transferred
        audit.stored(source, ds, str(result))
    return Outcome(sop_class, sop_instance, None, *_retrieve_url(ctx, sop_instance, wado))


def _retrieve_url(ctx: WebContext, sop_instance: str, wado: str) -> tuple[str, str]:
    """The WADO-RS URL of a stored instance and its study, under the UIDs a retrieval
    returns (derived at lossy tiers, the ones C-FIND and QIDO-RS show)."""
    identity = ctx.service.archive.returned_identity(sop_instance)
    if identity is None:  # replaced by a concurrent re-send meanwhile
        return "", ""
    study, series, shown = identity
    return f"{wado}/studies/{study}/series/{series}/instances/{shown}", study


def response_dataset(outcomes: list[Outcome], study_url: str) -> Dataset:
    """The Store Instances Response Module (PS3.18 Annex I) of the outcomes."""
    response = Dataset()
    response.RetrieveURL = study_url
    stored = []
    failed = []
    for outcome in outcomes:
        item = Dataset()
        item.ReferencedSOPClassUID = outcome.sop_class
        item.ReferencedSOPInstanceUID = outcome.sop_instance
        if outcome.reason is None:
            item.RetrieveURL = outcome.retrieve_url
            stored.append(item)
        else:
            item.FailureReason = outcome.reason
            failed.append(item)
    if failed:
        response.FailedSOPSequence = failed
    if stored:
        response.ReferencedSOPSequence = stored
    return response


def http_status(outcomes: list[Outcome]) -> int:
    """200 when every part was stored, 202 when some were, 409 when none (PS3.18 Table 10.5.3-1)."""
    stored = sum(outcome.reason is None for outcome in outcomes)
    if stored == len(outcomes):
        return 200
    return 202 if stored else 409


async def _store(request: Request, study: str | None) -> Response:
    ctx = context(request)
    boundary = boundary_of(request.headers.get("content-type", ""))
    max_bytes = int(ctx.config["web.max_stow_bytes"])
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > max_bytes:
        raise HTTPException(413, f"the body exceeds web.max_stow_bytes ({max_bytes} bytes)")
    wado = wado_base(request)
    principal = ctx.auth.principal(request)
    source = audit.web_participant(principal.name if principal else "",
                                   request.client.host if request.client else "", audit.SOURCE)
    directory = Path(await run_in_threadpool(tempfile.mkdtemp, prefix="latentpacs-stow-"))
    try:
        parts = await MultipartReader(boundary, directory, max_bytes).read(request.stream())
        outcomes = [await run_in_threadpool(store_part, ctx, part, study, wado, source)
                    for part in parts]
    finally:
        await run_in_threadpool(shutil.rmtree, directory, True)
    studies = {outcome.study for outcome in outcomes if outcome.reason is None}
    shown = study if study is not None else (studies.pop() if len(studies) == 1 else "")
    study_url = f"{wado}/studies/{shown}" if shown else ""
    status = http_status(outcomes)
    logger.info("STOW-RS: %d parts, %d stored -> %d", len(outcomes),
                sum(outcome.reason is None for outcome in outcomes), status)
    body = response_dataset(outcomes, study_url).to_json(bulk_data_threshold=1 << 30)
    return Response(body, status_code=status, media_type=DICOM_JSON)


async def store_instances(request: Request) -> Response:
    """``POST /studies`` (PS3.18 10.5.1): store the body's instances."""
    authorize(request, "store")
    return await _store(request, None)


async def store_study_instances(request: Request) -> Response:
    """``POST /studies/{study}``: store the body's instances of that study only."""
    authorize(request, "store")
    return await _store(request, path_uid(request, "study", "Study Instance UID"))


#: The STOW-RS routes (PS3.18 Table 10.5.1-1). The body is read on the event loop as it
#: arrives; parsing and storing each part run on worker threads.
ROUTES: list[BaseRoute] = [
    Route(f"{BASE_PATH}/studies", store_instances, methods=["POST"], name="stow-studies"),
    Route(f"{BASE_PATH}/studies/{{study}}", store_study_instances, methods=["POST"],
          name="stow-study"),
]
