"""The evaluation's figures, drawn only from the files the evaluator wrote.

Reads ``metrics.csv``, ``rate_distortion.csv``, ``summary.json`` and ``previews.npz``
(:mod:`~latentpacs.evaluate.records`) and writes PNGs under ``figures/``: the paper's
Fig. 2 (MSE per image), Fig. 3 (efficiency per image), Fig. 4 (originals and
reconstructions), Fig. 5 (absolute difference maps), and beyond the paper a
rate-distortion plot (JPEG and JPEG 2000 over their settings, the latent codecs and tiers
as points, the lossless coders as lines) and the storage cost of every codec.
"""

from __future__ import annotations

import itertools
import logging
from pathlib import Path
from typing import Any

import numpy as np

from latentpacs.evaluate import records

logger = logging.getLogger(__name__)

FIGURES_DIR = "figures"
#: File name -> caption, in report order.
FIGURES = {
    "fig2-mse-per-image.png": "Fig. 2: the paper's MSE (1024 x 1024, [0, 1]) of every image, per codec.",
    "fig3-efficiency-per-image.png": "Fig. 3: efficiency (1 - MSE) / ln(bits) of every image, per codec.",
    "fig4-reconstructions.png": "Fig. 4: originals and their reconstructions.",
    "fig5-difference-maps.png": "Fig. 5: absolute difference maps |original - reconstruction|, computed at native "
    "resolution, each codec on its own colour scale.",
    "rate-distortion.png": "Rate-distortion: median MSE against median bits per pixel (jpeg: the paper's "
    "protocol, 1024 x 1024 files; jpeg-native and jpeg2000: native-size files).",
    "storage-cost.png": "Storage cost: median bits per pixel of every codec and tier.",
}
#: The lossless-coder comparison's figure (only when the run measured it, ``summary["coders"]``).
CODER_FIGURE = ("lossless-coders.png", "Lossless and near-lossless coders: mean bits per pixel of every coder at "
                "each NEAR (native bit depth, every stream verified).")


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _per_image(plt: Any, rows: list[records.MetricRow], measure: str, path: Path, log: bool) -> None:
    images = list(dict.fromkeys(r.image for r in rows))
    index = {image: i for i, image in enumerate(images)}
    fig, ax = plt.subplots(figsize=(8, max(3.0, 0.18 * len(images) + 2)))
    for codec in dict.fromkeys(r.codec for r in rows):
        mine = [r for r in rows if r.codec == codec and np.isfinite(getattr(r, measure))]
        if log and any(getattr(r, measure) <= 0 for r in mine):
            continue  # exact codecs have no place on a log axis
        ax.scatter([getattr(r, measure) for r in mine], [index[r.image] for r in mine], label=codec, s=18, alpha=0.8)
    if log:
        ax.set_xscale("log")
    ax.set_xlabel(measure)
    ax.set_ylabel("image index")
    ax.legend(fontsize=8, loc="best")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _grid(plt: Any, previews: Any, labels: list[str], path: Path, diff: bool) -> None:
    """Originals and reconstructions, or difference maps (each column on its own scale)."""
    count = len({key.split("/")[0] for key in previews.files})
    columns = labels if diff else ["original", *labels]
    fig, axes = plt.subplots(count, len(columns), figsize=(2.6 * len(columns), 3.0 * count), squeeze=False)
    for j, column in enumerate(columns):
        keys = [f"{i}/{column}/diff" if diff else f"{i}/{column}" for i in range(count)]
        vmax = max(float(previews[k].max()) for k in keys) if diff else 1.0
        for i, key in enumerate(keys):
            ax = axes[i][j]
            ax.imshow(previews[key].astype(np.float32), cmap="magma" if diff else "gray", vmin=0, vmax=vmax or 1.0)
            ax.set_title(f"|{column} - original|, 0..{vmax:.2g}" if diff else column, fontsize=8)
            ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _rate_distortion(plt: Any, summary: dict[str, Any], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(8, 5.5))
    styles = itertools.cycle([":", "--", "-."])
    for codec, curve in summary["rate_distortion"].items():
        ax.plot([p["bpp"] for p in curve], [p["mse"] for p in curve], marker="o", label=f"{codec} (settings {curve[0]['setting']:g}..{curve[-1]['setting']:g})")
    for codec, stats in summary["codecs"].items():
        bpp, mse = stats["bpp"]["median"], stats["mse"]["median"]
        if stats["kind"] == "lossless":
            ax.axvline(bpp, linestyle=next(styles), color="grey", label=f"{codec} (exact)")
        elif mse and mse > 0:
            ax.scatter([bpp], [mse], marker="*" if stats["kind"] == "learned" else "D", s=120, zorder=3, label=codec)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("bits per pixel (native resolution)")
    ax.set_ylabel("MSE at 1024 x 1024, [0, 1]")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _storage(plt: Any, summary: dict[str, Any], path: Path) -> None:
    codecs = summary["codecs"]
    names = list(codecs)
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(names) + 1.5))
    ax.barh(names, [codecs[n]["bpp"]["median"] for n in names], color="tab:blue")
    ax.set_xscale("log")
    ax.set_xlabel("median bits per pixel (native resolution, log scale)")
    ax.invert_yaxis()
    ax.grid(alpha=0.3, axis="x", which="both")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def coder_figure(coders: dict[str, Any], path: Path) -> Path:
    """Bars of mean bpp per coder, grouped by NEAR, from :func:`latentpacs.evaluate.coders.summarise`."""
    plt = _pyplot()
    rows = [r for r in coders["rows"] if "mean_bpp" in r]
    nears = sorted({r["near"] for r in rows})
    names = list(dict.fromkeys(r["coder"] for r in rows))
    colours = {name: f"C{i % 10}" for i, name in enumerate(names)}
    fig, ax = plt.subplots(figsize=(8, 4.5))
    labelled: set[str] = set()
    for j, near in enumerate(nears):
        group = [r for r in rows if r["near"] == near]  # the coders measured at this NEAR, centred on it
        width = 0.8 / len(group)
        for i, row in enumerate(group):
            name = row["coder"]
            bar = ax.bar(j + (i - (len(group) - 1) / 2) * width, row["mean_bpp"], width, color=colours[name],
                         label=None if name in labelled else name, hatch="xx" if row["failed"] else None)
            ax.bar_label(bar, fmt="%.2f", fontsize=6)
            labelled.add(name)
    ax.set_xticks(range(len(nears)), [f"NEAR={n}" for n in nears])
    ax.set_ylabel("mean bits per pixel")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_figures(out: Path) -> list[Path]:
    """Draw every figure of :data:`FIGURES` from the evaluation files under ``out``."""
    plt = _pyplot()
    rows = records.read_metrics(out / records.METRICS_CSV)
    summary = records.read_summary(out / records.SUMMARY_JSON)
    target = out / FIGURES_DIR
    target.mkdir(parents=True, exist_ok=True)
    names = list(FIGURES)
    _per_image(plt, rows, "mse", target / names[0], log=True)
    _per_image(plt, rows, "efficiency", target / names[1], log=False)
    order = summary["codec_order"]
    labels = [*order["learned"], order["jpeg"], *([order["jpeg_native"]] if "jpeg_native" in order else [])]
    with np.load(out / records.PREVIEWS_NPZ) as previews:
        _grid(plt, previews, labels, target / names[2], diff=False)
        _grid(plt, previews, labels, target / names[3], diff=True)
    _rate_distortion(plt, summary, target / names[4])
    _storage(plt, summary, target / names[5])
    written = [target / name for name in names]
    if "coders" in summary:
        written.append(coder_figure(summary["coders"], target / CODER_FIGURE[0]))
    logger.info("wrote %d figures under %s", len(written), target)
    return written
