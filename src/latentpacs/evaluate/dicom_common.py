"""What the evaluator's DICOM objects share: identity, equipment and the private codes.

The structured reports (:mod:`~latentpacs.evaluate.sr`) and the difference maps
(:mod:`~latentpacs.evaluate.dicom_maps`) are new instances in the evaluated images' own
studies. Their UIDs come from :func:`latentpacs.uid.uid_from_name` (PS3.5 B.2) under the
fixed namespace :data:`EVALUATION_UID_NAMESPACE`, from the evaluated image's UID and a
digest of what the object says (:func:`content_digest`): re-running the same evaluation
gives the same UIDs, and an evaluation that measured something else never reuses them
("one derived UID, one content").

Concepts that no standard code names (the paper's measures, the efficiency figure, the
difference map's quantity) use the private coding scheme :data:`CODING_SCHEME` ("99"
designators are reserved for private schemes, PS3.16 Section 8); every object that uses it
declares it in its Coding Scheme Identification Sequence (PS3.3 C.12.1.1.2).
"""

from __future__ import annotations

import copy
import hashlib
import json
import uuid
from collections.abc import Iterable

from pydicom.dataset import Dataset

from latentpacs import __version__
from latentpacs.uid import uid_from_name

#: Namespace of the evaluation objects' name-based UUIDs. Never change it: UIDs already
#: written depend on it.
EVALUATION_UID_NAMESPACE = uuid.UUID("68211c8c-abb4-4005-8aab-42494d5eaf98")

#: Coding Scheme Designator of latentpacs' own codes (PS3.16 Section 8: "99" = private).
CODING_SCHEME = "99LATENTPACS"
CODING_SCHEME_NAME = "latentpacs evaluation concepts"
CODING_SCHEME_RESPONSIBLE = "latentpacs project"

MANUFACTURER = "latentpacs"
MODEL_NAME = "latentpacs evaluate"
SOFTWARE_VERSION = __version__
#: Device Serial Number (Type 1 in the Enhanced General Equipment module); software has none.
DEVICE_SERIAL_NUMBER = f"latentpacs-{__version__}"

_PIXEL_DATA = 0x7FE00010


def evaluation_uid(role: str, *parts: object) -> str:
    """The deterministic ``2.25.`` UID of an evaluation object (PS3.5 B.2).

    Parameters
    ----------
    role:
        What the UID names (``"sr-sop"``, ``"map-series"``...), so two kinds never collide.
    *parts:
        The evaluated entity's UID and the digest of the content.
    """
    return uid_from_name(EVALUATION_UID_NAMESPACE, role, *parts, separator="|")


def content_digest(items: Iterable[object]) -> str:
    """SHA-256 (hex) of the JSON of ``items``: what an object says, independent of paths."""
    text = json.dumps(list(items), sort_keys=True, default=repr, allow_nan=True)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def header_of(ds: Dataset) -> Dataset:
    """A copy of ``ds`` without Pixel Data: what the evaluation objects reference and inherit."""
    header = Dataset()
    for element in ds:
        if element.tag != _PIXEL_DATA:
            header.add(copy.deepcopy(element))
    return header


def coding_scheme_item() -> Dataset:
    """The Coding Scheme Identification Sequence item declaring :data:`CODING_SCHEME` (PS3.3 C.12.1.1.2)."""
    item = Dataset()
    item.CodingSchemeDesignator = CODING_SCHEME
    item.CodingSchemeName = CODING_SCHEME_NAME
    item.CodingSchemeResponsibleOrganization = CODING_SCHEME_RESPONSIBLE
    return item


def declare_private_scheme(ds: Dataset) -> None:
    """Add the :data:`CODING_SCHEME` item to ``ds``'s Coding Scheme Identification Sequence."""
    items = list(ds.get("CodingSchemeIdentificationSequence", []))
    if not any(item.CodingSchemeDesignator == CODING_SCHEME for item in items):
        items.append(coding_scheme_item())
    ds.CodingSchemeIdentificationSequence = items
