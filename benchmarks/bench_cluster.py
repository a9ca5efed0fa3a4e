"""Cluster ingest: 1, 2 and 3 nodes behind HAProxy on one PostgreSQL, against one node direct.

Run from the repository root (as root, or a user that may ``runuser -u postgres``)::

    .venv/bin/python benchmarks/bench_cluster.py --count 20 --parallel 4 --repeats 3 --out bench_cluster.json
    .venv/bin/python benchmarks/bench_cluster.py --quick     # 4 small images, 1 run: a smoke run

In one run, on one set of synthetic mammograms (``latentpacs.phantom``, ``--count``
distinct images of ``--size``, one study, split into ``--parallel`` groups), it measures
the wall time from starting ``--parallel`` DCMTK ``storescu`` processes together (one
association each, PS3.4 Annex B) to the last one's exit, into

* ``direct``: one node, no proxy (the reference);
* ``proxy-N`` for N = 1, 2, 3: N nodes behind HAProxy in TCP mode, configured from
  ``deploy/haproxy.cfg`` as shipped (``balance leastconn``, TCP health checks), with only
  the addresses rewritten and the process settings dropped.

Every node is a ``latentpacs serve`` process at ``--tier`` (default ``lossless``) on one
PostgreSQL 15 server that this script starts (``initdb`` in a temporary folder, default
durability settings: ``fsync`` and ``synchronous_commit`` on) and one shared blob
directory, as the multi-node recipe in ``deploy/README.md`` runs them. Each configuration
gets a fresh database and fresh node processes in each repetition, every configuration
in turn within a repetition (slow drifts of the machine touch all of them alike), with
``os.sync()`` before each timed phase; after each phase the archive must hold every
image once. Background coding is off (``codec.deferred_background = false``): the time is
that of the acknowledgement (received, hashed, blob fsynced, row committed), not of a
coder competing for the same cores. The table shows the median (the JSON keeps every
run) and each configuration's speed over ``direct``. On a machine with fewer cores than
nodes this shows the proxy's and the extra processes' overhead, not scaling: every node
competes for the same CPUs. Nothing here asserts.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from pathlib import Path

import psycopg
from bench import machine, make_groups
from bench_network import ImageSet
from bench_peers import HOST, BenchError, Server, _spawn, _started, free_port, start_node, storescu_parallel
from bench_report import Timing
from tqdm import tqdm

from latentpacs.archive import Archive

logger = logging.getLogger(__name__)

PHASE = "cluster-ingest"
DIRECT = "direct"
PG_BIN = Path("/usr/lib/postgresql/15/bin")
PG_USER = "postgres"
DEPLOY_HAPROXY = Path(__file__).resolve().parents[1] / "deploy" / "haproxy.cfg"
_PROCESS_SETTINGS = re.compile(r"^\s*(chroot|user|group|daemon|log /dev/log|stats socket)\b.*\n",
                               re.MULTILINE)
_SERVER = re.compile(r"^\s*server node\d .*\n", re.MULTILINE)


def _as_postgres(*command: str | Path) -> list[str]:
    return ["runuser", "-u", PG_USER, "--", *map(str, command)]


@contextmanager
def postgres() -> Iterator[int]:
    """A throw-away PostgreSQL 15 cluster on loopback with default durability; yields its port."""
    if not (PG_BIN / "initdb").is_file() or shutil.which("runuser") is None:
        raise BenchError(f"{PG_BIN}/initdb and runuser are required (Debian package postgresql-15)")
    root = Path(tempfile.mkdtemp(prefix="latentpacs-bench-pg-"))
    shutil.chown(root, PG_USER, PG_USER)
    subprocess.run(_as_postgres(PG_BIN / "initdb", "-D", root / "data", "-U", PG_USER,
                                "--auth=trust", "--encoding=UTF8", "--locale=C"),
                   check=True, capture_output=True, timeout=120)
    port = free_port()
    log = root / "server.log"
    proc = _spawn(_as_postgres(PG_BIN / "postgres", "-D", root / "data", "-h", HOST, "-p",
                               str(port), "-k", root, "-c", "max_connections=200"), log, root)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                psycopg.connect(host=HOST, port=port, user=PG_USER, dbname="postgres",
                                connect_timeout=5).close()
                break
            except psycopg.OperationalError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise BenchError(f"PostgreSQL did not start:\n{log.read_text()[-3000:]}")
                time.sleep(0.2)
        yield port
    finally:
        subprocess.run(_as_postgres(PG_BIN / "pg_ctl", "stop", "-D", root / "data", "-m", "fast",
                                    "-w"), capture_output=True, timeout=60)
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)
        shutil.rmtree(root, ignore_errors=True)


def fresh_database(port: int, name: str) -> str:
    """Create database ``name`` (dropping an older one); its SQLAlchemy URL."""
    with psycopg.connect(host=HOST, port=port, user=PG_USER, dbname="postgres",
                         autocommit=True) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.execute(f'CREATE DATABASE "{name}"')
    return f"postgresql+psycopg://{PG_USER}@{HOST}:{port}/{name}"


def haproxy_config(port: int, nodes: Sequence[Server]) -> str:
    """``deploy/haproxy.cfg`` with the frontend on ``HOST:port`` and one server per node."""
    text = DEPLOY_HAPROXY.read_text()
    text, dropped = _PROCESS_SETTINGS.subn("", text)
    text, servers = _SERVER.subn("", text)
    text, binds = re.subn(r"bind :11112", f"bind {HOST}:{port}", text)
    if (dropped, servers, binds) != (6, 3, 1):
        raise BenchError(f"{DEPLOY_HAPROXY} changed shape: {dropped} process settings, "
                         f"{servers} servers, {binds} binds")
    return text.rstrip("\n") + "\n" + "".join(
        f"    server node{n + 1} {HOST}:{node.port} check\n" for n, node in enumerate(nodes))


def start_haproxy(workdir: Path, nodes: Sequence[Server]) -> Server:
    """HAProxy in the foreground in front of ``nodes``; returns once C-ECHO through it answers."""
    binary = shutil.which("haproxy") or shutil.which("/usr/sbin/haproxy")
    if binary is None:
        raise BenchError("haproxy is not installed (Debian package haproxy)")
    workdir.mkdir(parents=True, exist_ok=True)
    port, config, log = free_port(), workdir / "haproxy.cfg", workdir / "haproxy.log"
    config.write_text(haproxy_config(port, nodes))
    proc = _spawn([binary, "-db", "-f", config], log, workdir)
    return _started("haproxy", port, nodes[0].aet, proc, log, workdir)


def _start_nodes(workdir: Path, count: int, url: str, settings: dict[str, str | int | list[str]]) -> list[Server]:
    env = {"LATENTPACS_ARCHIVE_DATABASE": url,
           "LATENTPACS_ARCHIVE_DATA_DIR": str(workdir / "shared-data")}
    with ThreadPoolExecutor(count) as pool:
        futures = [pool.submit(start_node, workdir / f"node{n + 1}", name=f"node{n + 1}",
                               settings=settings, env=env) for n in range(count)]
        return [future.result() for future in futures]


def _instances(url: str) -> int:
    with Archive(url, migrate=False, sweep=False) as archive:
        return archive.stats().instances


def ingest_once(work: Path, images: ImageSet, target: str, nodes: int, url: str,
                settings: dict[str, str | int | list[str]]) -> float:
    """Start ``nodes`` fresh nodes (and a proxy unless ``target`` is direct); time one parallel ingest."""
    with ExitStack() as stack:
        started = _start_nodes(work, nodes, url, settings)
        for node in started:
            stack.callback(node.stop)
        entry = started[0] if target == DIRECT else start_haproxy(work / "proxy", started)
        if entry is not started[0]:
            stack.callback(entry.stop)
        os.sync()
        seconds = storescu_parallel(entry, images.groups, work / "storescu")
        stored = _instances(url)
        if stored != len(images.files):
            raise BenchError(f"{target}: the archive holds {stored} instances, not {len(images.files)}")
    return seconds


def run(args: argparse.Namespace, work: Path, bar: tqdm) -> list[Timing]:
    """Every configuration ``args.repeats`` times, in turn within each repetition."""
    per_group = args.count // args.parallel
    images = make_groups(work / "images", args.parallel, per_group, (args.size[0], args.size[1]),
                         args.seed)
    bar.update(1)
    settings: dict[str, str | int | list[str]] = {
        "codec.tier": args.tier, "codec.deferred_background": False,
        "security.trust_loopback": False, "security.allowed_calling_aets": ["BENCH"],
        "web.enabled": False}
    targets = [(DIRECT, 1)] + [(f"proxy-{n}", n) for n in args.nodes]
    runs: dict[str, list[float]] = {target: [] for target, _ in targets}
    with postgres() as pg_port:
        for rep in range(args.repeats):
            for target, nodes in targets:
                bar.set_postfix_str(f"{target} run {rep + 1}")
                url = fresh_database(pg_port, "bench")
                folder = work / "runs" / f"{target}-{rep}"
                runs[target].append(ingest_once(folder, images, target, nodes, url, settings))
                shutil.rmtree(folder / "shared-data", ignore_errors=True)
                bar.update(1)
    return [Timing(PHASE, target, len(images.files), images.pixel_mb, tuple(runs[target]),
                   {"nodes": nodes, "proxy": target != DIRECT, "associations": args.parallel})
            for target, nodes in targets]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line (``--help`` lists it)."""
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    p.add_argument("--count", type=int, default=20, help="distinct images, split over --parallel senders")
    p.add_argument("--parallel", type=int, default=4, help="storescu processes started together")
    p.add_argument("--size", type=int, nargs=2, default=(2294, 1914), metavar=("ROWS", "COLS"))
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--repeats", type=int, default=3, help="runs per configuration (median shown)")
    p.add_argument("--nodes", type=int, nargs="+", default=(1, 2, 3), help="node counts behind the proxy")
    p.add_argument("--tier", default="lossless", help="codec.tier of every node")
    p.add_argument("--quick", action="store_true", help="a smoke run: 4 images of 512 x 416, 1 repetition")
    p.add_argument("--work", type=Path, help="working folder (default: a temporary one)")
    p.add_argument("--out", type=Path, default=Path("bench_cluster.json"))
    args = p.parse_args(argv)
    if args.quick:
        args.count, args.size, args.repeats = 4, (512, 416), 1
    if args.count % args.parallel:
        p.error("--count must be a multiple of --parallel")
    return args


def table(timings: Sequence[Timing]) -> str:
    """The Markdown table of the run: median seconds, images/s, MB/s, speed over direct."""
    reference = next(t for t in timings if t.target == DIRECT)
    lines = ["| target | nodes | median s | images/s | MB/s | speed / direct |",
             "| --- | --- | --- | --- | --- | --- |"]
    for t in timings:
        lines.append(f"| {t.target} | {t.notes['nodes']} | {t.seconds:.2f} | {t.images_per_s:.2f} "
                     f"| {t.mb_per_s:.1f} | {t.images_per_s / reference.images_per_s:.2f} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; 0 when every configuration ran."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    work = args.work or Path(tempfile.mkdtemp(prefix="latentpacs-bench-cluster-"))
    work.mkdir(parents=True, exist_ok=True)
    report: dict[str, object] = {"machine": machine(), "args": {k: str(v) for k, v in vars(args).items()},
                                 "loadavg_start": os.getloadavg()}
    started = time.perf_counter()
    with tqdm(total=1 + args.repeats * (1 + len(args.nodes)), desc="bench_cluster") as bar:
        timings = run(args, work, bar)
    report["wall_s"] = time.perf_counter() - started
    report["loadavg_end"] = os.getloadavg()
    report["timings"] = [t.as_json() for t in timings]
    report["table"] = table(timings)
    args.out.write_text(json.dumps(report, indent=2))
    print(table(timings))
    print(f"\nJSON: {args.out}; work folder: {work}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
