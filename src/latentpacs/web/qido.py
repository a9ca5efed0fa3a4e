"""QIDO-RS (PS3.18 10.6): search for studies, series and instances, answered as C-FIND is.

Each search becomes a C-FIND identifier (PS3.4 C.4.1.1.3) in the Study Root model and
goes to :meth:`Service.find <latentpacs.service.Service.find>`: the same keys, the
same matching (wildcards ``*`` ``?``, date/time ranges, UID lists), the same limits and
the same UIDs as a DIMSE C-FIND. Query parameters (PS3.18 8.3.4):

* ``{attribute}={value}``: an attribute keyword (``PatientName``) or tag (``00100010``),
  or a path into a sequence (``RequestAttributesSequence.RequestedProcedureID``,
  PS3.18 8.3.4.1); a UID list is comma-separated (PS3.4 C.2.2.2.2); an empty value asks
  for the attribute back.
* ``includefield``: attributes to return besides the level's defaults (PS3.18
  10.6.3.3), repeated or comma-separated; ``all`` returns every attribute the archive
  can answer at the levels of the search.
* ``fuzzymatching``: ``true`` or ``false``; the archive matches literally (person names
  case-insensitively), so ``true`` is answered with ``Warning: 299`` (PS3.18 8.3.4.3).
* ``limit`` / ``offset``: at most ``limit`` answers after skipping ``offset``; when more
  remain, a ``Warning: 299`` says so (PS3.18 8.3.4.4).

Answers (PS3.18 10.6.3): ``200`` with a DICOM JSON array (PS3.18 F.2), each object
carrying the level's default attributes and Retrieve URL (0008,1190) of the resource's
WADO-RS URL; ``204`` with no body when nothing matches (PS3.18 10.6.3.1 lists 204 for
zero results); ``400`` for a bad parameter or identifier; ``413`` when more than
``limits.max_find_answers`` answers match (a search too broad, PS3.18 10.6.3.1; the
answers are read, at most that many, before the status is sent, so a 413 is never
preceded by a partial answer).
"""

from __future__ import annotations

import itertools
import json
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from pydicom.datadict import dictionary_VR, keyword_for_tag, tag_for_keyword
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import BaseRoute, Route

from latentpacs import audit
from latentpacs.archive.keys import COMPUTED_KEYS, NOT_KEYS, OTHER_KEY_LEVELS, SQL_KEYS
from latentpacs.dicomjson import AS_RECEIVED_VR, header_json
from latentpacs.errors import InvalidUidError
from latentpacs.uid import check_uid
from latentpacs.web.auth import authorize
from latentpacs.web.context import BASE_PATH, context

logger = logging.getLogger(__name__)

#: The media type of every QIDO-RS answer (PS3.18 8.7.3.3, F.2).
DICOM_JSON = "application/dicom+json"
#: Accept values that take a DICOM JSON answer.
_ACCEPTABLE = frozenset({DICOM_JSON, "application/json", "application/*", "*/*"})

#: Attributes every answer of a level carries (PS3.18 Tables 10.6.3-3, -4, -5). Timezone
#: Offset From UTC is not archived per entity (nothing to return); Retrieve URL is added
#: to each answer here.
DEFAULT_KEYS: dict[str, tuple[str, ...]] = {
    "STUDY": ("StudyDate", "StudyTime", "AccessionNumber", "InstanceAvailability",
              "ModalitiesInStudy", "ReferringPhysicianName", "PatientName", "PatientID",
              "PatientBirthDate", "PatientSex", "StudyInstanceUID", "StudyID",
              "NumberOfStudyRelatedSeries", "NumberOfStudyRelatedInstances"),
    "SERIES": ("Modality", "SeriesDescription", "SeriesInstanceUID", "SeriesNumber",
               "NumberOfSeriesRelatedInstances", "PerformedProcedureStepStartDate",
               "PerformedProcedureStepStartTime", "RequestAttributesSequence"),
    "IMAGE": ("SOPClassUID", "SOPInstanceUID", "InstanceAvailability", "InstanceNumber",
              "Rows", "Columns", "BitsAllocated", "NumberOfFrames"),
}
_LEVEL_INDEX = {"STUDY": 1, "SERIES": 2, "IMAGE": 3}
#: Attributes QIDO-RS answers carry but that are no C-FIND keys: accepted in
#: ``includefield`` (always returned, or nothing to return) and refused as match keys.
_NOT_MATCHED = frozenset({"RetrieveURL", "TimezoneOffsetFromUTC"})
#: The DICOM JSON tag of the elements an answer drops: Query/Retrieve Level and Specific
#: Character Set belong to C-FIND; DICOM JSON is always UTF-8 (PS3.18 F.2).
_DROPPED = ("00080052", "00080005")
_RETRIEVE_URL = "00081190"
_UIDS = {"study": "0020000D", "series": "0020000E", "instance": "00080018"}


def _bad(message: str) -> HTTPException:
    return HTTPException(400, message)


def attribute_tag(name: str) -> int:
    """The tag an attribute ID names: a keyword or eight hex digits (PS3.18 8.3.4.1).

    Raises
    ------
    HTTPException
        400 for a name that is neither a dictionary keyword nor a known tag.
    """
    if len(name) == 8 and all(c in "0123456789abcdefABCDEF" for c in name):
        tag = int(name, 16)
        if keyword_for_tag(tag):
            return tag
        raise _bad(f"{name}: not a tag of the DICOM dictionary")
    found = tag_for_keyword(name)
    if found is None:
        raise _bad(f"{name}: not an attribute keyword or tag")
    return int(found)


def _vr(tag: int) -> str:
    return str(dictionary_VR(tag)).split(" or ")[0]


def _tag(keyword: str) -> int:
    return int(tag_for_keyword(keyword) or 0)


@dataclass
class Search:
    """A QIDO-RS request as C-FIND sees it: match keys, return keys and paging.

    ``keys`` maps an attribute path (tags, outermost first) to its value (``""``: a
    return key).
    """

    keys: dict[tuple[int, ...], str] = field(default_factory=dict)
    include: set[int] = field(default_factory=set)
    include_all: bool = False
    fuzzy: bool = False
    limit: int | None = None
    offset: int = 0


def _count(name: str, value: str) -> int:
    if not value.isdigit():
        raise _bad(f"{name}: {value!r} is not a non-negative integer")
    return int(value)


def parse_search(items: Sequence[tuple[str, str]]) -> Search:
    """The :class:`Search` of a request's query parameters (PS3.18 8.3.4).

    Raises
    ------
    HTTPException
        400 naming the parameter that is malformed, repeated, unknown or not a key.
    """
    search = Search()
    seen: set[str] = set()
    for name, value in items:
        if name in ("fuzzymatching", "limit", "offset") and name in seen:
            raise _bad(f"{name} is given more than once")
        seen.add(name)
        if name == "includefield":
            for item in (part.strip() for part in value.split(",")):
                if item == "all":
                    search.include_all = True
                elif item:
                    search.include.add(attribute_tag(item))
        elif name == "fuzzymatching":
            if value not in ("true", "false"):
                raise _bad(f"fuzzymatching must be true or false, not {value!r}")
            search.fuzzy = value == "true"
        elif name == "limit":
            search.limit = _count(name, value)
        elif name == "offset":
            search.offset = _count(name, value)
        else:
            path = tuple(attribute_tag(part) for part in name.split("."))
            keyword = keyword_for_tag(path[0])
            if keyword in NOT_KEYS or keyword in _NOT_MATCHED:
                raise _bad(f"{name} is not a query key")
            if any(_vr(tag) != "SQ" for tag in path[:-1]):
                raise _bad(f"{name}: only a sequence attribute may be followed by '.'")
            if path in search.keys:
                raise _bad(f"{name} is given more than once")
            if _vr(path[-1]) == "UI":
                value = "\\".join(part.strip() for part in value.split(","))
            search.keys[path] = value
    return search


def _level_keywords(levels: Sequence[str], include_all: bool) -> list[str]:
    """The default return keys of ``levels`` and, for ``all``, every key the archive answers."""
    keywords = [keyword for level in levels for keyword in DEFAULT_KEYS[level]]
    if include_all:
        indices = {_LEVEL_INDEX[level] for level in levels}
        for table in (SQL_KEYS, COMPUTED_KEYS, OTHER_KEY_LEVELS):
            for keyword, entry in table.items():
                index = entry[0] if isinstance(entry, tuple) else entry
                if max(int(index), 1) in indices:  # Study Root: patient keys are study keys
                    keywords.append(keyword)
    return keywords


def identifier(search: Search, level: str, fixed: dict[str, str],
               levels: Sequence[str]) -> Dataset:
    """The C-FIND identifier of a search at ``level`` (PS3.4 C.4.1.1.3).

    ``fixed`` holds the unique keys the resource path names (``/studies/{study}/series``);
    ``levels`` are the levels whose default attributes the answers carry (PS3.18 10.6.3.3).

    Raises
    ------
    HTTPException
        400 when a parameter repeats a key of the path or a value cannot be set.
    """
    ds = Dataset()
    try:
        for keyword in _level_keywords(levels, search.include_all):
            ds.add_new(_tag(keyword), _vr(_tag(keyword)), None)
        for tag in search.include:
            if keyword_for_tag(tag) not in _NOT_MATCHED and tag not in ds:
                ds.add_new(tag, _vr(tag), None)
        for path, value in search.keys.items():
            _set(ds, path, value)
    except HTTPException:
        raise
    except Exception as exc:  # pydicom refuses a value for its VR
        raise _bad(f"query value cannot be used: {exc}") from exc
    for keyword, uid in fixed.items():
        tag = _tag(keyword)
        if (tag,) in search.keys and search.keys[(tag,)] not in ("", uid):
            raise _bad(f"{keyword} differs from the resource's {uid}")
        ds.add_new(tag, "UI", uid)
    ds.QueryRetrieveLevel = level
    return ds


def _set(ds: Dataset, path: tuple[int, ...], value: str) -> None:
    """Set the key at ``path`` (a sequence key holds one item, PS3.4 C.2.2.2.6)."""
    tag, rest = path[0], path[1:]
    if not rest:
        ds.add_new(tag, _vr(tag), value if value != "" else None)
        return
    if tag not in ds or not ds[tag].value:
        ds.add_new(tag, "SQ", DicomSequence([Dataset()]))
    _set(ds[tag].value[0], rest, value)


def _strip_as_received(data: dict[str, Any]) -> dict[str, Any]:
    """DICOM JSON without the archive's private marker of raw elements (PS3.18 F.2)."""
    for element in data.values():
        element.pop(AS_RECEIVED_VR, None)
        for item in element.get("Value") or []:
            if isinstance(item, dict) and element.get("vr") == "SQ":
                _strip_as_received(item)
    return data


def answer_json(answer: Dataset, wado: str, level: str) -> dict[str, Any]:
    """One C-FIND answer as a QIDO-RS result object, with its Retrieve URL (PS3.18 10.6.3.3)."""
    data = _strip_as_received(header_json(answer))
    for tag in _DROPPED:
        data.pop(tag, None)
    url = f"{wado}/studies/{_first(data, _UIDS['study'])}"
    if level in ("SERIES", "IMAGE"):
        url += f"/series/{_first(data, _UIDS['series'])}"
    if level == "IMAGE":
        url += f"/instances/{_first(data, _UIDS['instance'])}"
    data[_RETRIEVE_URL] = {"vr": "UR", "Value": [url]}
    return dict(sorted(data.items()))


def _first(data: dict[str, Any], tag: str) -> str:
    values = (data.get(tag) or {}).get("Value") or [""]
    return str(values[0])


def wado_base(request: Request) -> str:
    """The DICOMweb base URL of Retrieve URLs (PS3.18 8.2).

    ``web.public_url`` when set (a server behind a reverse proxy); otherwise the scheme
    and the local address and port the request arrived on. The Host header is not
    used: a client may send it without the port (dicomweb-client 0.61 does), and it is
    the client's word.
    """
    public = str(context(request).config["web.public_url"]).rstrip("/")
    if public:
        return public + BASE_PATH
    server = request.scope.get("server") or ("127.0.0.1", 80)
    host, port = str(server[0]), server[1]
    host = f"[{host}]" if ":" in host else host
    return f"{request.url.scheme}://{host}:{port}{BASE_PATH}"


def check_accept(request: Request) -> None:
    """Refuse with 406 a request whose Accept takes no DICOM JSON (PS3.18 8.7.3)."""
    accept = request.headers.get("accept", "")
    if not accept.strip():
        return
    offered = {part.split(";")[0].strip().lower() for part in accept.split(",")}
    if not offered & _ACCEPTABLE:
        raise HTTPException(406, f"answers are {DICOM_JSON} only")


def path_uid(request: Request, name: str, what: str) -> str:
    """A UID of the resource path, validated (PS3.5 9.1) before it names anything."""
    try:
        return check_uid(request.path_params[name], what)
    except InvalidUidError as exc:
        raise _bad(exc.message) from exc


def search(request: Request, level: str, fixed: dict[str, str], levels: Sequence[str]) -> Response:
    """Answer one QIDO-RS search (after :func:`authorize`, on a worker thread)."""
    ctx = context(request)
    check_accept(request)
    query = parse_search(request.query_params.multi_items())
    ds = identifier(query, level, fixed, levels)
    principal = ctx.auth.principal(request)
    audit.web_query(principal.name if principal else "",
                    request.client.host if request.client else "", request.url.path,
                    request.url.query, ds)  # PS3.15 A.5.3.10 Query
    answers = ctx.service.find(level, ds, root="STUDY", retrieve_aet=ctx.aet)
    stop = None if query.limit is None else query.offset + query.limit + 1
    wado = wado_base(request)
    # At most limits.max_find_answers answers are read (the service bounds them), so a
    # too-broad search is a 413 before anything is sent; each is encoded as it comes.
    encoded = [json.dumps(answer_json(answer, wado, level), ensure_ascii=False).encode("utf-8")
               for answer in itertools.islice(answers, query.offset, stop)]
    headers: dict[str, str] = {}
    warnings = []
    if query.limit is not None and len(encoded) > query.limit:
        encoded = encoded[:query.limit]
        warnings.append(f"299 {wado}: There are additional results that can be requested.")
    if query.fuzzy:
        warnings.append(f"299 {wado}: The fuzzymatching parameter is not supported. "
                        "Only literal matching has been performed.")
    if warnings:
        headers["Warning"] = ", ".join(warnings)
    logger.info("QIDO-RS %s: %d answers", level, len(encoded))
    if not encoded:
        return Response(status_code=204, headers=headers)
    return StreamingResponse(_array(encoded), media_type=DICOM_JSON, headers=headers)


def _array(encoded: list[bytes]) -> Iterator[bytes]:
    """A JSON array of the encoded answers, in pieces of about 64 KiB."""
    piece = bytearray(b"[")
    for index, item in enumerate(encoded):
        if index:
            piece += b","
        piece += item
        if len(piece) >= 65536:
            yield bytes(piece)
            piece.clear()
    piece += b"]"
    yield bytes(piece)


def search_studies(request: Request) -> Response:
    """``GET /studies`` (PS3.18 10.6.1, Table 10.6.1-2): studies, study attributes."""
    authorize(request, "query")
    return search(request, "STUDY", {}, ("STUDY",))


def search_study_series(request: Request) -> Response:
    """``GET /studies/{study}/series``: the study's series, series attributes."""
    authorize(request, "query")
    study = path_uid(request, "study", "Study Instance UID")
    return search(request, "SERIES", {"StudyInstanceUID": study}, ("SERIES",))


def search_series(request: Request) -> Response:
    """``GET /series``: every series, with study and series attributes (PS3.18 10.6.3.3)."""
    authorize(request, "query")
    return search(request, "SERIES", {}, ("STUDY", "SERIES"))


def search_series_instances(request: Request) -> Response:
    """``GET /studies/{study}/series/{series}/instances``: instance attributes."""
    authorize(request, "query")
    study = path_uid(request, "study", "Study Instance UID")
    series = path_uid(request, "series", "Series Instance UID")
    return search(request, "IMAGE", {"StudyInstanceUID": study, "SeriesInstanceUID": series},
                  ("IMAGE",))


def search_study_instances(request: Request) -> Response:
    """``GET /studies/{study}/instances``: series and instance attributes."""
    authorize(request, "query")
    study = path_uid(request, "study", "Study Instance UID")
    return search(request, "IMAGE", {"StudyInstanceUID": study}, ("SERIES", "IMAGE"))


def search_instances(request: Request) -> Response:
    """``GET /instances``: study, series and instance attributes."""
    authorize(request, "query")
    return search(request, "IMAGE", {}, ("STUDY", "SERIES", "IMAGE"))


#: The QIDO-RS routes (PS3.18 Table 10.6.1-2). Plain functions: Starlette runs each on a
#: worker thread, so the archive's queries never block the event loop.
ROUTES: list[BaseRoute] = [
    Route(f"{BASE_PATH}/studies", search_studies, methods=["GET"], name="qido-studies"),
    Route(f"{BASE_PATH}/studies/{{study}}/series", search_study_series, methods=["GET"],
          name="qido-study-series"),
    Route(f"{BASE_PATH}/studies/{{study}}/series/{{series}}/instances", search_series_instances,
          methods=["GET"], name="qido-series-instances"),
    Route(f"{BASE_PATH}/studies/{{study}}/instances", search_study_instances, methods=["GET"],
          name="qido-study-instances"),
    Route(f"{BASE_PATH}/series", search_series, methods=["GET"], name="qido-series"),
    Route(f"{BASE_PATH}/instances", search_instances, methods=["GET"], name="qido-instances"),
]
