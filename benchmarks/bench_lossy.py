"""Lossy coders at the ratios guidelines accept (10:1 to 30:1): the reference curves.

Run from the repository root::

    .venv/bin/python benchmarks/bench_lossy.py
    .venv/bin/python benchmarks/bench_lossy.py --count 3 --size 2294x1914 --ratios 10 15 20 25 30

Images: physical phantoms (Poisson quanta, detector blur, electronic noise, log, air at
0) with calcification-like test objects (:data:`latentpacs.phantom.TEST_OBJECT_DIAMETERS_MM`
x :data:`~latentpacs.phantom.TEST_OBJECT_CONTRASTS`), seeds from ``--seed`` (default 9300),
doses 700/2000/4000 and 12/14/16 bits in turn. Each coder is driven to each ratio against
the stored bytes (:func:`latentpacs.evaluate.lossy.encode_at_ratio`: at most the target
size, within 10 %), decoded, and scored: breast PSNR, MS-SSIM over the breast's bounding
box, and the share of each test object's contrast kept (its CNR over the original's noise). Printed: a Markdown table of means per
coder and ratio, and the BD-rate of HTJ2K against JPEG 2000 on breast PSNR. Nothing here
asserts a target.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from latentpacs.cli import parse_size

DOSES = (700.0, 2000.0, 4000.0)
BITS = (12, 14, 16)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The benchmark's options."""
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    p.add_argument("--count", type=int, default=3, help="phantoms (default 3)")
    p.add_argument("--seed", type=int, default=9300, help="seed of the first (default 9300)")
    p.add_argument("--size", type=parse_size, default=(2294, 1914), metavar="ROWSxCOLS", help="default 2294x1914")
    p.add_argument("--ratios", type=float, nargs="+", default=[10.0, 15.0, 20.0, 25.0, 30.0])
    p.add_argument("--out", type=Path, help="write every score as JSON here")
    args = p.parse_args(argv)
    if args.count < 1 or any(r <= 1 for r in args.ratios):
        p.error("--count must be at least 1 and every ratio above 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; 0 on success, 1 when a coder missed a ratio."""
    import numpy as np

    from latentpacs import phantom
    from latentpacs.evaluate import lossy

    args = parse_args(argv)
    codecs = (lossy.JPEG2000, lossy.HTJ2K)
    views = (("L", "CC"), ("R", "MLO"), ("R", "CC"), ("L", "MLO"))
    scores: list[dict[str, Any]] = []
    missed = 0
    for index in range(args.count):
        seed, dose, bits = args.seed + index, DOSES[index % len(DOSES)], BITS[index % len(BITS)]
        laterality, view = views[index % len(views)]
        spec = phantom.PhantomSpec(args.size[0], args.size[1], view, laterality, bits, "MONOCHROME2",
                                   "FOR PRESENTATION", masses=1, calcification_clusters=1, dose=dose,
                                   test_objects=True)
        canonical, objects = phantom.render_with_test_objects(spec, np.random.default_rng(seed))
        stored = phantom._quantise(canonical, spec)
        top = float((1 << bits) - 1)
        for codec in codecs:
            for ratio in args.ratios:
                started = time.perf_counter()
                try:
                    stream, knob = lossy.encode_at_ratio(codec, stored, bits, ratio)
                except lossy.RatioNotReached as exc:
                    print(f"seed {seed}: {exc}", file=sys.stderr)
                    missed += 1
                    continue
                seconds = time.perf_counter() - started
                decoded = codec.decode(stream).astype(np.float32) / np.float32(top)
                result = lossy.score(codec.name, ratio, len(stream), canonical, decoded, objects)
                smallest = min(d for d, _ in result.contrast_kept)
                scores.append({
                    "image": f"seed{seed}-dose{dose:g}-{bits}bit", "codec": codec.name, "ratio_target": ratio,
                    "ratio": result.ratio, "bpp": 8 * len(stream) / stored.size, "knob": knob,
                    "psnr_breast": result.psnr_breast, "ms_ssim_breast": result.ms_ssim_breast,
                    "contrast_kept_mean": statistics.fmean(k for _, k in result.contrast_kept),
                    "contrast_kept_smallest": statistics.fmean(k for d, k in result.contrast_kept if d == smallest),
                    "search_s": seconds,
                })
    print(f"{args.count} physical phantoms of {args.size[0]}x{args.size[1]} with test objects, "
          f"seeds {args.seed}-{args.seed + args.count - 1}\n")
    print("| coder | target | achieved ratio | bpp | breast PSNR dB | MS-SSIM | test-object contrast kept (all) | (smallest disc) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for codec in codecs:
        for ratio in args.ratios:
            rows = [s for s in scores if s["codec"] == codec.name and s["ratio_target"] == ratio]
            if not rows:
                print(f"| {codec.name} | {ratio:g}:1 | missed | | | | | |")
                continue

            def mean(key: str, rows: list[dict[str, Any]] = rows) -> float:
                return statistics.fmean(r[key] for r in rows)

            print(f"| {codec.name} | {ratio:g}:1 | {mean('ratio'):.2f} | {mean('bpp'):.3f} | "
                  f"{mean('psnr_breast'):.2f} | {mean('ms_ssim_breast'):.5f} | {mean('contrast_kept_mean'):.3f} | "
                  f"{mean('contrast_kept_smallest'):.3f} |")
    curves = {}
    for codec in codecs:
        points = [(statistics.fmean(s["bpp"] for s in scores if s["codec"] == codec.name and s["ratio_target"] == r),
                   statistics.fmean(s["psnr_breast"] for s in scores
                                    if s["codec"] == codec.name and s["ratio_target"] == r))
                  for r in args.ratios
                  if any(s["codec"] == codec.name and s["ratio_target"] == r for s in scores)]
        curves[codec.name] = points
    if all(len(points) >= 4 for points in curves.values()):
        print(f"\nBD-rate of htj2k against jpeg2000 (breast PSNR, mean bpp per ratio): "
              f"{lossy.bd_rate(curves['jpeg2000'], curves['htj2k']):+.1f} %")
    if args.out is not None:
        args.out.write_text(json.dumps({"scores": scores, "curves": curves}, indent=2))
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
