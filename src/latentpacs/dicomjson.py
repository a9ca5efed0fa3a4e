"""The archived header: a data set without Pixel Data as DICOM JSON (PS3.18 F.2), and back.

One place for the JSON the archive and the ``.lpz`` files keep: :func:`header_json`
writes it, keeping a malformed element byte for byte; :func:`dataset_from_json` reads it
back; :func:`first_value` reads one value. Only pydicom is imported, so the archive, the
image layer and the offline tools share it without pulling in SQL, torch or networking.
"""

from __future__ import annotations

import base64
import logging
from typing import Any

from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.tag import Tag

logger = logging.getLogger(__name__)


def first_value(header: dict[str, Any], tag: str) -> str:
    """The first value of ``tag`` in a DICOM JSON object as text, or ``""`` when absent.

    PN values (PS3.18 F.2.2) give their Alphabetic component group.
    """
    element = header.get(tag)
    if not element:
        return ""
    values = element.get("Value") or []
    if not values or values[0] is None:
        return ""
    value = values[0]
    if isinstance(value, dict):
        return str(value.get("Alphabetic", ""))
    return str(value)


#: Key of an archived raw element's JSON object holding the VR it arrived with.
AS_RECEIVED_VR = "latentpacsVR"


def dataset_from_json(data: dict[str, Any]) -> Dataset:
    """An archived DICOM JSON object (PS3.18 F.2) as a pydicom Dataset.

    Elements archived as received because their value did not convert (VR UN with
    InlineBinary and the VR they arrived with, see :func:`header_json`) are
    rebuilt as raw elements of that VR holding those bytes, so a retrieval writes them
    back exactly as received; pydicom's own JSON reader would re-type them by the
    dictionary and fail on the very value that made them raw.
    """
    kept: dict[str, Any] = {}
    raw: list[RawDataElement] = []
    sequences: dict[str, list[Dataset]] = {}
    for key, element in data.items():
        if element.get("vr") == "UN" and "InlineBinary" in element:
            value = base64.b64decode(element["InlineBinary"])
            vr = str(element.get(AS_RECEIVED_VR, "UN"))
            raw.append(RawDataElement(Tag(int(key, 16)), vr, len(value), value, 0, False, True))
        elif element.get("vr") == "SQ" and any(
            isinstance(item, dict) and _has_raw(item) for item in element.get("Value") or []
        ):
            sequences[key] = [dataset_from_json(item) for item in element["Value"]]
        else:
            kept[key] = element
    ds = Dataset.from_json(kept)
    for element in raw:
        ds[element.tag] = element  # kept raw: written back byte for byte, never converted
    for key, items in sequences.items():
        ds.add(DataElement(int(key, 16), "SQ", items))
    return ds


def _has_raw(data: dict[str, Any]) -> bool:
    """Whether a DICOM JSON object holds an element archived as raw UN bytes, at any depth."""
    for element in data.values():
        if element.get("vr") == "UN" and "InlineBinary" in element:
            return True
        if element.get("vr") == "SQ" and any(
            isinstance(item, dict) and _has_raw(item) for item in element.get("Value") or []
        ):
            return True
    return False


def header_json(ds: Dataset) -> dict[str, Any]:
    """The data set without Pixel Data as a DICOM JSON object (PS3.18 F.2).

    The header is kept as received: an element whose value pydicom cannot convert (an IS
    of ``abc``, a DS of ``x.y``), at any depth, is kept byte for byte as VR UN with its
    raw value (PS3.5 6.2.2), never dropped and never a reason to refuse the image.
    :func:`dataset_from_json` reads it back.
    """
    fast = _json_object(ds, top=True, checked=False)
    try:
        Dataset.from_json(fast)  # what every retrieval does with it
    except Exception:
        return _json_object(ds, top=True, checked=True)
    return fast


#: Pixel Data, Float Pixel Data and Double Float Pixel Data (PS3.3 C.7.6.3, C.7.6.24).
_PIXEL_TAGS = frozenset({0x7FE00010, 0x7FE00008, 0x7FE00009})


def _json_object(ds: Dataset, *, top: bool = False, checked: bool = True) -> dict[str, Any]:
    """DICOM JSON of a data set; ``checked``: each element is read back to prove it loads."""
    result: dict[str, Any] = {}
    for tag in ds.keys():
        if top and (tag in _PIXEL_TAGS or tag.group == 0x0002):
            continue
        result[f"{tag:08X}"] = _element_json(ds, tag, checked)
    return result


def _element_json(ds: Dataset, tag: Any, checked: bool) -> dict[str, Any]:
    """One element as DICOM JSON; a value that does not convert becomes UN InlineBinary."""
    key = f"{tag:08X}"
    try:
        element = ds[tag]
        if element.VR == "SQ":
            return {"vr": "SQ", "Value": [_json_object(item, checked=checked)
                                          for item in element.value]}
        converted = element.to_json_dict(None, 1 << 62)
        if checked:
            Dataset.from_json({key: converted})
        return converted
    except Exception:
        raw = ds.get_item(tag)
        value = getattr(raw, "value", b"")
        data = value if isinstance(value, bytes | bytearray) else str(value).encode("latin-1", "replace")
        logger.warning("element %s is malformed; kept as received", tag)
        return {"vr": "UN", "InlineBinary": base64.b64encode(bytes(data)).decode("ascii"),
                AS_RECEIVED_VR: str(getattr(raw, "VR", "UN"))}
