"""Bad input: a corpus of malformed objects, each refused without harm (PS3.4 B.2.3).

The corpus is built from phantom files with pydicom edits and from DCMTK-compressed
files whose codestreams are damaged. Every object goes to one node in one ``storescu -nh``
run: each must be answered with a failure status and an ErrorComment, nothing of it may
be archived, and the node must go on answering C-ECHO and storing good images. An object
of an unsupported SOP class is refused earlier, at presentation-context negotiation
(PS3.8 9.3.3.2), and ``storescu`` reports that it had no context for it.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate, generate_frames

from dicomtools import require
from latentpacs import phantom
from latentpacs.errors import Status
from netpeers import DimseResponse, dimse_responses, echoscu, findscu, storescu
from test_node import node_factory  # noqa: F401 (fixture)

SIZE = (64, 52)
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"


def _fragment(ds: Dataset) -> bytes:
    (frame,) = list(generate_frames(ds.PixelData, number_of_frames=1))
    return frame


def _no_pixel_data(ds: Dataset) -> None:
    del ds.PixelData


def _colour(ds: Dataset) -> None:
    values = np.repeat(ds.pixel_array[..., None].astype(np.uint8), 3, axis=2)
    ds.SamplesPerPixel, ds.PlanarConfiguration, ds.PhotometricInterpretation = 3, 0, "RGB"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
    ds.PixelData = values.tobytes()


def _multi_frame(ds: Dataset) -> None:
    ds.NumberOfFrames = 2
    ds.PixelData = ds.PixelData * 2


def _truncated(ds: Dataset) -> None:
    ds.PixelData = ds.PixelData[: len(ds.PixelData) // 3]


def _rows_inconsistent(ds: Dataset) -> None:
    ds.Rows = ds.Rows + 7


def _bits_stored_above_allocated(ds: Dataset) -> None:
    ds.BitsStored, ds.HighBit = 20, 19


def _high_bit_inconsistent(ds: Dataset) -> None:
    ds.HighBit = 3


def _eight_bit_header_sixteen_bit_data(ds: Dataset) -> None:
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7


def _absurd_size(ds: Dataset) -> None:
    ds.Rows, ds.Columns = 65535, 65535


def _zero_columns(ds: Dataset) -> None:
    ds.Columns = 0


def _no_study_uid(ds: Dataset) -> None:
    del ds.StudyInstanceUID


def _no_series_uid(ds: Dataset) -> None:
    del ds.SeriesInstanceUID


def _float_pixels(ds: Dataset) -> None:
    ds.FloatPixelData = ds.pixel_array.astype(np.float32).tobytes()
    del ds.PixelData
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 32, 32, 31


def _corrupt_marker(ds: Dataset) -> None:
    frame = bytearray(_fragment(ds))
    frame[:16] = b"\x00" * 16  # SOI and the frame header gone
    ds.PixelData = encapsulate([bytes(frame)])


def _truncated_codestream(ds: Dataset) -> None:
    ds.PixelData = encapsulate([_fragment(ds)[:40]])


def _noise_codestream(ds: Dataset) -> None:
    noise = np.random.default_rng(7).integers(0, 256, len(_fragment(ds)), dtype=np.uint8)
    ds.PixelData = encapsulate([noise.tobytes()])


#: name -> (DCMTK compressor or None for the native file, edit)
CORPUS: dict[str, tuple[str | None, Callable[[Dataset], None]]] = {
    "no-pixel-data": (None, _no_pixel_data),
    "colour": (None, _colour),
    "multi-frame": (None, _multi_frame),
    "truncated-pixel-data": (None, _truncated),
    "rows-inconsistent": (None, _rows_inconsistent),
    "bits-stored-above-allocated": (None, _bits_stored_above_allocated),
    "high-bit-inconsistent": (None, _high_bit_inconsistent),
    "bits-allocated-inconsistent": (None, _eight_bit_header_sixteen_bit_data),
    "absurd-size": (None, _absurd_size),
    "zero-columns": (None, _zero_columns),
    "no-study-uid": (None, _no_study_uid),
    "no-series-uid": (None, _no_series_uid),
    "float-pixel-data": (None, _float_pixels),
    "jpegls-corrupt-header": ("dcmcjpls", _corrupt_marker),
    "jpegls-truncated": ("dcmcjpls", _truncated_codestream),
    "jpeg-lossless-corrupt-header": ("dcmcjpeg", _corrupt_marker),
    "jpeg-lossless-truncated": ("dcmcjpeg", _truncated_codestream),
    "rle-corrupt-header": ("dcmcrle", _corrupt_marker),
    "rle-truncated": ("dcmcrle", _truncated_codestream),
    "jpegls-noise": ("dcmcjpls", _noise_codestream),
    "jpeg-lossless-noise": ("dcmcjpeg", _noise_codestream),
}

#: Readable images of a kind the archive does not take (PS3.4 B.2.3 0xA900); the rest
#: cannot be understood at all (0xC000).
UNSUPPORTED = {"colour", "multi-frame", "float-pixel-data"}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Path], list[Path]]:
    """The malformed files by name (each with its own UIDs), and two good phantoms."""
    folder = tmp_path_factory.mktemp("malformed")
    sources = phantom.generate(folder / "phantoms", len(CORPUS) + 2, seed=23, size=SIZE,
                               images_per_study=1)
    good, bases = sources[:2], sources[2:]
    files: dict[str, Path] = {}
    for (name, (compressor, edit)), base in zip(CORPUS.items(), bases):
        source = base
        if compressor is not None:
            source = folder / f"{name}.compressed.dcm"
            subprocess.run([require(compressor), str(base), str(source)], check=True,
                           capture_output=True, timeout=60)
        ds = pydicom.dcmread(source)
        edit(ds)
        files[name] = folder / f"{name}.dcm"
        ds.save_as(files[name], enforce_file_format=True)
    return files, good


#: storescu flag that proposes each compressor's transfer syntax, so the damaged
#: codestream reaches the node as it is (without it storescu would try to decompress it).
PROPOSE = {None: [], "dcmcjpls": ["-xt"], "dcmcjpeg": ["-xs"], "dcmcrle": ["-xr"]}


def _stored_count(node) -> int:
    return len(findscu(node.port, node.aet, "IMAGE", {"SOPInstanceUID": ""}).datasets)


def _store_each_group(node, files: dict[str, Path]) -> dict[str, DimseResponse]:
    """Send the corpus, one ``storescu -nh`` per transfer syntax; the response to each file."""
    answers: dict[str, DimseResponse] = {}
    for compressor, flags in PROPOSE.items():
        names = [name for name in files if CORPUS[name][0] == compressor]
        result = storescu(node.port, node.aet, [files[n] for n in names], extra=["-nh", *flags])
        responses = dimse_responses(result)
        assert len(responses) == len(names), (result.stdout + result.stderr)[-3000:]
        answers.update(zip(names, responses))
    return answers


@pytest.mark.parametrize("tier", ["latent", "lossless"])
def test_every_malformed_object_is_refused_with_a_comment(corpus, node_factory, tmp_path,
                                                          tier) -> None:
    """At ``lossless`` native images are archived as received (deferred coding): they
    must still be refused before the answer, never acknowledged and then failed."""
    files, good = corpus
    node = node_factory(f"sqlite:///{tmp_path / 'a.db'}", codec={"tier": tier})
    (first,) = dimse_responses(storescu(node.port, node.aet, good[:1]))
    answers = _store_each_group(node, files)
    assert set(answers) == set(CORPUS)
    for name, response in answers.items():
        expected = (Status.DOES_NOT_MATCH_SOP_CLASS if name in UNSUPPORTED
                    else Status.CANNOT_UNDERSTAND)
        assert response.status == expected, f"{name}: status 0x{response.status:04X}"
        assert response.error_comment, f"{name}: refused without an ErrorComment"
    # Nothing of the corpus was archived, and the node serves as before.
    assert echoscu(node.port, node.aet).returncode == 0
    (last,) = dimse_responses(storescu(node.port, node.aet, good[1:]))
    assert first.status == last.status == Status.SUCCESS
    assert _stored_count(node) == 2


def test_an_unsupported_sop_class_is_refused_at_negotiation(corpus, node_factory, tmp_path) -> None:
    _, good = corpus
    ct = tmp_path / "ct.dcm"
    ds = pydicom.dcmread(good[0])
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = CT_IMAGE_STORAGE
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = "2.25.4242"
    ds.save_as(ct)
    # Negotiation is what is tested: the lossless tier needs no model engine.
    node = node_factory(f"sqlite:///{tmp_path / 'a.db'}", codec={"tier": "lossless"})
    result = storescu(node.port, node.aet, [ct, good[1]], extra=["-nh"])
    output = result.stdout + result.stderr
    assert "No presentation context" in output or "no presentation context" in output.lower(), output[-3000:]
    assert [r.status for r in dimse_responses(result)] == [Status.SUCCESS]  # only the mammogram went
    assert _stored_count(node) == 1
