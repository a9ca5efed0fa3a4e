"""Unique identifiers (PS3.5 Section 9): validation before a UID names a row or a file.

A UID is a string of numeric components separated by ``.`` (PS3.5 9.1): digits only,
no empty component, at most 64 characters. PS3.5 9.1 also forbids a leading zero in a
component of more than one digit; legacy modalities break that rule and such a UID is
harmless as a file name, so it is accepted. Every UID the archive files an object under (SOP Instance, Series Instance,
Study Instance and SOP Class UID) is checked with :func:`check_uid` on arrival, and file
names are built only by :func:`uid_file_name`, which checks again, so a peer's
``../../x`` or ``/etc/passwd`` can never become a path.

Every UID latentpacs makes itself (derived instances and series, the Implementation
Class UID, phantom and miniature CBIS-DDSM identities) comes from :func:`uid_from_name`:
a ``2.25.`` UID from a name-based UUID (PS3.5 B.2), so the same name always gives the
same UID.
"""

from __future__ import annotations

import re
import uuid

from latentpacs.errors import InvalidUidError

#: PS3.5 9.1: non-empty components of digits separated by dots.
_UID = re.compile(r"[0-9]+(?:\.[0-9]+)*")
#: PS3.5 9.1: a UID is at most 64 characters.
MAX_UID_LENGTH = 64


def is_valid_uid(text: str) -> bool:
    """Whether ``text`` is a UID by the rules of PS3.5 9.1."""
    return len(text) <= MAX_UID_LENGTH and _UID.fullmatch(text) is not None


def check_uid(text: object, name: str) -> str:
    """Return ``text`` as a UID after validating it (PS3.5 9.1).

    Parameters
    ----------
    text:
        The value as received (trailing NUL padding, PS3.5 6.2, is removed).
    name:
        The attribute it came from, for the message, e.g. ``"SOP Instance UID (0008,0018)"``.

    Raises
    ------
    InvalidUidError
        When the value is empty, longer than 64 characters or not digits and dots.
    """
    value = str(text if text is not None else "").rstrip("\x00").strip()
    if not value:
        raise InvalidUidError(f"{name} is missing")
    if len(value) > MAX_UID_LENGTH:
        raise InvalidUidError(f"{name} is {len(value)} characters long; a UID has at most 64")
    if _UID.fullmatch(value) is None:
        shown = value if value.isprintable() and len(value) <= 24 else repr(value[:24])
        raise InvalidUidError(f"{name} {shown} is not a UID (digits and dots, PS3.5 9.1)")
    return value


def uid_file_name(uid: str, suffix: str) -> str:
    """A file name ``<uid><suffix>`` for a validated UID; never a path with a separator.

    Raises
    ------
    InvalidUidError
        When ``uid`` is not a valid UID.
    """
    return check_uid(uid, "file name UID") + suffix


def uid_from_name(namespace: uuid.UUID, *parts: object, separator: str = "/") -> str:
    """The ``2.25.`` UID of the name-based (SHA-1, version 5) UUID of ``parts`` (PS3.5 B.2).

    The name is ``separator.join(str(part) for part in parts)``. Callers never change
    their namespace, parts or separator: UIDs already handed out depend on them.

    Parameters
    ----------
    namespace:
        The caller's fixed UUID namespace (RFC 4122 4.3), one per kind of UID.
    *parts:
        What distinguishes this UID, e.g. role, original UID, model SHA-256, tier.
    separator:
        Joins the parts into the name.

    Returns
    -------
    str
        ``2.25.<the UUID as a decimal integer>``: at most 44 characters (PS3.5 9.1).
    """
    return f"2.25.{uuid.uuid5(namespace, separator.join(map(str, parts))).int}"
