"""The ``multipart/related`` answer of WADO-RS (RFC 2387, PS3.18 8.7.3.3.2), written as a stream.

Each part is ``--BOUNDARY``, its headers (Content-Type with the part's transfer syntax,
optionally Content-Location), a blank line and its bytes; the body ends with
``--BOUNDARY--``. Parts are produced one at a time by the caller's iterator, so an answer
never holds more than the part being written.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

CRLF = b"\r\n"


@dataclass(frozen=True)
class Part:
    """One body part: its Content-Type value, its bytes and optionally its location."""

    content_type: str
    body: bytes
    location: str | None = None


def new_boundary() -> str:
    """A boundary (RFC 2046 5.1.1) that cannot occur by chance in binary content."""
    return "latentpacs-" + secrets.token_hex(16)


def content_type(part_type: str, boundary: str, *, transfer_syntax: str | None = None) -> str:
    """The answer's Content-Type: ``multipart/related; type="..."; boundary=...``."""
    value = f'multipart/related; type="{part_type}"'
    if transfer_syntax is not None:
        value += f"; transfer-syntax={transfer_syntax}"
    return value + f"; boundary={boundary}"


def part_header(part: Part, boundary: str) -> bytes:
    """The delimiter line and headers of ``part``, up to and including the blank line."""
    lines = [f"--{boundary}", f"Content-Type: {part.content_type}"]
    if part.location is not None:
        lines.append(f"Content-Location: {part.location}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("ascii")


def stream(parts: Iterable[Part], boundary: str) -> Iterator[bytes]:
    """The body of a multipart answer, chunk by chunk, one part produced at a time."""
    for part in parts:
        yield part_header(part, boundary) + part.body + CRLF
    yield f"--{boundary}--\r\n".encode("ascii")
