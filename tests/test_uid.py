"""One helper makes every UID latentpacs derives (PS3.5 B.2), and its UIDs never change.

The values below were computed with the three separate helpers the project had before
:func:`latentpacs.uid.uid_from_name` (image/derive.py, phantom.py, train/cbis.py). A
derived UID already handed out to a peer must name the same object forever, and the
phantom and miniature CBIS-DDSM trees are regenerated from fixed seeds, so each value is
pinned here.
"""

from __future__ import annotations

from pathlib import Path

import pydicom
from cbis_data import write_miniature_cbis

from latentpacs import phantom
from latentpacs.image.derive import IMPLEMENTATION_CLASS_UID, derived_uid
from latentpacs.uid import is_valid_uid

DIGITAL_MAMMOGRAPHY_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.2"


def test_derived_instance_and_series_uids_are_those_handed_out_before() -> None:
    assert derived_uid("1.2.3.4", "sop", "ab" * 32, "latent", DIGITAL_MAMMOGRAPHY_PRESENTATION) == (
        "2.25.123912488577158889312582215361563115690")
    assert derived_uid("1.2.3.5", "series", "cd" * 32, "near-lossless:2",
                       DIGITAL_MAMMOGRAPHY_PRESENTATION + ".1") == "2.25.61053967938814334072423294497029069767"


def test_the_implementation_class_uid_of_this_release_is_unchanged() -> None:
    assert IMPLEMENTATION_CLASS_UID == "2.25.249992243855261835826972595799038304738"  # version 0.1.0


def test_phantom_uids_are_unchanged(tmp_path: Path) -> None:
    files = phantom.generate(tmp_path, 2, 5, size=(64, 48))
    identities = [(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
                  for ds in (pydicom.dcmread(path, stop_before_pixels=True) for path in files)]
    study = "2.25.51854044487644053965557848517059911268"
    series = "2.25.33993103765733857641232193970774950022"
    assert identities == [
        (study, series, "2.25.265895061993048799199425208964244656631"),
        (study, series, "2.25.184757188645383210643942331104875334808"),
    ]
    assert [path.relative_to(tmp_path).parts[:2] for path in files] == [("LP0001", study)] * 2


def test_miniature_cbis_uids_are_unchanged(tmp_path: Path) -> None:
    root = write_miniature_cbis(tmp_path, cases=2, seed=9, size=(48, 40))
    found = {}
    for path in root.rglob("*.dcm"):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        found[ds.PatientID] = (ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
    assert found["Mass-Training_P_00001_LEFT_CC"] == (
        "2.25.121446795834320022795166425963154686737", "2.25.122206498211914998380951728850134630600",
        "2.25.184413796694813540187523101125769676531")
    assert found["Mass-Training_P_00001_LEFT_CC_1"][0] == "2.25.177007637686082809176373196276316012110"
    assert all(is_valid_uid(uid) for uids in found.values() for uid in uids)
