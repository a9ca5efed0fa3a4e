"""``report.html``: one self-contained page with the evaluation's tables and figures.

Built only from ``summary.json`` and the PNGs under ``figures/``; every figure is embedded
as a base64 ``data:`` URI, so the page reads offline and can be mailed as one file. A
short script marks ``<html data-figures="LOADED/TOTAL">`` once the page has loaded and
shows a warning when a figure failed to decode.
"""

from __future__ import annotations

import base64
import html
import logging
from pathlib import Path
from typing import Any

from latentpacs.evaluate import records
from latentpacs.evaluate.plots import CODER_FIGURE, FIGURES, FIGURES_DIR

logger = logging.getLogger(__name__)

REPORT_HTML = "report.html"

_STYLE = """
body { font-family: sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }
th, td { border: 1px solid #bbb; padding: 0.25em 0.6em; text-align: right; }
th:first-child, td:first-child { text-align: left; }
figure { margin: 1.5em 0; } figure img { max-width: 100%; border: 1px solid #ddd; }
#figure-warning { display: none; background: #fdd; padding: 0.5em; }
"""
_SCRIPT = """
window.addEventListener('load', function () {
  var images = document.images, loaded = 0;
  for (var i = 0; i < images.length; i++) {
    if (images[i].complete && images[i].naturalWidth > 0) { loaded++; }
  }
  document.documentElement.setAttribute('data-figures', loaded + '/' + images.length);
  if (loaded < images.length) {
    var warning = document.getElementById('figure-warning');
    warning.textContent = (images.length - loaded) + ' figure(s) failed to load.';
    warning.style.display = 'block';
  }
});
"""


def _number(value: float | None, stats: dict[str, Any] | None = None, digits: int = 4) -> str:
    if value is None:
        return "&infin;" if stats and stats.get("infinite") else "&ndash;"
    if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e5):
        return f"{value:.{digits - 1}e}"
    return f"{value:.{digits}g}"


def _cell(stats: dict[str, Any]) -> str:
    median = _number(stats["median"], stats)
    if stats["q25"] is None or stats["q75"] is None or stats["q25"] == stats["q75"]:
        return f"<td>{median}</td>"
    return f"<td>{median}<br><small>{_number(stats['q25'])} &ndash; {_number(stats['q75'])}</small></td>"


def _codec_table(codecs: dict[str, Any], measures: tuple[str, ...]) -> str:
    head = "".join(f"<th>{m}</th>" for m in measures)
    body = "".join(
        f"<tr><td>{html.escape(name)}</td><td>{html.escape(c['kind'])}</td>"
        + "".join(_cell(c[m]) for m in measures) + "</tr>"
        for name, c in codecs.items()
    )
    return f"<table><tr><th>codec</th><th>kind</th>{head}</tr>{body}</table>"


def _rd_table(curves: dict[str, list[dict[str, float]]]) -> str:
    body = "".join(
        f"<tr><td>{html.escape(codec)}</td><td>{p['setting']:g}</td><td>{_number(p['bpp'])}</td>"
        f"<td>{p['bits']:.0f}</td><td>{_number(p['mse'])}</td></tr>"
        for codec, curve in curves.items() for p in curve
    )
    return f"<table><tr><th>codec</th><th>setting</th><th>bpp</th><th>bits</th><th>MSE</th></tr>{body}</table>"


def _models(models: dict[str, Any]) -> str:
    body = "".join(
        f"<tr><td>{html.escape(n)}</td><td>{html.escape(m['arch'])}</td><td>{m['latent_bytes']}</td>"
        f"<td><code>{html.escape(m['sha256'])}</code></td></tr>"
        for n, m in models.items()
    )
    return f"<table><tr><th>model</th><th>arch</th><th>latent bytes</th><th>sha256</th></tr>{body}</table>"


def _figure(path: Path, caption: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    alt = html.escape(caption)
    return f'<figure><img src="data:image/png;base64,{data}" alt="{alt}"><figcaption>{alt}</figcaption></figure>'


def _dicom_files(dicom: dict[str, list[str]] | None) -> str:
    """The DICOM objects the run wrote (:mod:`~latentpacs.evaluate.sr`, :mod:`~latentpacs.evaluate.dicom_maps`)."""
    if not dicom:
        return ""
    reports, maps = dicom.get("structured_reports", []), dicom.get("difference_maps", [])
    items = "".join(f"<li><code>{html.escape(p)}</code></li>" for p in reports)
    return (
        "<h2>DICOM objects</h2>"
        f"<p>{len(reports)} TID 1500 measurement report(s), one per study (the numbers above per image and codec), "
        f"and {len(maps)} parametric map(s) of |reconstruction - original| under <code>dicom/maps/</code>; "
        "send them to a PACS with e.g. <code>storescu -R +sd +r -aec AET HOST PORT dicom/</code>.</p>"
        f"<ul>{items}</ul>"
    )


def _coders(coders: dict[str, Any] | None, figures_dir: Path) -> str:
    """The lossless-coder comparison (:mod:`~latentpacs.evaluate.coders`), when the run measured it."""
    if not coders:
        return ""
    head = ("coder", "NEAR", "images", "mean bpp", "ratio (16-bit)", "vs JPEG-LS", "bpp in breast", "encode ms",
            "decode ms", "max error")
    body = []
    for r in coders["rows"]:
        cells = [html.escape(r["coder"]), str(r["near"]), str(r["images"])]
        if "mean_bpp" in r:
            vs = r["vs_reference_percent"]
            cells += [_number(r["mean_bpp"]), f"{_number(r['ratio_allocated'])}:1",
                      "&ndash;" if vs is None else f"{vs:+.1f}%", _number(r["mean_breast_bpp"]),
                      f"{r['median_encode_ms']:.0f}", f"{r['median_decode_ms']:.0f}", str(r["max_abs_error"])]
        else:
            cells += ["&ndash;"] * 7
        if r["failed"]:
            cells[2] += f' <strong class="failed">FAILED on {r["failed"]}</strong>'
        body.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    failures = "".join(
        f"<li>{html.escape(f['coder'])} NEAR={f['near']} on {html.escape(f['image'])}: {html.escape(f['reason'])}</li>"
        for f in coders["failures"])
    unavailable = "".join(f"<li>{html.escape(n)}: {html.escape(why)}</li>" for n, why in coders["unavailable"].items())
    figure = figures_dir / CODER_FIGURE[0]
    return "".join([
        '<h2 id="lossless-coders">Lossless and near-lossless coders</h2>',
        "<p>Every stream coder at each NEAR and the classical lossless coders at the native bit depth; each stream "
        "was decoded and verified (bit-exact, or every value within NEAR) before its size counted. Ratio against "
        "16 bits allocated; vs JPEG-LS is the mean bpp relative to JPEG-LS at the same NEAR; bits per breast pixel "
        "counts all bits over the breast region; times are medians of one call per image.</p>",
        "<table><tr>" + "".join(f"<th>{h}</th>" for h in head) + "</tr>" + "".join(body) + "</table>",
        f'<h3>Verification failures</h3><ul class="failed">{failures}</ul>' if failures else "",
        f"<h3>Coders not measured</h3><ul>{unavailable}</ul>" if unavailable else "",
        _figure(figure, CODER_FIGURE[1]) if figure.is_file() else "",
    ])


def render(summary: dict[str, Any], figures_dir: Path) -> str:
    """The report page as an HTML string."""
    codecs = summary["codecs"]
    skipped = "".join(f"<li>{html.escape(s['path'])}: {html.escape(s['reason'])}</li>" for s in summary.get("skipped", []))
    parts = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        "<title>latentpacs evaluation</title>", f"<style>{_STYLE}</style></head><body>",
        "<h1>latentpacs evaluation</h1>", '<p id="figure-warning"></p>',
        f"<p>{summary['images']} image(s). Cells show the median and, below it, the interquartile range.</p>",
        "<h2>The paper's measures</h2>",
        "<p>MSE, PSNR and SSIM on images scaled to [0, 1] and resized bilinearly to 1024 x 1024; "
        "bits = 8 x the stored encoding's bytes; efficiency = (1 - MSE) / ln(bits) (Eq. 3). "
        "jpeg-qQ is the paper's baseline: the image resized to 1024 x 1024, then JPEG (bits of that file); "
        "jpeg-qQ-native codes the native matrix (bits of the native-size file). mse_over_variance is the MSE "
        "over the variance of the resized original; pca, principal components fitted on the models' training "
        "images, is the linear baseline a learned latent must beat.</p>",
        _codec_table(codecs, ("mse", "mse_over_variance", "psnr", "ssim", "bits", "efficiency")),
        "<h2>At native resolution and bit depth: what each option costs</h2>",
        "<p>Bits per pixel, PSNR over the whole image and over the breast region, and the largest "
        "error in stored values. Tiers are a model's latent plus a JPEG-LS stream.</p>",
        _codec_table(codecs, ("bpp", "psnr_native", "psnr_breast", "max_abs_error")),
        "<h2>Rate-distortion settings</h2>",
        "<p>JPEG by quality (jpeg: the paper's 1024 x 1024 protocol; jpeg-native: the native matrix), "
        "JPEG 2000 (native) by target PSNR (dB); medians over the images.</p>",
        _rd_table(summary["rate_distortion"]), _coders(summary.get("coders"), figures_dir),
        "<h2>Models</h2>", _models(summary["models"]),
        "<h2>Figures</h2>",
        *[_figure(figures_dir / name, caption) for name, caption in FIGURES.items()],
    ]
    parts.append(_dicom_files(summary.get("dicom")))
    if skipped:
        parts.append(f"<h2>Skipped inputs</h2><ul>{skipped}</ul>")
    parts.append(f"<script>{_SCRIPT}</script></body></html>")
    return "\n".join(parts)


def write_report(out: Path) -> Path:
    """Write ``report.html`` under ``out`` from its ``summary.json`` and figures."""
    summary = records.read_summary(out / records.SUMMARY_JSON)
    path = out / REPORT_HTML
    path.write_text(render(summary, out / FIGURES_DIR), encoding="utf-8")
    logger.info("wrote %s", path)
    return path
