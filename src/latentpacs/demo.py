"""The encode/decode demonstration behind ``latentpacs demo``.

Generates synthetic mammograms, archives each at every fidelity tier, decodes them back to
DICOM, and reports what each tier costs (bytes, ratio, time) and gives (the paper's MSE
at 1024 x 1024, the largest pixel error), with a figure of original, reconstruction and
difference map.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from statistics import median

import numpy as np

from latentpacs import phantom
from latentpacs.image import chain
from latentpacs.codec.engine import Engine, resize_bilinear
from latentpacs.codec.tiers import Tier
from latentpacs.evaluate.metrics import PAPER_SIZE, paper_mse
from latentpacs.image.pixels import read_file, stored_to_canonical, stored_values

TIERS = (Tier("latent"), Tier("near-lossless", 2), Tier("lossless"))


@dataclass(frozen=True)
class DemoRow:
    """One tier's figures, medians over the demo images."""

    tier: str
    latent_bytes: int
    stream_bytes: float
    ratio: float
    paper_mse: float
    image_variance: float
    max_abs_error: int
    encode_ms: float
    decode_ms: float


def run_demo(out: Path, engine: Engine, *, count: int, size: tuple[int, int], seed: int,
             dose: float | None = phantom.DEFAULT_DOSE, coder: str = "jpeg-ls") -> list[DemoRow]:
    """Generate ``count`` phantoms of ``size`` under ``out`` and round-trip them at every tier.

    ``dose`` is the physical phantom's (None: the plain white-noise phantom); ``coder``
    codes the stream tiers.
    """
    sources = phantom.generate(out / "original", count, seed, size=size, dose=dose)
    datasets = [read_file(path) for path in sources]
    originals = [stored_values(ds) for ds in datasets]
    rows = []
    for tier in TIERS:
        started = time.perf_counter()
        encoded = chain.encode(datasets, engine, tier, coder=coder)
        encode_s = time.perf_counter() - started
        started = time.perf_counter()
        returned = [chain.returned(item, engine) for item in encoded]
        decode_s = time.perf_counter() - started
        target = out / str(tier).replace(":", "-")
        target.mkdir(parents=True, exist_ok=True)
        errors, mses, variances = [], [], []
        for ds, (stored, module) in zip(returned, originals):
            ds.save_as(target / f"{ds.SOPInstanceUID}.dcm", enforce_file_format=True)
            decoded = ds.pixel_array.astype(np.int64)
            errors.append(int(np.abs(decoded - stored.astype(np.int64)).max()))
            original = stored_to_canonical(stored, module)
            mses.append(paper_mse(original, stored_to_canonical(decoded.astype(np.uint16), module)))
            variances.append(float(np.var(resize_bilinear(original, PAPER_SIZE))))
        rows.append(
            DemoRow(
                tier=str(tier),
                latent_bytes=len(encoded[0].latent),
                stream_bytes=median(len(e.stream) for e in encoded),
                ratio=median(e.ratio for e in encoded),
                paper_mse=median(mses),
                image_variance=median(variances),
                max_abs_error=max(errors),
                encode_ms=1000 * encode_s / len(datasets),
                decode_ms=1000 * decode_s / len(datasets),
            )
        )
        if tier.name == "latent":
            _figure(out / "latent-reconstruction.png", originals[0], returned[0])
    return rows


def _figure(path: Path, original: tuple[np.ndarray, object], returned: object) -> None:
    """Original, reconstruction and absolute difference side by side (paper Figs. 4-5)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stored, module = original
    image = stored_to_canonical(stored, module)  # type: ignore[arg-type]
    recon = stored_to_canonical(returned.pixel_array, module)  # type: ignore[attr-defined, arg-type]
    fig, axes = plt.subplots(1, 3, figsize=(12, 5))
    for ax, data, title, cmap in (
        (axes[0], image, "original", "gray"),
        (axes[1], recon, "latent reconstruction", "gray"),
        (axes[2], np.abs(image - recon), "|difference|", "magma"),
    ):
        shown = ax.imshow(data, cmap=cmap, vmin=0, vmax=1 if cmap == "gray" else None)
        ax.set_title(title)
        ax.axis("off")
    fig.colorbar(shown, ax=axes[2], fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def format_table(rows: list[DemoRow]) -> str:
    """A plain-text table of the demo's figures."""
    lines = [
        f"{'tier':<16} {'latent B':>8} {'stream B':>11} {'ratio':>10} {'MSE@1024':>10} "
        f"{'img var':>9} {'max err':>8} {'enc ms':>8} {'dec ms':>8}"
    ]
    for r in rows:
        lines.append(
            f"{r.tier:<16} {r.latent_bytes:>8} {r.stream_bytes:>11.0f} {r.ratio:>10.1f} "
            f"{r.paper_mse:>10.2e} {r.image_variance:>9.2e} {r.max_abs_error:>8} "
            f"{r.encode_ms:>8.1f} {r.decode_ms:>8.1f}"
        )
    return "\n".join(lines)
