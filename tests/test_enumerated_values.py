"""Enumerated values are StrEnums that read and write as the plain strings archived before.

Photometric Interpretation (0028,0004, PS3.3 C.7.6.3.1.2) and the tier kind
(codec.tiers.TierKind) go into archive rows, ``.lpz`` geometry and DICOM headers: each
must come back equal to, and be written as, its plain text.
"""

from __future__ import annotations

import dataclasses
import json

import pydicom
import pytest
from archive_data import MODEL, S1, archived, phantom, retrieved

from latentpacs.archive import Archive
from latentpacs.codec.tiers import Tier, TierKind
from latentpacs.errors import UnsupportedImageError
from latentpacs.image.pixels import Photometric, PixelModule


def test_photometric_interpretation_is_an_enum_equal_to_its_text() -> None:
    module = PixelModule(10, 20, 16, 14, 13, "MONOCHROME1")
    assert module.photometric_interpretation is Photometric.MONOCHROME1
    assert module == PixelModule(10, 20, 16, 14, 13, Photometric.MONOCHROME1)
    geometry = json.loads(json.dumps(dataclasses.asdict(module)))  # as .lpz stores it
    assert geometry["photometric_interpretation"] == "MONOCHROME1"
    assert PixelModule(**geometry) == module
    ds = pydicom.Dataset()
    module.apply_to(ds)
    assert type(ds.PhotometricInterpretation) is str and ds.PhotometricInterpretation == "MONOCHROME1"
    with pytest.raises(UnsupportedImageError, match="MONOCHROME1/2"):
        PixelModule(10, 20, 16, 14, 13, "RGB")


def test_enum_values_archive_and_come_back_as_their_text(archive_url: str) -> None:
    source = phantom("P1", "Doe^Jane", "19600101", S1, "20240115", "090000", "Screening", 1)
    plain = archived(source, "near-lossless:2", stream=b"s")
    module = PixelModule.from_dataset(source)
    tier = Tier(TierKind.NEAR_LOSSLESS, 2)
    typed = dataclasses.replace(plain, tier=str(tier), photometric_interpretation=module.photometric_interpretation)
    assert typed == plain
    with Archive(archive_url) as archive:
        archive.register_model(sha256=MODEL, name="test", arch="ae", card={})
        archive.store(typed)
        (back,) = retrieved(archive, plain.sop_instance_uid)
    assert back == plain and back.photometric_interpretation == Photometric.MONOCHROME2
    assert Tier.parse(back.tier) == tier and Tier.parse(back.tier).name is TierKind.NEAR_LOSSLESS
