"""What bounds the node's speed: the per-image cost of each step it cannot skip.

Run from the repository root, on a quiet machine::

    .venv/bin/python benchmarks/bounds.py --count 4

On ``--count`` distinct 2294x1914 phantoms it times, per image (best of ``--repeats``):

* JPEG-LS (CharLS through :mod:`latentpacs.codec.charls`) encode and decode, alone and
  two at once on two threads (the GIL is released, so two cores share the work);
* the integer decoder of the shipped ``ae`` (``Engine.decode`` to the original size);
* the encoder (``Engine.encode`` of the canonical image);
* the pixel SHA-256 and the header kept as DICOM JSON, which every store pays.

It prints milliseconds per image and the images per second each step allows; nothing is
asserted. Compare them with a server's images/s in ``bench.py`` of the same machine: a
step slower than Orthanc's whole per-image time bounds the node below Orthanc.
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import pydicom

from latentpacs import phantom
from latentpacs.codec import jpegls
from latentpacs.dicomjson import header_json
from latentpacs.image.pixels import cells_sha256, pixel_cells, stored_to_canonical
from latentpacs.service import open_engines
from latentpacs.config import load_config


def best(repeats: int, work: Callable[[], object]) -> float:
    """The shortest of ``repeats`` runs of ``work``, seconds."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        work()
        times.append(time.perf_counter() - start)
    return min(times)


def two_at_once(items: Sequence[object], work: Callable[[object], object]) -> float:
    """Seconds to run ``work`` over ``items`` on two threads at once (half each)."""
    halves = [items[0::2], items[1::2]]
    threads = [threading.Thread(target=lambda part=part: [work(item) for item in part])
               for part in halves]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return time.perf_counter() - start


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--count", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=11)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as work:
        paths = phantom.generate(Path(work), args.count, args.seed, size=(2294, 1914))
        datasets = [pydicom.dcmread(path) for path in paths]
    decoded = [pixel_cells(ds) for ds in datasets]
    streams = [jpegls.encode_stream(cells, module.bits_stored, 0) for cells, module in decoded]
    canonical = [stored_to_canonical(cells, module) for cells, module in decoded]
    config = load_config(None, environ={}, overrides={"codec.tier": "latent"})
    engines = open_engines(config)
    engine = engines.primary
    latents = engine.encode(canonical)
    shape = [(module.rows, module.columns) for _, module in decoded]
    n = args.count
    rows: list[tuple[str, float]] = [
        ("JPEG-LS encode, 1 thread", sum(best(args.repeats, lambda c=c, m=m: jpegls.encode_stream(
            c, m.bits_stored, 0)) for c, m in decoded) / n),
        ("JPEG-LS decode, 1 thread", sum(best(args.repeats, lambda s=s: jpegls.decode_stream(s))
                                         for s in streams) / n),
        ("JPEG-LS decode, 2 threads at once", min(
            two_at_once(streams, jpegls.decode_stream) for _ in range(args.repeats)) / n),
        ("integer decoder to 2294x1914 (Engine.decode)", sum(best(
            args.repeats, lambda lt=lt, sh=sh: engine.decode([lt], [sh]))
            for lt, sh in zip(latents, shape)) / n),
        ("encoder (Engine.encode)", sum(best(args.repeats, lambda im=im: engine.encode([im]))
                                        for im in canonical) / n),
        ("pixel SHA-256", sum(best(args.repeats, lambda c=c, m=m: cells_sha256(c, m))
                              for c, m in decoded) / n),
        ("header as DICOM JSON", sum(best(args.repeats, lambda ds=ds: header_json(ds))
                                     for ds in datasets) / n),
    ]
    engines.close()
    print(f"{'step (per 2294x1914 image)':<48} {'ms':>8} {'images/s':>9}")
    for name, seconds in rows:
        print(f"{name:<48} {seconds * 1000:>8.1f} {1 / seconds:>9.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
