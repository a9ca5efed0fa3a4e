"""Lossless and near-lossless coders on physical phantoms: bpp, time and issue 13's targets.

Run from the repository root::

    .venv/bin/python benchmarks/bench_coders.py
    .venv/bin/python benchmarks/bench_coders.py --count 6 --size 2294x1914 --doses 500 1500 5000 --threads 2

Images are physical phantoms (:func:`latentpacs.phantom.render_image` with a dose:
Poisson quanta, detector blur, electronic noise, log transform, air at 0) from seeds and
doses the learned coder never saw in training (it was trained on seeds below 9000 at 300,
1000 and 3000 photons per pixel): image ``i`` has seed ``--seed + i``, dose
``--doses[i % n]`` and Bits Stored ``--bits[i % n]``, the views and photometric
interpretations cycling. Every coder of :mod:`latentpacs.evaluate.coders` codes every
image; every stream is decoded and verified (bit-exact, or within NEAR) before it counts,
and a coder that fails verification is printed as FAILED and makes the exit status 1.

Printed: the Markdown table (coder, NEAR, mean bpp, ratio against 16 bits allocated, bpp
relative to JPEG-LS at the same NEAR, bits per breast pixel, median encode and decode
ms, and the target status of each learned row), then JPEG-LS's lossless ratio beside the
published FFDM figures, and the noise floor of :func:`latentpacs.phantom.noise_floor_bpp`
at every NEAR (no coder within NEAR can go below it) with the share of JPEG-LS's distance to
it that the learned coder covers. ``--out`` writes the summary as JSON, ``--plot`` the bpp figure.
Nothing here asserts a target.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from latentpacs.cli import parse_size  # light: no numpy, torch or BLAS loaded

#: Seeds and doses of the learned coder's training set; never used for figures here.
TRAINING_SEED_LIMIT = 9000
TRAINING_DOSES = (300.0, 1000.0, 3000.0)
#: Clunie 2000 (SPIE Medical Imaging 3980): JPEG-LS lossless over 3,679 images; mammography
#: (MG) overall, and by digital vendor.
PUBLISHED_FFDM = "Clunie 2000: JPEG-LS about 2.6:1 over mammograms (MG 2.62), 2.2 to 4:1 by vendor"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The benchmark's options."""
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    p.add_argument("--count", type=int, default=3, help="images (default 3)")
    p.add_argument("--size", type=parse_size, default=(2294, 1914), metavar="ROWSxCOLS", help="default 2294x1914")
    p.add_argument("--doses", type=float, nargs="+", default=[500.0, 1500.0, 5000.0],
                   help="photons per pixel, cycled over the images (default 500 1500 5000)")
    p.add_argument("--bits", type=int, nargs="+", default=[12, 14, 16], choices=(12, 14, 16),
                   help="Bits Stored, cycled over the images (default 12 14 16)")
    p.add_argument("--seed", type=int, default=TRAINING_SEED_LIMIT, help=f"first seed (>= {TRAINING_SEED_LIMIT})")
    p.add_argument("--nears", type=int, nargs="+", default=[0, 1, 2, 4], help="NEAR values of the stream coders")
    p.add_argument("--jpegxl-efforts", type=int, nargs="*", default=[7, 9], help="JPEG-XL efforts (default 7 9)")
    p.add_argument("--threads", type=int, default=None,
                   help="threads of numpy's BLAS, libjxl and OpenJPEG (default: the libraries' own)")
    p.add_argument("--out", type=Path, help="write the summary as JSON here")
    p.add_argument("--plot", type=Path, help="write the bpp figure (PNG) here")
    args = p.parse_args(argv)
    if args.seed < TRAINING_SEED_LIMIT:
        p.error(f"--seed must be >= {TRAINING_SEED_LIMIT}: lower seeds trained the learned coder")
    if set(args.doses) & set(TRAINING_DOSES):
        p.error(f"--doses must avoid the training doses {TRAINING_DOSES}")
    if args.count < 1 or (args.threads is not None and args.threads < 1):
        p.error("--count and --threads must be at least 1")
    return args


def _images(args: argparse.Namespace) -> list[tuple[str, Any, int, int, dict[int, float]]]:
    """(name, stored values, Bits Stored, breast pixels, noise floor bpp by NEAR) of each phantom."""
    import numpy as np

    from latentpacs import phantom
    from latentpacs.evaluate.metrics import breast_mask

    images = []
    views = (("L", "CC"), ("R", "MLO"), ("R", "CC"), ("L", "MLO"))
    for index in range(args.count):
        seed, dose, bits = args.seed + index, args.doses[index % len(args.doses)], args.bits[index % len(args.bits)]
        rng = np.random.default_rng(seed)
        laterality, view = views[index % len(views)]
        photometric = ("MONOCHROME2", "MONOCHROME1")[index % 2]
        spec = phantom.PhantomSpec(args.size[0], args.size[1], view, laterality, bits, photometric,
                                   "FOR PRESENTATION", masses=int(rng.integers(0, 3)),
                                   calcification_clusters=int(rng.integers(0, 3)), dose=dose)
        canonical, floor = phantom.render_with_noise_floor(spec, rng)
        name = f"seed{seed}-dose{dose:g}-{bits}bit-{photometric}"
        floors = {near: phantom.noise_floor_bpp(floor, near) for near in sorted({0, *args.nears})}
        images.append((name, phantom._quantise(canonical, spec), bits, int(breast_mask(canonical).sum()), floors))
    return images


def _per_image(measures: Sequence[Any], floors: dict[str, float]) -> str:
    """bpp of each image at NEAR = 0: every coder, one column each, and the noise floor (Markdown)."""
    names = list(dict.fromkeys(m.coder for m in measures if m.near == 0))
    images = list(dict.fromkeys(m.image for m in measures))
    bpp = {(m.image, m.coder): m.bpp for m in measures if m.near == 0}
    lines = ["| image (lossless bpp) | " + " | ".join(names) + " | noise floor |",
             "|---|" + "---:|" * (len(names) + 1)]
    for image in images:
        cells = [f"{bpp[image, n]:.3f}" if (image, n) in bpp else "FAILED" for n in names]
        cells.append(f"{floors[image]:.3f}")
        lines.append(f"| {image} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _floor_rows(summary: dict[str, Any], images: Sequence[tuple[Any, ...]]) -> list[dict[str, Any]]:
    """Per NEAR: the mean noise floor over the images, against JPEG-LS and the learned coder.

    ``gap_closed_percent`` is the share of the distance from JPEG-LS down to the floor that
    the learned coder covers (100 % would be a coder that knows the anatomy exactly).
    """
    from latentpacs.evaluate import coders

    mean = {(r["coder"], r["near"]): r["mean_bpp"] for r in summary["rows"]
            if not r["failed"] and "mean_bpp" in r}
    rows = []
    for near in sorted(images[0][4]):
        floor = sum(image[4][near] for image in images) / len(images)
        reference, ours = mean.get((coders.REFERENCE, near)), mean.get(("learned", near))
        rows.append({
            "near": near, "floor_bpp": floor,
            "floor_vs_reference_percent": None if not reference else 100.0 * (floor / reference - 1.0),
            "gap_closed_percent": (None if not reference or ours is None or reference <= floor
                                   else 100.0 * (reference - ours) / (reference - floor)),
        })
    return rows


def _floor_table(rows: Sequence[dict[str, Any]]) -> str:
    """The noise floor rows (Markdown)."""
    def cell(value: float | None, spec: str) -> str:
        return "" if value is None else format(value, spec)
    lines = ["| NEAR | noise floor bpp | floor vs JPEG-LS | JPEG-LS-to-floor gap the learned coder closes |",
             "|---:|---:|---:|---:|"]
    for row in rows:
        lines.append(f"| {row['near']} | {row['floor_bpp']:.3f} | {cell(row['floor_vs_reference_percent'], '+.1f')} % "
                     f"| {cell(row['gap_closed_percent'], '.0f')} % |")
    return ("Noise floor: the entropy of the recorded noise given the exact anatomy, less log2(2 NEAR + 1) "
            "per noisy pixel (phantom.noise_floor_bpp); no coder within NEAR can go below it.\n\n"
            + "\n".join(lines))


def main(argv: Sequence[str] | None = None) -> int:
    """Measure, print the table; 1 when a coder failed verification, else 0."""
    args = parse_args(argv)
    if args.threads is not None:  # before numpy loads its BLAS
        for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ[name] = str(args.threads)
    from tqdm import tqdm

    from latentpacs.evaluate import coders, plots

    chosen = coders.default_coders(args.nears, args.jpegxl_efforts, args.threads)
    images = _images(args)
    measures: list[coders.CoderMeasure] = []
    failures: list[coders.CoderFailure] = []
    with tqdm(total=len(images) * len(chosen.coders), desc="coders", unit="stream", file=sys.stderr) as bar:
        for name, stored, bits, breast, _ in images:
            for coder in chosen.coders:
                found, failed = coders.measure_image([coder], name, stored, bits, breast)
                measures += found
                failures += failed
                bar.update()
    summary = coders.summarise(measures, failures, chosen.unavailable)
    summary["images_measured"] = [name for name, *_ in images]
    summary["measures"] = [dataclasses.asdict(m) for m in measures]
    summary["size"] = list(args.size)
    print(f"{len(images)} physical phantom(s) of {args.size[0]}x{args.size[1]}, seeds {args.seed}.."
          f"{args.seed + len(images) - 1}, doses {' '.join(f'{d:g}' for d in args.doses)}, "
          f"bits {' '.join(map(str, args.bits))}, threads {args.threads or 'default'}\n")
    print(coders.markdown_table(summary, targets=True))
    if any(m.coder == "learned" for m in measures):
        from latentpacs.codec import learned

        summary["learned_model_sha256"] = learned.load_coder_model().sha256
        print(f"\nlearned coder model: {summary['learned_model_sha256']}")
    reference = next((r for r in summary["rows"] if r["coder"] == coders.REFERENCE and r["near"] == 0
                      and "mean_bpp" in r), None)
    if reference is not None:
        print(f"\nJPEG-LS lossless on these phantoms: {reference['ratio_allocated']:.2f}:1 against 16 bits "
              f"allocated, {reference['ratio_stored']:.2f}:1 against Bits Stored "
              f"({reference['mean_bpp']:.3f} bpp, {reference['mean_breast_bpp']:.3f} bits per breast pixel); "
              f"{PUBLISHED_FFDM}.")
    summary["noise_floor"] = _floor_rows(summary, images)
    print("\n" + _floor_table(summary["noise_floor"]))
    print("\n" + _per_image(measures, {image[0]: image[4][0] for image in images}))
    for failure in summary["failures"]:
        print(f"FAILED: {failure['coder']} NEAR={failure['near']} on {failure['image']}: {failure['reason']}",
              file=sys.stderr)
    if args.out:
        args.out.write_text(json.dumps(summary, indent=2, allow_nan=False) + "\n")
    if args.plot:
        plots.coder_figure(summary, args.plot)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
