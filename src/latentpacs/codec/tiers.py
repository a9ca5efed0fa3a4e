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

from latentpacs.errors import TierError

#: Largest NEAR parameter accepted for ``near-lossless:K`` (JPEG-LS allows up to 255 here).
MAX_NEAR = 255


@dataclass(frozen=True)
class Tier:
    """A fidelity tier.

    Parameters
    ----------
    name:
        ``"latent"``, ``"near-lossless"`` or ``"lossless"``.
    near:
        The maximum absolute error in stored pixel values for ``near-lossless``; 0 otherwise.
    """

    name: str
    near: int = 0

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
            return cls("latent")
        if value == "lossless":
            return cls("lossless")
        if value.startswith("near-lossless:"):
            raw = value.split(":", 1)[1]
            if not raw.isdigit() or not 1 <= int(raw) <= MAX_NEAR:
                raise TierError(
                    f"tier {text!r}: K in near-lossless:K must be an integer from 1 to {MAX_NEAR}"
                )
            return cls("near-lossless", int(raw))
        raise TierError(f"unknown tier {text!r}: use latent, lossless or near-lossless:K")

    def __str__(self) -> str:
        return f"near-lossless:{self.near}" if self.name == "near-lossless" else self.name

    @property
    def lossy(self) -> bool:
        """True when the returned pixels may differ from the original (PS3.3 C.7.6.1.1.5)."""
        return self.name != "lossless"

    @property
    def has_stream(self) -> bool:
        """True when a JPEG-LS stream is archived beside the latent."""
        return self.name != "latent"
