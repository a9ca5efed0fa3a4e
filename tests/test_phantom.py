"""Tests of the synthetic mammogram generator (latentpacs.phantom)."""

from __future__ import annotations

import itertools
import math
from dataclasses import replace
import subprocess
from collections import defaultdict
from pathlib import Path

import numpy as np
import pydicom
import pytest
from scipy.ndimage import maximum_filter, median_filter, minimum_filter

from latentpacs.errors import ConfigError
from latentpacs.phantom import (
    BITS_STORED,
    PHOTOMETRICS,
    PRESENTATIONS,
    TEST_OBJECT_CONTRASTS,
    TEST_OBJECT_DIAMETERS_MM,
    VENDOR_SIZES,
    VIEWS,
    PhantomSpec,
    _expose,
    _noise_bits,
    generate,
    make_dataset,
    noise_floor_bpp,
    render_image,
    render_with_noise_floor,
    TestObject,
    render_with_test_objects,
)

SMALL = (128, 104)
FOR_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.2"
FOR_PROCESSING = "1.2.840.10008.5.1.4.1.1.1.2.1"


def _spec(**changes: object) -> PhantomSpec:
    fields: dict[str, object] = dict(rows=256, columns=208, view="CC", laterality="L",
                                     bits_stored=12, photometric="MONOCHROME2",
                                     presentation="FOR PRESENTATION")
    fields.update(changes)
    return PhantomSpec(**fields)  # type: ignore[arg-type]


def _write(spec: PhantomSpec, path: Path, seed: int = 0, instance: int = 1) -> pydicom.Dataset:
    ds = make_dataset(spec, np.random.default_rng(seed), patient_id="LP0001",
                      patient_name="PHANTOM^0001", study_uid="2.25.1", series_uid="2.25.2",
                      instance_number=instance)
    ds.save_as(path, enforce_file_format=True)
    return pydicom.dcmread(path)


def test_every_storage_combination_passes_dciodvfy(tmp_path: Path) -> None:
    combos = list(itertools.product(PHOTOMETRICS, BITS_STORED, PRESENTATIONS, VIEWS))
    assert len(combos) == 24
    problems = []
    for n, (photometric, bits, presentation, view) in enumerate(combos):
        spec = PhantomSpec(*SMALL, view, "LR"[n % 2], bits, photometric, presentation,
                           masses=1, calcification_clusters=1)
        path = tmp_path / f"{n}.dcm"
        _write(spec, path, seed=n, instance=n + 1)
        report = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True,
                                check=False)
        text = report.stdout + report.stderr
        assert "MammographyImage" in text, text
        problems += [f"{spec}: {line}" for line in text.splitlines() if line.startswith("Error")]
    assert problems == []


def test_render_image_is_a_canonical_image_of_a_breast() -> None:
    for laterality in ("L", "R"):
        image = render_image(_spec(laterality=laterality), np.random.default_rng(3))
        assert image.dtype == np.float32 and image.shape == (256, 208)
        assert image.min() >= 0.0 and image.max() <= 1.0
        chest, nipple_side = (slice(0, 20), slice(-20, None))
        if laterality == "R":
            chest, nipple_side = nipple_side, chest
        assert image[-20:, nipple_side].mean() < 0.05  # air, bottom corner away from the chest
        assert image[110:150, chest].mean() > 0.2  # tissue at the chest wall
        # burned-in "L CC"/"R CC" at the top, away from the chest wall, drawn at full brightness
        assert image[:30, nipple_side].max() == pytest.approx(1.0)
        assert image[:30, chest].max() < 1.0


def test_mlo_shows_a_pectoral_muscle_in_the_upper_chest_wall_corner() -> None:
    image = render_image(_spec(view="MLO", laterality="L"), np.random.default_rng(5))
    corner = image[:15, :10].mean()
    assert corner > 0.7
    assert corner > np.median(image[image > 0.1])


def test_calcifications_appear_as_small_bright_spots() -> None:
    def spots(clusters: int) -> int:
        image = render_image(_spec(masses=0, calcification_clusters=clusters),
                             np.random.default_rng(11))
        interior = minimum_filter(image, size=9) > 0.1  # away from the skin line and text
        peaks = image - median_filter(image, size=5) > 0.12
        return int(np.count_nonzero(peaks & interior))

    assert spots(0) <= 2
    assert spots(4) >= spots(0) + 15


def test_stored_values_respect_bits_stored_and_monochrome1_inversion(tmp_path: Path) -> None:
    for bits in BITS_STORED:
        top = (1 << bits) - 1
        pixels = {}
        for photometric in PHOTOMETRICS:
            ds = _write(_spec(bits_stored=bits, photometric=photometric),
                        tmp_path / f"{bits}-{photometric}.dcm", seed=bits)
            assert (ds.BitsAllocated, ds.BitsStored, ds.HighBit) == (16, bits, bits - 1)
            pixels[photometric] = ds.pixel_array.astype(np.int64)
            assert pixels[photometric].max() <= top
        mono1, mono2 = pixels["MONOCHROME1"], pixels["MONOCHROME2"]
        np.testing.assert_array_equal(mono1, top - mono2)
        air = (slice(-20, None), slice(-20, None))
        assert mono1[air].min() > 0.9 * top  # air is bright in MONOCHROME1 stored values
        assert mono2[air].max() < 0.1 * top
        assert mono2.max() == top  # burned-in text at full scale


def test_generate_is_reproducible_and_seed_dependent(tmp_path: Path) -> None:
    first = generate(tmp_path / "a", 6, 42, size=(64, 52))
    again = generate(tmp_path / "b", 6, 42, size=(64, 52))
    other = generate(tmp_path / "c", 6, 43, size=(64, 52))
    assert [p.relative_to(tmp_path / "a") for p in first] == \
        [p.relative_to(tmp_path / "b") for p in again]
    assert all(a.read_bytes() == b.read_bytes() for a, b in zip(first, again))
    for a, c in zip(first, other):
        one, two = pydicom.dcmread(a), pydicom.dcmread(c)
        assert one.SOPInstanceUID != two.SOPInstanceUID
        assert one.StudyInstanceUID != two.StudyInstanceUID
        assert not np.array_equal(one.pixel_array, two.pixel_array)


def test_generate_covers_every_view_laterality_depth_photometric_and_intent(
        tmp_path: Path) -> None:
    headers = [pydicom.dcmread(p) for p in generate(tmp_path, 24, 1, size=(64, 52))]
    assert len(headers) == 24
    views = {h.ViewCodeSequence[0].CodeValue for h in headers}
    assert views == {"399162004", "399368009"}
    assert {h.ImageLaterality for h in headers} == {"L", "R"}
    assert {(h.BitsStored, h.PhotometricInterpretation) for h in headers} == \
        set(itertools.product(BITS_STORED, PHOTOMETRICS))
    assert {(h.PresentationIntentType, h.SOPClassUID) for h in headers} == \
        {("FOR PRESENTATION", FOR_PRESENTATION), ("FOR PROCESSING", FOR_PROCESSING)}
    assert all((h.Rows, h.Columns) == (64, 52) for h in headers)
    assert all("WindowCenter" in h for h in headers if h.PresentationIntentType ==
               "FOR PRESENTATION")


def test_generate_groups_images_into_studies_and_patients(tmp_path: Path) -> None:
    paths = generate(tmp_path, 24, 9, size=(64, 52), images_per_study=4, studies_per_patient=2)
    studies: dict[str, list[pydicom.Dataset]] = defaultdict(list)
    for path in paths:
        ds = pydicom.dcmread(path)
        assert path.parent.name == ds.StudyInstanceUID
        assert path.parent.parent.name == ds.PatientID
        studies[ds.StudyInstanceUID].append(ds)
    assert len(studies) == 6
    patients: dict[str, set[str]] = defaultdict(set)
    for images in studies.values():
        assert len(images) == 4
        assert {(d.ImageLaterality, d.ViewCodeSequence[0].CodeMeaning) for d in images} == \
            set(itertools.product("LR", ("cranio-caudal", "medio-lateral oblique")))
        assert len({d.SeriesInstanceUID for d in images}) == 1
        assert len({d.PresentationIntentType for d in images}) == 1
        assert sorted(d.InstanceNumber for d in images) == [1, 2, 3, 4]
        assert len({d.SOPInstanceUID for d in images}) == 4
        patients[images[0].PatientID].add(images[0].StudyDate)
    assert sorted(patients) == ["LP0001", "LP0002", "LP0003"]
    assert all(len(dates) == 2 for dates in patients.values())


def test_generate_without_size_cycles_vendor_sizes(tmp_path: Path) -> None:
    paths = generate(tmp_path, 3, 0, images_per_study=1, studies_per_patient=1)
    sizes = [pydicom.dcmread(p, stop_before_pixels=True) for p in paths]
    assert [(d.Rows, d.Columns) for d in sizes] == list(VENDOR_SIZES)


def test_invalid_requests_raise_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="view"):
        _spec(view="ML")
    with pytest.raises(ConfigError, match="bits_stored"):
        _spec(bits_stored=10)
    with pytest.raises(ConfigError, match="32x32"):
        _spec(rows=16)
    with pytest.raises(ConfigError):
        generate(tmp_path, 0, 1)


def _local_noise(image: np.ndarray) -> np.ndarray:
    """Per-pixel noise estimate: the absolute difference to the 3x3 median."""
    return np.abs(image - median_filter(image, size=3))


def test_physical_model_air_is_exactly_zero_and_noise_follows_dose_and_density() -> None:
    spec = _spec(rows=512, columns=416, masses=0, calcification_clusters=0, dose=1000.0)
    plain = render_image(_spec(rows=512, columns=416, masses=0, calcification_clusters=0),
                         np.random.default_rng(4))
    image = render_image(spec, np.random.default_rng(4))
    air = maximum_filter(plain, size=9) < 0.05  # well outside the breast in the plain model
    assert air.mean() > 0.2
    assert np.all(image[air & (image < 0.5)] == 0.0)  # air is one exact value (labels aside)
    inside = minimum_filter(plain, size=9) > 0.2
    noise = _local_noise(image)
    dense = inside & (plain > np.percentile(plain[inside], 75))
    fatty = inside & (plain < np.percentile(plain[inside], 25))
    assert noise[dense].mean() > 1.2 * noise[fatty].mean()  # fewer photons behind dense tissue
    low = render_image(PhantomSpec(**{**spec.__dict__, "dose": 250.0}), np.random.default_rng(4))
    assert _local_noise(low)[inside].mean() > 1.6 * noise[inside].mean()  # 4x fewer photons: ~2x noise
    from latentpacs.phantom import _expose

    flat = _expose(np.full((256, 256), 0.5, np.float32), np.ones((256, 256), np.float32), 1000.0,
                   np.random.default_rng(5)).astype(np.float64)
    flat -= flat.mean()
    lag1 = float((flat[:, 1:] * flat[:, :-1]).mean() / (flat * flat).mean())
    lag3 = float((flat[:, 3:] * flat[:, :-3]).mean() / (flat * flat).mean())
    assert 0.3 < lag1 < 0.8 and abs(lag3) < 0.1  # blur: neighbours share noise, far pixels do not


def test_physical_model_dose_is_checked_and_generate_uses_it(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="dose"):
        _spec(dose=1.0)
    paths = generate(tmp_path, 2, 5, size=(64, 52), dose=500.0)
    again = generate(tmp_path / "again", 2, 5, size=(64, 52), dose=500.0)
    plain = generate(tmp_path / "plain", 2, 5, size=(64, 52))
    assert [p.read_bytes() for p in paths] == [p.read_bytes() for p in again]
    assert paths[0].read_bytes() != plain[0].read_bytes()


def test_noise_floor_is_the_entropy_of_the_recorded_noise() -> None:
    """On a uniform slab, the best linear predictor of the recorded values (24 causal
    neighbours, fitted on the image itself) codes its residual at, and never below, the
    noise floor: the floor is neither vacuous nor optimistic."""
    rng = np.random.default_rng(5)
    for attenuation, dose in ((0.2, 1000.0), (0.6, 300.0)):
        slab = np.full((384, 384), attenuation)
        floor = float(_noise_bits(slab, dose, 14).mean())
        values = np.rint(_expose(slab, np.ones_like(slab), dose, rng).astype(np.float64) * 16383)[8:-8, 8:-8]
        offsets = [(dy, dx) for dy in range(-3, 1) for dx in range(-3, 4) if (dy, dx) < (0, 0)][:24]
        target = values[3:, 3:-3].ravel()
        h, w = values.shape
        neighbours = np.stack([values[3 + dy:h + dy, 3 + dx:w - 3 + dx].ravel() for dy, dx in offsets]
                              + [np.ones(target.size)], axis=1)
        weights, *_ = np.linalg.lstsq(neighbours, target, rcond=None)
        residual = target - neighbours @ weights
        gaussian_bits = 0.5 * np.log2(2 * np.pi * np.e * residual.var())
        assert floor - 0.03 < gaussian_bits < floor + 0.15, (attenuation, dose, floor, gaussian_bits)


def test_every_coder_stays_above_the_noise_floor_and_the_floor_follows_near() -> None:
    """The floor is below what JPEG-LS and the learned coder spend at every NEAR, close
    enough to them to mean something, and the image is render_image's own."""
    from latentpacs.codec import charls, learned

    spec = _spec(rows=640, columns=520, view="MLO", bits_stored=14, dose=800.0)
    image, floor = render_with_noise_floor(spec, np.random.default_rng(31))
    assert np.array_equal(image, render_image(spec, np.random.default_rng(31)))
    assert floor.min() == 0.0 and floor[image == 0].max() == 0.0  # air is noiseless
    values = np.rint(image * 16383).astype(np.uint16)
    floors = [noise_floor_bpp(floor, near) for near in (0, 1, 2, 4)]
    assert floors == sorted(floors, reverse=True)
    for near, bound in zip((0, 1, 2, 4), floors):
        for coded in (charls.encode(values, 14, near), learned.encode_stream(values, 14, near)):
            bpp = 8 * len(coded) / values.size
            assert bound < bpp < 1.15 * bound, (near, bound, bpp)
    with pytest.raises(ConfigError, match="physical"):
        render_with_noise_floor(_spec(), np.random.default_rng(1))


def test_test_objects_are_known_discs_that_a_lossy_codec_loses_first() -> None:
    """The discs sit inside the breast where render_with_test_objects says, with the
    contrast asked for, and nothing else changes; JPEG at quality 20 keeps less of the
    smallest discs than of the largest, and quality 95 keeps most of every one."""
    import io

    from PIL import Image

    from latentpacs.evaluate.metrics import breast_mask, object_visibility

    spec = _spec(rows=1024, columns=832, view="MLO", laterality="R", masses=0, calcification_clusters=0,
                 test_objects=True)
    image, objects = render_with_test_objects(spec, np.random.default_rng(8))
    plain = render_image(replace(spec, test_objects=False), np.random.default_rng(8))
    assert len(objects) == len(TEST_OBJECT_DIAMETERS_MM) * len(TEST_OBJECT_CONTRASTS) == 9
    inside = breast_mask(plain)
    changed = np.argwhere(image != plain)
    for obj in objects:
        assert inside[round(obj.row), round(obj.column)]
        assert obj.radius == pytest.approx(max(0.75, obj.radius), abs=1e-9)
        near = np.hypot(changed[:, 0] + 0.5 - obj.row, changed[:, 1] + 0.5 - obj.column) <= obj.radius + 1.5
        assert near.any()
        # the drawn contrast, measured against the same image without the disc: the disc's
        # anti-aliased coverage clip(r + 1/2 - d, 0, 1) times the contrast asked for
        dy, dx = np.mgrid[-6:7, -6:7] + np.array([math.floor(obj.row), math.floor(obj.column)])[:, None, None]
        d = np.hypot(dy + 0.5 - obj.row, dx + 0.5 - obj.column)
        coverage = float(np.clip(obj.radius + 0.5 - d, 0, 1)[d <= obj.radius].mean())
        assert object_visibility(image, obj.row, obj.column, obj.radius)[0] - object_visibility(
            plain, obj.row, obj.column, obj.radius)[0] == pytest.approx(obj.contrast * coverage, abs=2e-4)
    assert all(any(np.hypot(r + 0.5 - o.row, c + 0.5 - o.column) <= o.radius + 1.5 for o in objects)
               for r, c in changed)
    def jpeg(values: np.ndarray, quality: int) -> np.ndarray:
        buffer = io.BytesIO()
        Image.fromarray(np.rint(values * 255).astype(np.uint8)).save(buffer, format="JPEG", quality=quality)
        return np.asarray(Image.open(io.BytesIO(buffer.getvalue())), dtype=np.float32) / 255

    def drawn(with_objects: np.ndarray, without: np.ndarray, o: TestObject) -> float:
        """The disc's own contrast: the same measure on the image without it subtracted."""
        return (object_visibility(with_objects, o.row, o.column, o.radius)[0]
                - object_visibility(without, o.row, o.column, o.radius)[0])

    kept = {}
    for quality in (20, 95):
        coded, coded_plain = jpeg(image, quality), jpeg(plain, quality)
        kept[quality] = {(o.radius, o.contrast): drawn(coded, coded_plain, o) / drawn(image, plain, o)
                         for o in objects}
    smallest, largest = min(kept[20])[0], max(kept[20])[0]
    small = np.mean([v for (r, _), v in kept[20].items() if r == smallest])
    large = np.mean([v for (r, _), v in kept[20].items() if r == largest])
    assert small < large, kept[20]  # at quality 20 the smallest discs go first
    assert float(np.mean(list(kept[95].values()))) > max(0.8, float(np.mean(list(kept[20].values())))), kept
    with pytest.raises(ConfigError, match="test objects"):
        render_with_test_objects(_spec(), np.random.default_rng(1))
