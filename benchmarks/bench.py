"""latentpacs benchmark: the node against DCMTK storescp and Orthanc, and the engine per device.

Run from the repository root::

    .venv/bin/python benchmarks/bench.py --count 20 --out bench.json

In one run, on one machine and one set of synthetic mammograms (``latentpacs.phantom``,
one study of ``--count`` distinct images of ``--size``), it measures

* ingest: DCMTK ``storescu`` sending every image in one association (PS3.4 Annex B) into
  the node, into ``storescp`` writing Part 10 files, and into Orthanc; each server fresh
  for each repetition;
* retrieve: DCMTK ``getscu`` C-GET of the study (PS3.4 C.4.3) from the node and from Orthanc;
* the inference engine: encode and decode throughput at the model's input size for batch
  sizes 1, 4, 8, 16 on the CPU and on CUDA when available;
* training: images per second of the model's training step, projected to the paper's
  637 images x 1000 epochs;
* the node's peak resident memory (VmHWM) after ingest and retrieval.

Each network phase runs ``--repeats`` times; the table shows the median (the JSON keeps
every run). Ratios compare speeds (images/s) measured in this same run. Nothing here
asserts a target: the figures are printed and written to ``--out``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pydicom
import torch
from tqdm import tqdm

from bench_peers import (
    BenchError,
    Server,
    getscu_study,
    start_node,
    start_orthanc,
    start_pynetdicom_floor,
    start_storescp,
    storescu,
)

from latentpacs import phantom
from latentpacs.codec.engine import Engine
from latentpacs.codec.modelfile import load_model
from latentpacs.codec.models import build_model

logger = logging.getLogger("bench")

PAPER_TRAIN_IMAGES = 637
PAPER_EPOCHS = 1000


@dataclass(frozen=True)
class Timing:
    """One measured phase: ``runs`` are wall seconds of each repetition."""

    phase: str
    target: str
    images: int
    megabytes: float
    runs: tuple[float, ...]
    notes: dict[str, float | int | str] = field(default_factory=dict)

    @property
    def seconds(self) -> float:
        """The median run."""
        return statistics.median(self.runs)

    @property
    def images_per_s(self) -> float:
        """Images per second of the median run."""
        return self.images / self.seconds

    @property
    def mb_per_s(self) -> float:
        """Megabytes (10**6 bytes of pixel data) per second of the median run."""
        return self.megabytes / self.seconds

    def as_json(self) -> dict[str, object]:
        """All fields plus the derived figures."""
        return {**asdict(self), "seconds": self.seconds, "images_per_s": self.images_per_s,
                "mb_per_s": self.mb_per_s}


def make_data(root: Path, count: int, size: tuple[int, int], seed: int) -> tuple[list[Path], str, float]:
    """``count`` phantom mammograms in one study; returns files, Study Instance UID, MB of pixels."""
    files = phantom.generate(root, count, seed, size=size, images_per_study=count)
    first = pydicom.dcmread(files[0], stop_before_pixels=True)
    pixel_mb = sum(len(pydicom.dcmread(f).PixelData) for f in files) / 1e6
    return files, str(first.StudyInstanceUID), pixel_mb


def bench_ingest(work: Path, files: Sequence[Path], pixel_mb: float, repeats: int,
                 node_settings: dict[str, str | int], node_env: dict[str, str],
                 bar: tqdm) -> tuple[list[Timing], Server, Server]:
    """storescu into each peer ``repeats`` times; the last node and Orthanc stay running."""
    starters: dict[str, Callable[[Path], Server]] = {
        "storescp": start_storescp,
        "orthanc": start_orthanc,
        "node": lambda d: start_node(d, settings=node_settings, env=node_env),
    }
    runs: dict[str, list[float]] = {name: [] for name in starters}
    kept: dict[str, Server] = {}
    for rep in range(repeats):
        for name, start in starters.items():
            server = start(work / "ingest" / f"{name}-{rep}")
            try:
                runs[name].append(storescu(server, files))
            finally:
                if rep == repeats - 1 and name != "storescp":
                    kept[name] = server
                else:
                    server.stop()
            bar.update(1)
    timings = [Timing("ingest", name, len(files), pixel_mb, tuple(r)) for name, r in runs.items()]
    return timings, kept["node"], kept["orthanc"]


def bench_get(work: Path, servers: Sequence[Server], study_uid: str, count: int,
              pixel_mb: float, repeats: int, bar: tqdm, max_pdu: int | None = None) -> list[Timing]:
    """C-GET the study from each server ``repeats`` times; every image must arrive."""
    runs: dict[str, list[float]] = {s.name: [] for s in servers}
    for rep in range(repeats):
        for server in servers:
            out = work / "get" / f"{server.name}-{rep}"
            runs[server.name].append(getscu_study(server, study_uid, out, max_pdu))
            got = len(list(out.iterdir()))
            if got != count:
                raise BenchError(f"C-GET from {server.name} returned {got} of {count} images")
            shutil.rmtree(out)
            bar.update(1)
    notes: dict[str, float | int | str] = {"getscu_max_pdu": max_pdu or 16384}
    return [Timing("c-get", name, count, pixel_mb, tuple(r), notes) for name, r in runs.items()]


def _best_of(repeats: int, work: Callable[[], object]) -> tuple[float, ...]:
    work()  # warm-up: allocator, kernels, threads
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        work()
        times.append(time.perf_counter() - start)
    return tuple(times)


def bench_engine(device: str, batch_sizes: Sequence[int], repeats: int, bar: tqdm) -> list[Timing]:
    """Encode (images at the model size -> latents) and decode (latent bytes -> images)."""
    loaded = load_model("ae")
    size = loaded.model.image_size
    rng = np.random.default_rng(0)
    timings = []
    for batch in batch_sizes:
        images = rng.random((batch, size, size), dtype=np.float32)
        with Engine(loaded, device=device, max_batch=batch) as engine:
            latents = engine.encode(list(images))
            runs = _best_of(repeats, lambda: engine.encode_resized(images))
            timings.append(Timing("encode", f"{device} batch {batch}", batch,
                                  images.nbytes / 1e6, runs, {"size": size}))
            shapes = [(size, size)] * batch
            runs = _best_of(repeats, lambda: engine.decode(latents, shapes))
            timings.append(Timing("decode", f"{device} batch {batch}", batch,
                                  images.nbytes / 1e6, runs, {"size": size}))
        bar.update(1)
    return timings


def bench_train(device: str, images: int, batch: int, bar: tqdm) -> Timing:
    """Training steps (forward, the model's loss, backward, Adam) at the shipped model's size."""
    card = load_model("ae").card
    model = build_model(card.arch, image_size=card.image_size, latent_dim=card.latent_dim,
                        latent_bits=card.latent_bits).to(device).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    data = torch.rand((batch, 1, card.image_size, card.image_size), device=device)
    steps = max(1, images // batch)

    def epoch() -> None:
        for _ in range(steps):
            with torch.autocast("cuda", torch.float16, enabled=device.startswith("cuda")):
                out = model(data)
            as_float = {f.name: getattr(out, f.name).float() for f in dataclasses.fields(out)
                        if isinstance(getattr(out, f.name), torch.Tensor)}
            loss = model.loss(data, dataclasses.replace(out, **as_float))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    runs = _best_of(1, epoch)
    bar.update(1)
    seen = steps * batch
    projected = PAPER_TRAIN_IMAGES * PAPER_EPOCHS / (seen / statistics.median(runs))
    return Timing("train", f"{device} batch {batch}", seen, 0.0, runs,
                  {"projected_paper_run_s": round(projected, 1), "arch": card.arch})


def machine() -> dict[str, object]:
    """What the figures were measured on."""
    info: dict[str, object] = {
        "cpu_count": os.cpu_count(), "affinity": len(os.sched_getaffinity(0)),
        "platform": platform.platform(), "python": sys.version.split()[0],
        "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.is_available(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def ratios(timings: Sequence[Timing]) -> dict[str, float]:
    """Node speed over storescp and Orthanc speed, per network phase (higher is better)."""
    speed = {(t.phase, t.target): t.images_per_s for t in timings}
    out = {}
    for phase, other in (("ingest", "storescp"), ("ingest", "orthanc"), ("c-get", "orthanc")):
        if (phase, "node") in speed and (phase, other) in speed:
            out[f"{phase} node/{other}"] = speed[(phase, "node")] / speed[(phase, other)]
    floor = ("c-get", "pynetdicom-floor")
    if floor in speed and ("c-get", "orthanc") in speed:  # the best pynetdicom can send
        out["c-get pynetdicom-floor/orthanc"] = speed[floor] / speed[("c-get", "orthanc")]
        out["c-get node/pynetdicom-floor"] = speed[("c-get", "node")] / speed[floor]
    return out


def table(timings: Sequence[Timing]) -> str:
    """The figures as a plain-text table."""
    lines = [f"{'phase':<8} {'target':<18} {'images':>6} {'MB':>8} {'s (med)':>9} "
             f"{'img/s':>9} {'MB/s':>8}"]
    for t in timings:
        lines.append(f"{t.phase:<8} {t.target:<18} {t.images:>6} {t.megabytes:>8.1f} "
                     f"{t.seconds:>9.3f} {t.images_per_s:>9.2f} {t.mb_per_s:>8.1f}")
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--count", type=int, default=20, help="distinct images (one study)")
    p.add_argument("--size", type=int, nargs=2, default=(2294, 1914), metavar=("ROWS", "COLS"))
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--repeats", type=int, default=3, help="runs per network phase (median shown)")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=(1, 4, 8, 16))
    p.add_argument("--devices", nargs="+", help="engine devices (default: cpu, and cuda if any)")
    p.add_argument("--train-images", type=int, help="images per timed training pass "
                   "(default: 637 on CUDA, 16 on the CPU)")
    p.add_argument("--skip", nargs="*", default=(), choices=("network", "engine", "train"))
    p.add_argument("--node-setting", action="append", default=[], metavar="NAME=VALUE",
                   help="extra node setting, e.g. node.max_pdu_size=16384")
    p.add_argument("--get-pdu", type=int, help="getscu's largest received PDU (default 16384)")
    p.add_argument("--work", type=Path, help="working folder (default: a temporary one)")
    p.add_argument("--out", type=Path, default=Path("bench.json"))
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    devices = args.devices or ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]
    settings = {k: (int(v) if v.isdigit() else v)
                for k, v in (s.split("=", 1) for s in args.node_setting)}
    work = args.work or Path(tempfile.mkdtemp(prefix="latentpacs-bench-"))
    steps = (0 if "network" in args.skip else 3 * args.repeats + 3 * args.repeats) \
        + (0 if "engine" in args.skip else len(devices) * len(args.batch_sizes)) \
        + (0 if "train" in args.skip else len(devices))
    timings: list[Timing] = []
    report: dict[str, object] = {"machine": machine(), "args": {k: str(v) for k, v in vars(args).items()}}
    with tqdm(total=steps + 1, desc="benchmark") as bar:
        files, study_uid, pixel_mb = make_data(work / "images", args.count, tuple(args.size), args.seed)
        bar.update(1)
        if "network" not in args.skip:
            ingest, node, orthanc = bench_ingest(work, files, pixel_mb, args.repeats, settings, {}, bar)
            timings += ingest
            report["node_peak_rss_after_ingest_mib"] = node.peak_rss_kib() / 1024
            floor = start_pynetdicom_floor(work / "floor", files)
            try:
                timings += bench_get(work, [node, orthanc, floor], study_uid, len(files), pixel_mb,
                                     args.repeats, bar, args.get_pdu)
                report["node_peak_rss_mib"] = node.peak_rss_kib() / 1024
                report["orthanc_peak_rss_mib"] = orthanc.peak_rss_kib() / 1024
            finally:
                node.stop()
                orthanc.stop()
                floor.stop()
        if "engine" not in args.skip:
            for device in devices:
                timings += bench_engine(device, args.batch_sizes, args.repeats, bar)
        if "train" not in args.skip:
            for device in devices:
                images = args.train_images or (PAPER_TRAIN_IMAGES if device != "cpu" else 16)
                timings.append(bench_train(device, images, 8, bar))
    report["timings"] = [t.as_json() for t in timings]
    report["ratios"] = ratios(timings)
    args.out.write_text(json.dumps(report, indent=2))
    print(table(timings))
    for name, value in report["ratios"].items():  # type: ignore[union-attr]
        print(f"{name}: {value:.2f}x")
    for key in ("node_peak_rss_after_ingest_mib", "node_peak_rss_mib", "orthanc_peak_rss_mib"):
        if key in report:
            print(f"{key}: {report[key]:.0f}")
    for t in timings:
        if t.phase == "train":
            print(f"train {t.target}: {t.images_per_s:.1f} img/s; paper run (637 x 1000) "
                  f"projected {float(t.notes['projected_paper_run_s']) / 60:.1f} min")
    print(f"figures written to {args.out} (work folder {work})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
