"""latentpacs benchmark: the node against DCMTK storescp and Orthanc, and the engine per device.

Run from the repository root::

    .venv/bin/python benchmarks/bench.py --count 20 --parallel 4 10 --out bench.json

In one run, on one machine and one set of synthetic mammograms (``latentpacs.phantom``,
one study of ``--count`` distinct images of ``--size``, and ``--parallel N M`` more: N
groups of M distinct images), it measures (see ``bench_network``)

* ingest: DCMTK ``storescu`` sending the study in one association (PS3.4 Annex B) into
  the node at each of ``--tiers`` (default ``latent`` and ``lossless``), into ``storescp``
  writing Part 10 files, and into Orthanc; each server fresh for each repetition; for a
  node at a stream tier also the time until its archive has nothing pending (coding
  deferred after the acknowledgement);
* retrieve: DCMTK ``getscu`` C-GET of the study (PS3.4 C.4.3) and ``movescu`` C-MOVE of
  it to a DCMTK storescp (PS3.4 C.4.2), from each node, from Orthanc and from a bare
  pynetdicom SCP serving the images from memory (what pynetdicom's sending costs);
* parallel ingest: N storescu processes started together, one association each, into
  each server (storescp with ``--fork``), from the first start to the last exit;
* peak memory of every server after each phase (VmHWM; the sampled tree for storescp
  ``--fork``);
* the inference engine: encode and decode throughput at the model's input size for batch
  sizes 1, 4, 8, 16 on the CPU and on CUDA when available;
* training: images per second of the model's training step, projected to the paper's
  637 images x 1000 epochs.

Each network phase runs ``--repeats`` times; the table shows the median (the JSON keeps
every run). Ratios compare speeds (images/s) measured in this same run, each beside its
target of issue 10 with met / not met. Nothing here asserts a target: the figures are
printed and written to ``--out``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pydicom
import torch
from bench_network import ALL_PHASES, ImageSet, NetworkPlan, node_plans, run_network
from bench_report import (
    GET,
    MOVE,
    PARALLEL,
    Memory,
    Timing,
    memory_ratios,
    memory_table,
    readme_figures,
    speed_ratios,
    target_table,
    timing_table,
    with_overall,
)
from tqdm import tqdm

from latentpacs import phantom
from latentpacs.codec.engine import Engine
from latentpacs.codec.modelfile import load_model
from latentpacs.codec.models import build_model

logger = logging.getLogger("bench")

PAPER_TRAIN_IMAGES = 637
PAPER_EPOCHS = 1000
#: --skip names of the network phases besides ingest (skipping "network" skips all of them).
PHASE_SKIPS = {"get": GET, "move": MOVE, "parallel": PARALLEL}


def _pixel_mb(files: Sequence[Path]) -> float:
    return sum(len(pydicom.dcmread(f).PixelData) for f in files) / 1e6


def make_study(root: Path, count: int, size: tuple[int, int], seed: int) -> ImageSet:
    """``count`` phantom mammograms in one study."""
    files = phantom.generate(root, count, seed, size=size, images_per_study=count)
    first = pydicom.dcmread(files[0], stop_before_pixels=True)
    return ImageSet((tuple(files),), _pixel_mb(files), str(first.StudyInstanceUID))


def make_groups(root: Path, groups: int, per_group: int, size: tuple[int, int], seed: int) -> ImageSet:
    """``groups`` x ``per_group`` distinct phantoms (one study), split into groups for parallel ingest."""
    files = phantom.generate(root, groups * per_group, seed, size=size,
                             images_per_study=groups * per_group)
    split = tuple(tuple(files[g * per_group:(g + 1) * per_group]) for g in range(groups))
    return ImageSet(split, _pixel_mb(files))


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


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line (``--help`` lists it)."""
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    p.add_argument("--count", type=int, default=20, help="distinct images of the study (ingest, C-GET, C-MOVE)")
    p.add_argument("--parallel", type=int, nargs=2, default=(4, 10), metavar=("ASSOCIATIONS", "IMAGES"),
                   help="parallel ingest: storescu processes started together, distinct images each")
    p.add_argument("--size", type=int, nargs=2, default=(2294, 1914), metavar=("ROWS", "COLS"))
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--repeats", type=int, default=3, help="runs per network phase (median shown)")
    p.add_argument("--tiers", nargs="+", default=("latent", "lossless"),
                   help="one node configuration per codec.tier (default: latent lossless)")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=(1, 4, 8, 16))
    p.add_argument("--devices", nargs="+", help="engine devices (default: cpu, and cuda if any)")
    p.add_argument("--train-images", type=int, help="images per timed training pass "
                   "(default: 637 on CUDA, 16 on the CPU)")
    p.add_argument("--skip", nargs="*", default=(),
                   choices=("network", *PHASE_SKIPS, "engine", "train"),
                   help="network: every network phase; get, move, parallel: that phase only")
    p.add_argument("--node-setting", action="append", default=[], metavar="NAME=VALUE",
                   help="extra setting of every node configuration, e.g. node.max_pdu_size=16384 "
                   "(codec.tier comes from --tiers)")
    p.add_argument("--get-pdu", type=int, help="getscu's largest received PDU (default 16384)")
    p.add_argument("--move-pdu", type=int,
                   help="the C-MOVE destination storescp's largest received PDU (default 16384)")
    p.add_argument("--work", type=Path, help="working folder (default: a temporary one)")
    p.add_argument("--out", type=Path, default=Path("bench.json"))
    return p.parse_args(argv)


def _network_plan(args: argparse.Namespace, work: Path, bar: tqdm) -> NetworkPlan:
    """Generate the images and describe the network phases the arguments ask for."""
    size = (args.size[0], args.size[1])
    bar.set_postfix_str("images")
    study = make_study(work / "images" / "study", args.count, size, args.seed)
    groups, per_group = args.parallel
    parallel = make_groups(work / "images" / "parallel", groups, per_group, size, args.seed + 1)
    settings = {k: (int(v) if v.isdigit() else v) for k, v in (s.split("=", 1) for s in args.node_setting)}
    phases = ALL_PHASES - {phase for name, phase in PHASE_SKIPS.items() if name in args.skip}
    return NetworkPlan(work, study, parallel, node_plans(args.tiers, settings), args.repeats,
                       args.get_pdu, args.move_pdu, frozenset(phases))


def _steps(args: argparse.Namespace, devices: Sequence[str]) -> int:
    """Progress-bar steps besides the network phases'."""
    return (0 if "engine" in args.skip else len(devices) * len(args.batch_sizes)) \
        + (0 if "train" in args.skip else len(devices))


def print_report(timings: Sequence[Timing], memory: Sequence[Memory], out: Path, work: Path) -> None:
    """The timing table with ratios, the targets with met / not met, the memory table."""
    print(timing_table(timings))
    ratios = [*speed_ratios(timings), *memory_ratios(memory)]
    if ratios:
        print("\ntargets (issue 10; ratios of this run)")
        print(target_table(ratios))
    if memory:
        print("\npeak memory (VmHWM; storescp --fork: the sampled process tree)")
        print(memory_table(memory))
    for t in timings:
        if t.phase == "train":
            print(f"train {t.target}: {t.images_per_s:.1f} img/s; paper run (637 x 1000) "
                  f"projected {float(t.notes['projected_paper_run_s']) / 60:.1f} min")
    print(f"figures written to {out} (work folder {work})")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; 0 when every phase ran (targets met or not)."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    devices = args.devices or ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]
    work = args.work or Path(tempfile.mkdtemp(prefix="latentpacs-bench-"))
    timings: list[Timing] = []
    memory: list[Memory] = []
    report: dict[str, object] = {"machine": machine(), "args": {k: str(v) for k, v in vars(args).items()}}
    started = time.perf_counter()
    with tqdm(total=_steps(args, devices) + 1, desc="benchmark") as bar:
        if "network" not in args.skip:
            plan = _network_plan(args, work, bar)
            bar.total += plan.steps()
            bar.update(1)
            results = run_network(plan, bar)
            timings += results.timings
            memory += with_overall(results.memory)
        else:
            bar.update(1)
        if "engine" not in args.skip:
            for device in devices:
                bar.set_postfix_str(f"engine: {device}")
                timings += bench_engine(device, args.batch_sizes, args.repeats, bar)
        if "train" not in args.skip:
            for device in devices:
                bar.set_postfix_str(f"train: {device}")
                images = args.train_images or (PAPER_TRAIN_IMAGES if device != "cpu" else 16)
                timings.append(bench_train(device, images, 8, bar))
    report["wall_s"] = time.perf_counter() - started
    report["timings"] = [t.as_json() for t in timings]
    ratios = [*speed_ratios(timings), *memory_ratios(memory)]
    report["ratios"] = {r.name: r.value for r in ratios}
    report["targets"] = [r.as_json() for r in ratios if r.goal is not None]
    report["memory"] = [{"phase": m.phase, "server": m.server, "peak_mib": m.peak_mib} for m in memory]
    report["readme"] = readme_figures(timings, memory)  # the README template's placeholders
    args.out.write_text(json.dumps(report, indent=2))
    print_report(timings, memory, args.out, work)
    return 0


if __name__ == "__main__":
    sys.exit(main())
