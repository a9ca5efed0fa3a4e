"""C-FIND attribute matching (PS3.4 C.2.2.2), in SQL and in Python.

A request key becomes a :class:`KeyMatch`: a tuple of alternative :class:`Term` objects
(an entity matches when any term matches any of its values) or no term at all for
universal matching (C.2.2.2.3: zero-length value, or ``*`` alone). Choices made here:

* Single value matching (C.2.2.2.1) is exact and case-sensitive, except for PN: the
  standard lets PN matching ignore case, and this archive does (upper-cased on both
  sides); only the Alphabetic component group is compared.
* Wildcards ``*`` and ``?`` (C.2.2.2.4) apply to AE, CS, LO, LT, PN, SH, ST, UC, UR, UT;
  in SQL they become ``LIKE`` with ``\\`` escaping, so ``%`` and ``_`` stay literal. A UI
  key with a wildcard is invalid; ``*`` alone is universal for every VR.
* Range matching (C.2.2.2.5) on DA, TM and DT: ``a-b``, ``-b``, ``a-``; bounds may be
  partial ("2020-" is from 2020 on, "-2020" up to the end of 2020). DT time zone offsets
  are ignored, so a ``-`` in a DT key always means a range. Date and time keys match
  independently (combined datetime matching needs extended negotiation).
* List of UID matching (C.2.2.2.2): backslash-separated UIDs. Several values of another
  VR are alternatives too (e.g. ModalitiesInStudy ``MG\\CT``).
* Empty value matching: ``""`` matches entities whose value is empty or absent.
* Multi-valued stored attributes match when any of their values matches.
* Sequence and binary keys are never matched (return keys only).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from pydicom.dataelem import DataElement
from sqlalchemy import ColumnElement, and_, false, or_

from latentpacs.errors import InvalidIdentifierError

WILDCARD_VRS = frozenset({"AE", "CS", "LO", "LT", "PN", "SH", "ST", "UC", "UR", "UT"})
RANGE_VRS = frozenset({"DA", "TM", "DT"})
NUMERIC_VRS = frozenset({"IS", "DS", "FL", "FD", "SL", "SS", "UL", "US", "SV", "UV"})
NOT_MATCHABLE_VRS = frozenset({"SQ", "OB", "OD", "OF", "OL", "OV", "OW", "UN"})


class Kind(StrEnum):
    """The matching type of one term (PS3.4 C.2.2.2)."""

    SINGLE = "single"
    WILDCARD = "wildcard"
    RANGE = "range"
    EMPTY = "empty"


@dataclass(frozen=True)
class Term:
    """One alternative of a key: a value, a wildcard pattern, a range or "empty"."""

    kind: Kind
    value: str = ""
    low: str = ""
    high: str = ""


def normalise(vr: str, text: str, *, pad: str = "0") -> str:
    """A value in the form the archive compares and indexes.

    DA becomes ``YYYYMMDD``, TM ``HHMMSS.FFFFFF`` and DT ``YYYYMMDDHHMMSS.FFFFFF``
    (PS3.5 6.2; partial values padded with ``pad``, "0" for values and lower bounds,
    "9" for upper bounds; old ``.``/``:`` separators and DT offsets dropped). PN becomes
    its Alphabetic group upper-cased. Anything else is stripped of surrounding spaces.
    """
    text = text.strip()
    if not text:
        return ""
    if vr == "PN":
        return text.split("=")[0].upper()
    if vr == "DA":
        return re.sub(r"[^0-9]", "", text).ljust(8, pad)[:8]
    if vr in ("TM", "DT"):
        digits = 6 if vr == "TM" else 14
        found = re.match(r"([0-9]*)(?:\.([0-9]*))?", text.replace(":", ""))
        whole = found.group(1) if found else ""
        fraction = (found.group(2) if found else None) or ""
        return f"{whole.ljust(digits, pad)[:digits]}.{fraction.ljust(6, pad)[:6]}"
    return text


def element_values(element: DataElement) -> list[str]:
    """The values of a request key as text (PN in its full string form)."""
    value = element.value
    if value is None or value == "":
        return []
    if element.VM > 1:
        return ["" if item is None else str(item) for item in value]
    return [str(value)]


def json_values(element: dict[str, Any] | None, vr: str) -> list[str]:
    """The values of a DICOM JSON element (PS3.18 F.2) normalised for comparison."""
    if not element:
        return []
    texts: list[str] = []
    for item in element.get("Value") or []:
        if isinstance(item, dict):
            texts.append(str(item.get("Alphabetic", "")))
        elif item is not None:
            texts.append(str(item))
    return [normalise(vr, text) for text in texts if str(text).strip()]


@dataclass(frozen=True)
class KeyMatch:
    """The matching a request key asks for; no terms means universal matching."""

    keyword: str
    vr: str
    terms: tuple[Term, ...]

    @property
    def universal(self) -> bool:
        """True when every entity matches (PS3.4 C.2.2.2.3)."""
        return not self.terms

    @classmethod
    def parse(cls, element: DataElement) -> KeyMatch:
        """Read a request key; raises InvalidIdentifierError for values no rule accepts."""
        keyword = element.keyword or str(element.tag)
        vr = element.VR
        if vr in NOT_MATCHABLE_VRS:
            return cls(keyword, vr, ())
        values = element_values(element)
        if values == ['""']:
            return cls(keyword, vr, (Term(Kind.EMPTY),))
        values = [value.strip() for value in values if value.strip()]
        if not values or values == ["*"]:
            return cls(keyword, vr, ())
        return cls(keyword, vr, tuple(_term(keyword, vr, value) for value in values))

    def sql(self, column: Any) -> ColumnElement[bool] | None:
        """The SQL condition on an indexed column holding normalised values; None if universal."""
        if self.universal:
            return None
        integer = self.vr == "IS"
        conditions = [_term_sql(term, column, integer, self.keyword) for term in self.terms]
        return or_(*conditions) if len(conditions) > 1 else conditions[0]

    def matches(self, stored: list[str]) -> bool:
        """Whether an entity with these (normalised) values matches."""
        return self.universal or any(_term_matches(term, stored, self.vr) for term in self.terms)


def _term(keyword: str, vr: str, value: str) -> Term:
    has_wildcard = "*" in value or "?" in value
    if vr == "UI" and has_wildcard:
        raise InvalidIdentifierError(f"{keyword}: wildcards are not allowed in a UID key")
    if vr in RANGE_VRS and "-" in value:
        low, _, high = value.partition("-")
        return Term(
            Kind.RANGE,
            low=normalise(vr, low) if low.strip() else "",
            high=normalise(vr, high, pad="9") if high.strip() else "",
        )
    if vr in WILDCARD_VRS and has_wildcard:
        return Term(Kind.WILDCARD, value=normalise(vr, value))
    if vr == "IS":
        try:
            int(value)
        except ValueError:
            raise InvalidIdentifierError(f"{keyword}: {value!r} is not an integer string") from None
    return Term(Kind.SINGLE, value=normalise(vr, value))


def like_pattern(pattern: str) -> str:
    """A DICOM wildcard pattern as a SQL LIKE pattern escaped with backslash."""
    escaped = pattern.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return escaped.replace("*", "%").replace("?", "_")


def _term_sql(term: Term, column: Any, integer: bool, keyword: str) -> ColumnElement[bool]:
    if term.kind is Kind.EMPTY:
        return column.is_(None) if integer else column == ""
    if term.kind is Kind.WILDCARD:
        return column.like(like_pattern(term.value), escape="\\")
    if term.kind is Kind.RANGE:
        bounds = [column != ""]
        if term.low:
            bounds.append(column >= term.low)
        if term.high:
            bounds.append(column <= term.high)
        return and_(*bounds)
    if integer:
        return column == int(term.value)
    return column == term.value if term.value else false()


def _term_matches(term: Term, stored: list[str], vr: str) -> bool:
    if term.kind is Kind.EMPTY:
        return not stored
    if term.kind is Kind.WILDCARD:
        regex = re.compile(
            "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in term.value),
            re.DOTALL,
        )
        return any(regex.fullmatch(value) for value in stored)
    if term.kind is Kind.RANGE:
        return any(
            (not term.low or value >= term.low) and (not term.high or value <= term.high)
            for value in stored
        )
    if vr in NUMERIC_VRS:
        return any(_same_number(value, term.value) for value in stored)
    return term.value in stored


def _same_number(left: str, right: str) -> bool:
    try:
        return float(left) == float(right)
    except ValueError:
        return left == right
