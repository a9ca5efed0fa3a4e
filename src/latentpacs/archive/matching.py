"""C-FIND attribute matching (PS3.4 C.2.2.2), in SQL and in Python.

A request key becomes a :class:`KeyMatch`: a tuple of alternative :class:`Term` objects
(an entity matches when any term matches any of its values) or no term at all for
universal matching (C.2.2.2.3: zero-length value, or ``*`` alone). Choices made here:

* Single value matching (C.2.2.2.1) is exact and case-sensitive, except for PN: the
  standard lets PN matching ignore case, and this archive does (upper-cased on both
  sides); only the Alphabetic component group is compared.
* Wildcards ``*`` and ``?`` (C.2.2.2.4) apply to AE, CS, LO, LT, PN, SH, ST, UC, UR, UT;
  in SQL they become ``LIKE`` with ``\\`` escaping, so ``%`` and ``_`` stay literal. A UI
  key with a wildcard is invalid; ``*`` alone is universal for every VR. In Python they
  are matched by :func:`glob_match`, a greedy two-pointer matcher that takes at most
  ``(len(pattern) + 1) * (len(value) + 2)`` steps whatever the pattern: no backtracking
  regular expression, so ``*a*a*a*...*b`` against a long value cannot stall the node.
* Range matching (C.2.2.2.5) on DA, TM and DT: ``a-b``, ``-b``, ``a-``; bounds may be
  partial ("2020-" is from 2020 on, "-2020" up to the end of 2020). DT time zone offsets
  are ignored, so a ``-`` in a DT key always means a range. Date and time keys match
  independently (combined datetime matching needs extended negotiation).
* List of UID matching (C.2.2.2.2): backslash-separated UIDs. Several values of another
  VR are alternatives too (e.g. ModalitiesInStudy ``MG\\CT``).
* Empty value matching: ``""`` matches entities whose value is empty or absent.
* Multi-valued stored attributes match when any of their values matches.
* Sequence matching (C.2.2.2.6): a sequence key holds zero items or one item. Zero items,
  or an item whose keys are all universal, matches every entity and returns its stored
  sequence (projected onto the item's keys, if any). An item with matching keys matches
  an entity when at least one stored item matches every key (recursively for nested
  sequences), and only the matching items are returned. A sequence key of two or more
  items is refused (InvalidIdentifierError). Matching runs on the stored header's DICOM
  JSON, never in SQL.
* Binary keys (OB, OW, UN, ...) are never matched (return keys only).
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
NOT_MATCHABLE_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "UN"})


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
class ItemKey:
    """One key inside the item of a sequence key (PS3.4 C.2.2.2.6)."""

    tag: str  #: DICOM JSON tag (PS3.18 F.2.1.1), e.g. "00081150"
    match: KeyMatch


@dataclass(frozen=True)
class KeyMatch:
    """The matching a request key asks for; no terms means universal matching.

    A sequence key (VR SQ) has no terms; ``item`` holds the keys of its one item, or is
    None when the request sequence has no item.
    """

    keyword: str
    vr: str
    terms: tuple[Term, ...]
    item: tuple[ItemKey, ...] | None = None

    @property
    def universal(self) -> bool:
        """True when every entity matches (PS3.4 C.2.2.2.3; C.2.2.2.6 for sequences)."""
        if self.item is not None:
            return all(key.match.universal for key in self.item)
        return not self.terms

    @classmethod
    def parse(cls, element: DataElement) -> KeyMatch:
        """Read a request key; raises InvalidIdentifierError for values no rule accepts."""
        keyword = element.keyword or str(element.tag)
        vr = element.VR
        if vr == "SQ":
            return cls._parse_sequence(keyword, element)
        if vr in NOT_MATCHABLE_VRS:
            return cls(keyword, vr, ())
        values = element_values(element)
        if values == ['""']:
            return cls(keyword, vr, (Term(Kind.EMPTY),))
        values = [value.strip() for value in values if value.strip()]
        if not values or values == ["*"]:
            return cls(keyword, vr, ())
        return cls(keyword, vr, tuple(_term(keyword, vr, value) for value in values))

    @classmethod
    def _parse_sequence(cls, keyword: str, element: DataElement) -> KeyMatch:
        items = list(element.value or [])
        if not items:
            return cls(keyword, "SQ", ())
        if len(items) > 1:
            raise InvalidIdentifierError(
                f"{keyword}: a sequence key holds one item, not {len(items)} (PS3.4 C.2.2.2.6)")
        keys = tuple(ItemKey(f"{sub.tag:08X}", cls.parse(sub)) for sub in items[0]
                     if sub.tag.group >= 0x0008 and sub.keyword != "SpecificCharacterSet")
        return cls(keyword, "SQ", (), keys)

    def matching_items(self, stored: dict[str, Any] | None) -> list[dict[str, Any]] | None:
        """The items of a stored sequence (DICOM JSON element) this sequence key matches.

        Returns None when the entity does not match: the key has matching keys and no
        stored item matches all of them (PS3.4 C.2.2.2.6).
        """
        items = [item for item in ((stored or {}).get("Value") or []) if isinstance(item, dict)]
        if self.universal:
            return items
        found = [item for item in items if all(_item_key_matches(key, item)
                                               for key in self.item or ())]
        return found or None

    def answer(self, stored: dict[str, Any] | None) -> dict[str, Any]:
        """The DICOM JSON element a C-FIND answer carries for this sequence key.

        The matching stored items, each reduced to the item's keys (a key the item lacks
        comes back zero-length); the whole stored sequence when the request had no item
        or an empty one.
        """
        items = self.matching_items(stored) or []
        if not self.item:
            return {"vr": "SQ", "Value": items} if items else {"vr": "SQ"}
        answered = [{key.tag: _item_answer(key, item) for key in self.item} for item in items]
        return {"vr": "SQ", "Value": answered} if answered else {"vr": "SQ"}

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


def _item_key_matches(key: ItemKey, item: dict[str, Any]) -> bool:
    if key.match.vr == "SQ":
        return key.match.matching_items(item.get(key.tag)) is not None
    return key.match.matches(json_values(item.get(key.tag), key.match.vr))


def _item_answer(key: ItemKey, item: dict[str, Any]) -> dict[str, Any]:
    if key.match.vr == "SQ":
        return key.match.answer(item.get(key.tag))
    return item.get(key.tag) or {"vr": key.match.vr}


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
        return any(glob_match(term.value, value) for value in stored)
    if term.kind is Kind.RANGE:
        return any(
            (not term.low or value >= term.low) and (not term.high or value <= term.high)
            for value in stored
        )
    if vr in NUMERIC_VRS:
        return any(_same_number(value, term.value) for value in stored)
    return term.value in stored


def glob_steps(pattern: str, text: str) -> tuple[bool, int]:
    """Whether ``text`` matches the DICOM wildcard ``pattern`` (PS3.4 C.2.2.2.4), and the steps taken.

    ``*`` matches any run of characters (also none), ``?`` exactly one. Greedy two-pointer
    matching: after a mismatch it resumes just past the most recent ``*``, one character
    further into ``text``; an earlier ``*`` never needs revisiting, because the later one
    can absorb whatever the earlier one would have. Each step advances through ``text``
    or restarts the rest of ``pattern`` one position on: at most ``len(text)`` restarts,
    each followed by at most ``len(pattern) + 1`` steps, so at most
    ``(len(pattern) + 1) * (len(text) + 2)`` steps in all: no exponential backtracking.
    """
    p = t = steps = 0
    star, resume = -1, 0
    while t < len(text):
        steps += 1
        if p < len(pattern) and pattern[p] == "*":
            star, resume = p, t
            p += 1
        elif p < len(pattern) and pattern[p] in ("?", text[t]):
            p += 1
            t += 1
        elif star >= 0:
            resume += 1
            p, t = star + 1, resume
        else:
            return False, steps
    while p < len(pattern) and pattern[p] == "*":
        steps += 1
        p += 1
    return p == len(pattern), steps


def glob_match(pattern: str, text: str) -> bool:
    """Whether ``text`` matches the DICOM wildcard ``pattern``; linear-time per restart, see :func:`glob_steps`."""
    return glob_steps(pattern, text)[0]


def _same_number(left: str, right: str) -> bool:
    try:
        return float(left) == float(right)
    except ValueError:
        return left == right
