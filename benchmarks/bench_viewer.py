"""The web viewer's time to first image: full-size mammograms in headless Chromium.

Run from the repository root::

    .venv/bin/python benchmarks/bench_viewer.py --count 4 --repeats 3
    .venv/bin/python benchmarks/bench_viewer.py --screenshot docs/viewer.png   # also the README's picture

For each of ``--tiers`` (default ``lossless`` and ``latent``) a fresh node with
``web.trust_loopback`` receives one study of ``--count`` phantom mammograms of
``--size`` (default 2294 x 1914, the first vendor size of ``latentpacs.phantom``) from
DCMTK ``storescu`` and codes it (the coding queue empties). Headless Chromium (the test
suite's, see ``tests/test_web_viewer.py``) then opens ``/``, and each repetition clicks
the study in the list and waits for the first image on the main canvas. Two figures per
repetition: the page's own (``performance.now()`` from the study route to the frame
drawn: QIDO-RS for the study and its instances, the viewer's summary, WADO-RS metadata
and frame 1, the window applied to every pixel, the canvas drawn) and the wall time
from the click as this script sees it; then the median time the page takes to redraw
the image after a window change (lookup table and every pixel, no request). Each repetition reloads the page, so no answer
comes from the browser (every request is sent with ``cache: "no-store"``). Nothing here
asserts: the medians are printed, every run is written to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

import pydicom  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

from latentpacs import phantom  # noqa: E402
from test_web_viewer import WINDOW_SIZE, _stored, chromium, coded, state  # noqa: E402
from webpeers import start_web_node  # noqa: E402


def first_image(driver: Any, url: str, study_uid: str) -> dict[str, float]:
    """Open the list, click the study, wait for its first image; the page's and the wall time."""
    driver.get(url + "/")
    link = WebDriverWait(driver, 120, poll_frequency=0.01).until(lambda d: d.find_elements(
        By.CSS_SELECTOR, f'tr[data-uid="{study_uid}"] a.study-link'))
    start = time.perf_counter()
    link[0].click()
    shown = WebDriverWait(driver, 600, poll_frequency=0.01).until(
        lambda d: s if (s := state(d))["timing"] is not None else None)
    wall = time.perf_counter() - start
    if shown["mode"] != "frames":
        raise RuntimeError(f"the page fell back to {shown['mode']}")
    # A window change redrawn from the frame in the page (no request): the redraw's time.
    redraws = []
    for step in range(1, 6):
        draws = state(driver)["draws"]
        driver.execute_script("""
            const [center, width] = [document.getElementById("wc"), document.getElementById("ww")];
            center.value = String(Number(center.value) + arguments[0]);
            width.value = String(Number(width.value) * 0.9);
            width.dispatchEvent(new Event("change"));
        """, 10 * step)
        redraws.append(WebDriverWait(driver, 60, poll_frequency=0.01).until(
            lambda d: s["renderMs"] if (s := state(d))["draws"] > draws else None) / 1000)
    # Let the thumbnails' decodes finish before the next run starts.
    WebDriverWait(driver, 600, poll_frequency=0.05).until(lambda d: d.execute_script(
        "return [...document.querySelectorAll('.thumb img')].every((i) => i.complete && i.naturalWidth > 0)"))
    return {"page_s": shown["timing"]["firstImageMs"] / 1000, "wall_s": wall,
            "redraw_s": statistics.median(redraws)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=4, help="images in the study")
    parser.add_argument("--size", type=int, nargs=2, default=list(phantom.VENDOR_SIZES[0]),
                        metavar=("ROWS", "COLS"))
    parser.add_argument("--tiers", nargs="+", default=["lossless", "latent"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None, help="JSON of every run")
    parser.add_argument("--screenshot", type=Path, default=None,
                        help="save the last latent-tier study page here (PNG)")
    args = parser.parse_args(argv)

    results: dict[str, list[dict[str, float]]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-viewer-") as scratch:
        root = Path(scratch)
        files = phantom.generate(root / "phantoms", args.count, seed=5, size=tuple(args.size),
                                 images_per_study=args.count)
        study_uid = pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID
        driver = chromium(root / "chromium")
        try:
            inner = driver.execute_script("return [window.innerWidth, window.innerHeight]")
            driver.set_window_size(2 * WINDOW_SIZE[0] - inner[0], 2 * WINDOW_SIZE[1] - inner[1])
            for tier in args.tiers:
                with start_web_node(root / tier, tier=tier, web={"trust_loopback": True}) as node:
                    _stored(node, files)
                    coded(node, None)
                    results[tier] = [first_image(driver, node.url, study_uid)
                                     for _ in range(args.repeats)]
                    if args.screenshot is not None and tier == "latent":
                        args.screenshot.parent.mkdir(parents=True, exist_ok=True)
                        driver.save_screenshot(str(args.screenshot))
        finally:
            driver.quit()

    rows, cols = args.size
    print(f"time to first image, {rows}x{cols}, {args.count} images in the study, "
          f"median of {args.repeats}")
    for tier, runs in results.items():
        print(f"  {tier:<10} page {statistics.median(r['page_s'] for r in runs):6.2f} s   "
              f"click to drawn {statistics.median(r['wall_s'] for r in runs):6.2f} s   "
              f"window redraw {1000 * statistics.median(r['redraw_s'] for r in runs):5.0f} ms")
    if args.out is not None:
        args.out.write_text(json.dumps({"size": args.size, "count": args.count, "runs": results},
                                       indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
