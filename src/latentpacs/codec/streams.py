"""Stream coders: the exact and bounded streams of the fidelity tiers, behind one interface.

A stream codes an image's stored values themselves (never a difference from the network
output). Every archived stream names its coder and the coder's format version (DESIGN.md
"Contracts"), so a new coder (a learned one, say) can sit beside JPEG-LS while every
stream already archived stays decodable by the coder it names.

A coder has a ``name``, a format ``version`` and three operations:

``encode(stored, bits, near) -> bytes``
    Code unsigned values of ``bits`` bits (1 to 16); every value comes back within
    ``near`` (0: exact).
``decode(data) -> numpy.ndarray``
    uint16 values (rows, cols) of a stream this coder wrote.
``precision(data) -> int``
    The sample precision the stream was coded at.

``sends_as`` names the DICOM transfer syntaxes (PS3.5 A.4) whose encapsulated Pixel Data
is the stream itself, for NEAR = 0 and NEAR > 0, or None when the stream must be decoded
before it is sent.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

from latentpacs.codec import jpegls
from latentpacs.errors import ConfigError

#: The coder new images get unless ``codec.coder`` says otherwise.
DEFAULT_CODER = "jpeg-ls"


class StreamCoder(Protocol):
    """What every stream coder provides (see the module docstring)."""

    @property
    def name(self) -> str:
        """The coder's name, archived with every stream it wrote."""

    @property
    def version(self) -> int:
        """The stream format version, archived with every stream."""

    @property
    def sends_as(self) -> tuple[str, str] | None:
        """(lossless, near-lossless) Transfer Syntax UIDs carrying the stream as it is."""

    def encode(self, stored: np.ndarray, bits: int, near: int) -> bytes:
        """Code ``stored`` (unsigned, below 2**bits) with every value within ``near``."""

    def decode(self, data: bytes) -> np.ndarray:
        """The uint16 values (rows, cols) of a stream this coder wrote."""

    def precision(self, data: bytes) -> int:
        """The sample precision the stream was coded at."""


@dataclass(frozen=True)
class JpegLsCoder:
    """JPEG-LS (ISO/IEC 14495-1) via CharLS: the interchange format DICOM carries (PS3.5 A.4.3)."""

    name: str = "jpeg-ls"
    version: int = 1
    sends_as: tuple[str, str] | None = ("1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.81")

    def encode(self, stored: np.ndarray, bits: int, near: int) -> bytes:
        """See :func:`latentpacs.codec.jpegls.encode_stream`."""
        return jpegls.encode_stream(stored, bits, near)

    def decode(self, data: bytes) -> np.ndarray:
        """See :func:`latentpacs.codec.jpegls.decode_stream`."""
        return jpegls.decode_stream(data)

    def precision(self, data: bytes) -> int:
        """See :func:`latentpacs.codec.jpegls.stream_precision`."""
        return jpegls.stream_precision(data)


def _learned() -> StreamCoder:
    from latentpacs.codec.learned import LearnedCoder

    return LearnedCoder()


#: Every coder by name, each at the versions it decodes.
CODERS: dict[str, StreamCoder] = {"jpeg-ls": JpegLsCoder(), "learned": _learned()}


def get_coder(name: str, version: int | None = None) -> StreamCoder:
    """The coder called ``name`` (able to decode ``version``, when given).

    Raises
    ------
    ConfigError
        When no coder has that name or version.
    """
    coder = CODERS.get(name)
    if coder is None:
        raise ConfigError(f"unknown stream coder {name!r}: use {', '.join(sorted(CODERS))}")
    if version is not None and version != coder.version:
        raise ConfigError(f"stream coder {name} has version {coder.version}, not {version}")
    return coder
