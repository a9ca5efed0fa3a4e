"""Archive test data: phantom mammograms (latentpacs.phantom) as ArchivedImage objects.

Catalogue (three patients, four studies; study 1 is sent as one series whose first two
images are archived lossless and the other two as latents, so it has two *effective*
series: the original one and the derived one):

=====  ==========  ==============  ========  ======  =====================  ===========
pat    name        birth           study     date    description            instances
=====  ==========  ==============  ========  ======  =====================  ===========
P1     Doe^Jane    19600101        S1        202401  Screening mammogram    2 + 2 (latent)
P1                                 S2        202303  Diagnostic mammogram   1 (near-lossless:2)
P2     SMITH^Anna  19751231        S3        202206  Screening mammogram    3
P3     Müller^Eva  19820415        S4        202402  100%_check             1 (OT)
=====  ==========  ==============  ========  ======  =====================  ===========
"""

from __future__ import annotations

import hashlib
from functools import cache

import numpy as np
import pydicom

from latentpacs.archive import Archive, ArchivedImage
from latentpacs.phantom import PhantomSpec, make_dataset

MODEL = hashlib.sha256(b"archive test model").hexdigest()
ROOT = "1.2.826.0.1.3680043.10.1234"
S1, S2, S3, S4 = (f"{ROOT}.{n}" for n in (1, 2, 3, 4))
SPEC = PhantomSpec(rows=64, columns=48, view="CC", laterality="L", bits_stored=12,
                   photometric="MONOCHROME2", presentation="FOR PRESENTATION")


def derived_uid(*parts: str) -> str:
    """A deterministic UID under 2.25 (PS3.5 B.2), as the derive module makes them."""
    return "2.25." + str(int(hashlib.sha256("/".join(parts).encode()).hexdigest()[:30], 16))


@cache
def phantom(patient: str, name: str, birth: str, study: str, date: str, time: str,
            description: str, number: int, modality: str = "MG") -> pydicom.Dataset:
    """One small phantom mammogram with the given identity."""
    ds = make_dataset(SPEC, np.random.default_rng(number), patient_id=patient,
                      patient_name=name, study_uid=study, series_uid=f"{study}.1",
                      instance_number=number, study_date=date, study_time=time,
                      patient_birth_date=birth, accession_number=f"ACC{study[-1]}",
                      study_id=study[-1], sop_instance_uid=f"{study}.1.{number}")
    ds.StudyDescription = description
    ds.Modality = modality
    return ds


def archived(ds: pydicom.Dataset, tier: str = "lossless", stream: bytes = b"",
             latent: bytes = bytes(range(32))) -> ArchivedImage:
    """The ArchivedImage the service would make of ``ds`` for ``tier``."""
    header = ds.to_json_dict()
    del header["7FE00010"]  # Pixel Data
    overrides: dict[str, dict[str, object]] = {}
    if tier != "lossless":
        overrides = {
            "00080018": {"vr": "UI", "Value": [derived_uid(ds.SOPInstanceUID, MODEL)]},
            "0020000E": {"vr": "UI", "Value": [derived_uid(ds.SeriesInstanceUID, MODEL)]},
            "00080008": {"vr": "CS", "Value": ["DERIVED", "SECONDARY"]},
            "00282110": {"vr": "CS", "Value": ["01"]},
        }
    return ArchivedImage(
        header=header, overrides=overrides, tier=tier, model_sha256=MODEL,
        latent=latent, stream=stream if tier != "latent" else b"",
        rows=ds.Rows, columns=ds.Columns, bits_allocated=ds.BitsAllocated,
        bits_stored=ds.BitsStored, high_bit=ds.HighBit,
        photometric_interpretation=ds.PhotometricInterpretation,
        original_transfer_syntax=str(ds.file_meta.TransferSyntaxUID),
        original_stored_bytes=len(ds.PixelData),
    )


def catalogue() -> list[ArchivedImage]:
    """The nine images of the module docstring's table, in storage order."""
    jane = ("P1", "Doe^Jane", "19600101")
    anna = ("P2", "SMITH^Anna", "19751231")
    eva = ("P3", "Müller^Eva", "19820415")
    images = [
        archived(phantom(*jane, S1, "20240115", "090000", "Screening mammogram", n),
                 "lossless" if n <= 2 else "latent", stream=bytes([n]) * 100)
        for n in (1, 2, 3, 4)
    ]
    images.append(archived(phantom(*jane, S2, "20230310", "143000", "Diagnostic mammogram", 1),
                           "near-lossless:2", stream=b"r" * 50))
    images += [archived(phantom(*anna, S3, "20220601", "080000", "Screening mammogram", n),
                        stream=b"s" * 10) for n in (1, 2, 3)]
    images.append(archived(phantom(*eva, S4, "20240220", "120000", "100%_check", 1, "OT")))
    return images


def filled_archive(url: str) -> Archive:
    """A new archive at ``url`` holding the catalogue."""
    archive = Archive(url)
    archive.register_model(sha256=MODEL, name="test", arch="ae", card={"latent_dim": 16})
    for image in catalogue():
        archive.store(image)
    return archive


def query(level: str, **keys: object) -> pydicom.Dataset:
    """A C-FIND / C-GET identifier: Query/Retrieve Level plus keyword=value keys."""
    ds = pydicom.Dataset()
    ds.QueryRetrieveLevel = level
    for keyword, value in keys.items():
        setattr(ds, keyword, value)
    return ds


def retrieved(archive: Archive, sop_instance_uid: str) -> list[ArchivedImage]:
    """What an IMAGE-level C-GET of ``sop_instance_uid`` returns (PS3.4 C.4.3.2): match, then load."""
    ids = archive.match_instances("IMAGE", query("IMAGE", SOPInstanceUID=sop_instance_uid))
    return [archive.load(instance_id) for instance_id in ids]
