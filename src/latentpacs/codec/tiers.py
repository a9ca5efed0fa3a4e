"""Fidelity tiers: what the archive keeps beside the latent and what a retrieval returns.

=================  =================================  =====================================
tier               stored                              returned
=================  =================================  =====================================
``latent``         latent only                         decoded reconstruction (lossy)
``near-lossless:K``  latent + JPEG-LS stream, NEAR=K    every pixel within K of the original
``lossless``       latent + JPEG-LS stream, NEAR=0     the original stored values, bit for bit
=================  =================================  =====================================

The bounded and exact streams code the stored values themselves, never a difference
from the network output: floating-point inference is not reproducible across devices
and thread counts, so an exactness guarantee must not depend on it.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from latentpacs.errors import TierError

#: Largest NEAR parameter accepted for ``near-lossless:K`` (JPEG-LS allows up to 255 here).
MAX_NEAR = 255


#: The reserved stream coder name of an image archived as received: its stream is the
#: PS3.10 file the node got, kept until the background coder has written and verified
#: the tier's stream (:mod:`latentpacs.deferred`). No stream coder has this name; the
#: image layer reads such a stream as DICOM. It lives here, beside the tier grammar,
#: because the archive may import this module and no other of the codec.
RECEIVED = "received"


class TierKind(StrEnum):
    """The three kinds of fidelity tier (DESIGN.md "Fidelity tiers").

    A StrEnum: each member equals its plain string (``TierKind.LATENT == "latent"``), so
    archived rows and JSON written before it read the same.
    """

    LATENT = "latent"
    NEAR_LOSSLESS = "near-lossless"
    LOSSLESS = "lossless"


@dataclass(frozen=True, init=False)
class Tier:
    """A fidelity tier.

    Parameters
    ----------
    name:
        The kind of tier; a plain string is converted (``"latent"``, ``"near-lossless"``
        or ``"lossless"``).
    near:
        The maximum absolute error in stored pixel values for ``near-lossless``; 0 otherwise.
    """

    name: TierKind
    near: int = 0

    def __init__(self, name: TierKind | str, near: int = 0) -> None:
        """Build a tier, converting a plain-string ``name`` to its :class:`TierKind`.

        Raises
        ------
        TierError
            When ``name`` is no tier kind.
        """
        try:
            kind = TierKind(name)
        except ValueError:
            raise TierError(f"unknown tier kind {name!r}: use latent, lossless or near-lossless") from None
        object.__setattr__(self, "name", kind)
        object.__setattr__(self, "near", near)

    @classmethod
    def parse(cls, text: str) -> Tier:
        """Parse ``latent``, ``lossless`` or ``near-lossless:K`` (K an integer from 1 to 255).

        Raises
        ------
        TierError
            When the text names no tier or K is out of range.
        """
        value = text.strip().lower()
        if value == "latent":
            return cls(TierKind.LATENT)
        if value == "lossless":
            return cls(TierKind.LOSSLESS)
        if value.startswith("near-lossless:"):
            raw = value.split(":", 1)[1]
            if not raw.isdigit() or not 1 <= int(raw) <= MAX_NEAR:
                raise TierError(
                    f"tier {text!r}: K in near-lossless:K must be an integer from 1 to {MAX_NEAR}"
                )
            return cls(TierKind.NEAR_LOSSLESS, int(raw))
        raise TierError(f"unknown tier {text!r}: use latent, lossless or near-lossless:K")

    def __str__(self) -> str:
        if self.name is TierKind.NEAR_LOSSLESS:
            return f"near-lossless:{self.near}"
        return self.name.value

    @property
    def lossy(self) -> bool:
        """True when the returned pixels may differ from the original (PS3.3 C.7.6.1.1.5)."""
        return self.name is not TierKind.LOSSLESS

    @property
    def has_stream(self) -> bool:
        """True when a JPEG-LS stream is archived beside the latent."""
        return self.name is not TierKind.LATENT
