"""The 16-byte latent of every model against PCA-16, on phantoms no model saw.

Run from the repository root::

    .venv/bin/python benchmarks/bench_latent.py
    .venv/bin/python benchmarks/bench_latent.py --models ae vae pca --count 32

Images are fresh phantoms (:func:`latentpacs.phantom.generate` with ``--seed``, default
424242, which no shipped model trained on; one image per study). Each is read as the
archive reads it (:func:`latentpacs.image.pixels.read_file`, ``to_canonical``), encoded to
its stored latent and decoded by the product's engine (integer decoding), and measured by
the paper's protocol (:func:`latentpacs.evaluate.metrics.paper_mse`: both images resized
bilinearly to 1024 x 1024). ``mse/var`` divides each image's MSE by the variance of its
resized original, so images of different contrast weigh alike; 0 is perfect, 1 is the
mean grey level of the image.

Printed: a Markdown table (model, latent bytes, mean and median MSE, mean and median
mse/var, mse/var relative to ``pca`` when it is measured) and each model's card line.
``--record`` writes the measurement into each model's card as ``metrics.test_*`` (the
figures ``tests/test_shipped_models.py`` checks); the weights, and so their SHA-256, are
not touched. Nothing here asserts a target.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from latentpacs.cli import parse_size  # light: no numpy, torch or BLAS loaded

FRESH_SEED = 424242


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The benchmark's options."""
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    p.add_argument("--models", nargs="+", default=["ae", "vae", "pca"], help="default: ae vae pca")
    p.add_argument("--count", type=int, default=8, help="fresh phantoms (default 8, as the cards)")
    p.add_argument("--seed", type=int, default=FRESH_SEED, help=f"their seed (default {FRESH_SEED})")
    p.add_argument("--size", type=parse_size, default=(1024, 832), metavar="ROWSxCOLS", help="default 1024x832")
    p.add_argument("--models-dir", type=Path, help="default: the shipped models/")
    p.add_argument("--record", action="store_true", help="write the figures into the cards (metrics.test_*)")
    p.add_argument("--out", type=Path, help="write the figures as JSON here")
    args = p.parse_args(argv)
    if args.count < 1:
        p.error("--count must be at least 1")
    return args


def measure(name: str, images: Sequence[Any], models_dir: Path | None) -> dict[str, Any]:
    """MSE and mse/var of one model over ``images`` (canonical arrays), through its latent bytes."""
    import numpy as np

    from latentpacs.codec.engine import Engine, resize_bilinear
    from latentpacs.codec.modelfile import load_model
    from latentpacs.evaluate.metrics import PAPER_SIZE, paper_mse

    loaded = load_model(name, models_dir=models_dir)
    with Engine(loaded) as engine:
        latents = engine.encode(list(images))
        recons = engine.decode(latents, [img.shape for img in images])
    errors = [paper_mse(img, rec) for img, rec in zip(images, recons, strict=True)]
    variances = [float(np.var(resize_bilinear(img, PAPER_SIZE))) for img in images]
    normalised = [e / v for e, v in zip(errors, variances, strict=True)]
    return {
        "model": name, "arch": loaded.card.arch, "sha256": loaded.card.sha256,
        "latent_bytes": len(latents[0]), "description": loaded.card.description,
        "mse_per_image": errors, "variance_per_image": variances,
        "mse": statistics.fmean(errors), "mse_median": statistics.median(errors),
        "mse_min": min(errors), "mse_max": max(errors),
        "mse_over_variance": statistics.fmean(normalised),
        "mse_over_variance_median": statistics.median(normalised),
        "variance_median": statistics.median(variances),
    }


def table(rows: Sequence[dict[str, Any]]) -> str:
    """The Markdown table of :func:`measure`'s rows."""
    base = next((r["mse_over_variance"] for r in rows if r["arch"] == "pca"), None)
    lines = ["| model | arch | latent bytes | mean MSE | median MSE | mean mse/var | median mse/var | mse/var vs pca |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        versus = f"{r['mse_over_variance'] / base:.2f}x" if base else ""
        lines.append(f"| {r['model']} | {r['arch']} | {r['latent_bytes']} | {r['mse']:.5f} | {r['mse_median']:.5f} "
                     f"| {r['mse_over_variance']:.4f} | {r['mse_over_variance_median']:.4f} | {versus} |")
    return "\n".join(lines)


def _record(row: dict[str, Any], args: argparse.Namespace) -> None:
    """Write the measurement into the model's card as ``metrics.test_*``."""
    import torch

    from latentpacs.codec.cards import default_models_dir, weights_path

    weights = weights_path(row["model"], args.models_dir or default_models_dir())
    card_path = weights.with_suffix(".json")
    card = json.loads(card_path.read_text(encoding="utf-8"))
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    metrics = card.setdefault("metrics", {})
    metrics.update({
        "test_images": args.count,
        "test_mse": row["mse"], "test_mse_median": row["mse_median"],
        "test_mse_min": row["mse_min"], "test_mse_max": row["mse_max"],
        "test_mse_per_image": row["mse_per_image"],
        "test_mse_over_variance": row["mse_over_variance"],
        "test_mse_over_variance_median": row["mse_over_variance_median"],
        "test_image_variance_median": row["variance_median"],
        "test_set": (f"{args.count} fresh phantoms, never seen in training and used to choose nothing: "
                     f"latentpacs.phantom.generate(DIR, {args.count}, {args.seed}, size={tuple(args.size)}, "
                     "images_per_study=1)"),
        "test_protocol": "benchmarks/bench_latent.py --record: each image read with latentpacs.image.pixels."
                         "read_file + to_canonical, encoded and decoded by latentpacs.codec.engine.Engine through "
                         "the stored latent; MSE by latentpacs.evaluate.metrics.paper_mse (both images resized "
                         "bilinearly to 1024x1024); mse/var divides by the variance of the resized original",
        "test_measured_with": f"torch {torch.__version__}, CPU, {datetime.date.today().isoformat()}, "
                              f"the engine's integer-valued decoding (commit {commit})",
    })
    card_path.write_text(json.dumps(card, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def main(argv: Sequence[str] | None = None) -> int:
    """Measure and print; 0 on success."""
    args = parse_args(argv)
    from tqdm import tqdm

    from latentpacs import phantom
    from latentpacs.image.pixels import read_file, to_canonical

    with tempfile.TemporaryDirectory() as tmp:
        paths = phantom.generate(Path(tmp), args.count, args.seed, size=args.size, images_per_study=1)
        images = [to_canonical(read_file(p))[0] for p in tqdm(paths, desc="reading", unit="image", file=sys.stderr)]
    rows = [measure(name, images, args.models_dir) for name in tqdm(args.models, desc="models", file=sys.stderr)]
    print(f"{args.count} fresh phantoms of {args.size[0]}x{args.size[1]}, seed {args.seed}; paper protocol "
          "(1024x1024); mse/var per image\n")
    print(table(rows))
    print()
    for r in rows:
        print(f"{r['model']}: {r['description']} (sha256 {r['sha256'][:12]}...)")
    if args.record:
        for r in rows:
            _record(r, args)
    if args.out:
        args.out.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
