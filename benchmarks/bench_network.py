"""The network phases: ingest, parallel ingest, C-GET and C-MOVE, node against storescp and Orthanc.

In one run, on the same images, each phase runs ``repeats`` times, every server in turn
within a repetition (so slow drifts of the machine touch all of them alike):

1. ingest: one ``storescu`` association with the study into a fresh storescp, Orthanc and
   one node per tier; for a node, also the time until its archive has nothing pending
   (deferred coding). The servers of the last repetition (not storescp) stay up for 2-3.
2. C-GET of the study (``getscu``) from each node, Orthanc and a bare pynetdicom SCP.
3. C-MOVE of the study (``movescu``) from the same servers to a DCMTK storescp
   destination (``MOVEDEST``), every instance checked to have arrived.
4. parallel ingest: ``associations`` storescu processes started together, each with its
   own distinct images, into fresh servers (storescp with ``--fork``, one child per
   association); wall time from the first start to the last exit.

Each server's peak memory is read after each phase (bench_memory).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

from bench_peers import (
    BenchError,
    Server,
    clear_received,
    getscu_study,
    movescu_study,
    start_node,
    start_orthanc,
    start_pynetdicom_floor,
    start_storescp,
    stored_instances,
    storescu,
    storescu_parallel,
    wait_until_coded,
)
from bench_report import GET, GET_JLS, INGEST, INGEST_CODED, MOVE, NODE_PREFIX, PARALLEL, PARALLEL_CODED, Memory, Timing
from tqdm import tqdm

MOVE_AET = "MOVEDEST"
ALL_PHASES = frozenset({GET, MOVE, PARALLEL})


@dataclass(frozen=True)
class ImageSet:
    """Files to send: one study, or the groups of a parallel ingest (one group per association)."""

    groups: tuple[tuple[Path, ...], ...]
    pixel_mb: float
    study_uid: str = ""

    @property
    def files(self) -> tuple[Path, ...]:
        """Every file, group after group."""
        return tuple(f for group in self.groups for f in group)


@dataclass(frozen=True)
class NetworkPlan:
    """What the network phases run.

    ``nodes`` maps each node configuration's name (``node-<tier>``) to its settings.
    ``phases`` says which of C-GET, C-MOVE and parallel ingest run (ingest always does).
    """

    work: Path
    study: ImageSet
    parallel: ImageSet
    nodes: dict[str, dict[str, str | int]]
    repeats: int
    get_pdu: int | None = None
    move_pdu: int | None = None
    phases: frozenset[str] = ALL_PHASES

    @property
    def ingest_targets(self) -> list[str]:
        """Servers that ingest: storescp, Orthanc, then each node."""
        return ["storescp", "orthanc", *self.nodes]

    @property
    def retrieving(self) -> bool:
        """Whether servers are kept after ingest for C-GET or C-MOVE."""
        return bool(self.phases & {GET, MOVE})

    def steps(self) -> int:
        """Progress-bar steps of these phases."""
        ingest = len(self.ingest_targets)
        retrieve = len(self.nodes) + 2  # the nodes, Orthanc, the pynetdicom floor
        return self.repeats * (ingest + (ingest if PARALLEL in self.phases else 0)
                               + sum(retrieve for p in (GET, GET, MOVE) if p in self.phases))


@dataclass
class Results:
    """What the phases measured, in the order they ran."""

    timings: list[Timing] = field(default_factory=list)
    memory: list[Memory] = field(default_factory=list)


def _start(plan: NetworkPlan, name: str, workdir: Path, *, fork: bool = False,
           destination: Server | None = None) -> Server:
    """A fresh server of the kind ``name`` says (storescp, orthanc, node-<tier>)."""
    destinations = [destination] if destination else []
    if name == "storescp":
        return start_storescp(workdir, fork=fork)
    if name == "orthanc":
        return start_orthanc(workdir, destinations=destinations)
    return start_node(workdir, name=name, settings=plan.nodes[name], destinations=destinations)


def _check_count(server: Server, expected: int, what: str) -> None:
    got = stored_instances(server)
    if got != expected:
        raise BenchError(f"{what}: {server.name} holds {got} of {expected} instances")


@dataclass
class _IngestRuns:
    """Per server: seconds of each send, of each send until nothing was pending, peak KiB."""

    sent: dict[str, list[float]]
    coded: dict[str, list[float]]
    peak_kib: dict[str, int]

    def record(self, server: Server, sent: float, coded: float | None) -> None:
        """One repetition's figures of ``server`` (its peak memory read now)."""
        self.sent[server.name].append(sent)
        if coded is not None:
            self.coded[server.name].append(coded)
        self.peak_kib[server.name] = max(self.peak_kib[server.name], server.peak_memory_kib())


def _ingest_once(server: Server, images: ImageSet, phase: str, is_node: bool,
                 send: Callable[[Server, Path], float], runs: _IngestRuns) -> None:
    """Send ``images`` into ``server``; for a node, poll until coded; check every instance is held.

    The page cache is flushed first (``sync``), so no server's fsyncs pay for the dirty
    pages an earlier server left behind (on ext4 an fsync commits the journal, which
    writes out other files' data too).
    """
    os.sync()
    sent = send(server, server.workdir / "scu")
    coded = sent + wait_until_coded(server) if is_node else None
    _check_count(server, len(images.files), phase)
    runs.record(server, sent, coded)


def _ingest_rounds(plan: NetworkPlan, images: ImageSet, phase: str, coded_phase: str,
                   send: Callable[[Server, Path], float], bar: tqdm, *, fork: bool = False,
                   destination: Server | None = None,
                   keep: ExitStack | None = None) -> tuple[Results, dict[str, Server]]:
    """``send`` into fresh servers ``repeats`` times; with ``keep``, the last round's stay up."""
    names = plan.ingest_targets
    runs = _IngestRuns({n: [] for n in names}, {n: [] for n in plan.nodes}, dict.fromkeys(names, 0))
    kept: dict[str, Server] = {}
    for rep in range(plan.repeats):
        for name in names:
            bar.set_postfix_str(f"{phase}: {name}")
            workdir = plan.work / phase.replace(" ", "-") / f"{name}-{rep}"
            server = _start(plan, name, workdir, fork=fork, destination=destination)
            keeping = keep is not None and rep == plan.repeats - 1 and name != "storescp"
            if keeping and keep is not None:
                keep.callback(server.stop)  # stopped at the end, or on any failure
                kept[name] = server
            try:
                _ingest_once(server, images, phase, name in plan.nodes, send, runs)
            finally:
                if not keeping:
                    server.stop()
            bar.update(1)
    notes: dict[str, float | int | str] = {"associations": len(images.groups),
                                           "images_per_association": len(images.groups[0])}
    if fork:
        notes["storescp"] = "--fork"
    results = Results()
    for name in names:
        results.timings.append(Timing(phase, name, len(images.files), images.pixel_mb,
                                      tuple(runs.sent[name]), notes))
        results.memory.append(Memory(phase, name, runs.peak_kib[name]))
    for name, seconds in runs.coded.items():
        if plan.nodes[name].get("codec.tier") == "latent":
            continue  # nothing is coded after the acknowledgement at the latent tier
        results.timings.append(Timing(coded_phase, name, len(images.files), images.pixel_mb,
                                      tuple(seconds), notes))
    return results, kept


def _retrieve_rounds(plan: NetworkPlan, servers: Sequence[Server], phase: str,
                     fetch: Callable[[Server, int], float], notes: dict[str, float | int | str],
                     bar: tqdm) -> Results:
    """``fetch(server, rep)`` the study from each server ``repeats`` times; it returns the SCU's seconds."""
    results = Results()
    runs: dict[str, list[float]] = {s.name: [] for s in servers}
    for rep in range(plan.repeats):
        for server in servers:
            bar.set_postfix_str(f"{phase}: {server.name}")
            os.sync()  # as for ingest: nobody pays for another server's dirty pages
            runs[server.name].append(fetch(server, rep))
            bar.update(1)
    for server in servers:
        results.timings.append(Timing(phase, server.name, len(plan.study.files),
                                      plan.study.pixel_mb, tuple(runs[server.name]), notes))
        results.memory.append(Memory(phase, server.name, server.peak_memory_kib()))
    return results


def bench_get(plan: NetworkPlan, servers: Sequence[Server], bar: tqdm, *,
              jpeg_ls: bool = False) -> Results:
    """C-GET the study from each server; every image must arrive.

    ``jpeg_ls``: getscu accepts JPEG-LS lossless (``+xt``), so a server that keeps JPEG-LS
    streams may send them as they are.
    """
    def fetch(server: Server, rep: int) -> float:
        out = plan.work / "c-get" / f"{server.name}-{rep}"
        seconds = getscu_study(server, plan.study.study_uid, out, plan.get_pdu, jpeg_ls=jpeg_ls)
        got = len(list(out.iterdir()))
        shutil.rmtree(out)
        if got != len(plan.study.files):
            raise BenchError(f"C-GET from {server.name} returned {got} of {len(plan.study.files)} images")
        return seconds

    return _retrieve_rounds(plan, servers, GET_JLS if jpeg_ls else GET, fetch,
                            {"getscu_max_pdu": plan.get_pdu or 16384}, bar)


def bench_move(plan: NetworkPlan, servers: Sequence[Server], destination: Server,
               bar: tqdm) -> Results:
    """C-MOVE the study from each server to ``destination``; every image must arrive there."""
    def fetch(server: Server, rep: int) -> float:
        clear_received(destination)
        seconds = movescu_study(server, plan.study.study_uid, destination)
        _check_count(destination, len(plan.study.files), f"C-MOVE from {server.name}")
        return seconds

    notes: dict[str, float | int | str] = {"destination_max_pdu": plan.move_pdu or 16384}
    return _retrieve_rounds(plan, servers, MOVE, fetch, notes, bar)


def run_network(plan: NetworkPlan, bar: tqdm) -> Results:
    """Every network phase of ``plan``; every server started is stopped by its PID."""
    results = Results()
    with ExitStack() as stack:
        destination = None
        if MOVE in plan.phases:
            destination = start_storescp(plan.work / "move-destination", name="move-destination",
                                         aet=MOVE_AET, max_pdu=plan.move_pdu)
            stack.callback(destination.stop)
        ingest, kept = _ingest_rounds(
            plan, plan.study, INGEST, INGEST_CODED,
            lambda server, _logs: storescu(server, plan.study.files), bar,
            destination=destination, keep=stack if plan.retrieving else None)
        results.timings += ingest.timings
        results.memory += ingest.memory
        if plan.retrieving:
            floor = start_pynetdicom_floor(plan.work / "floor", plan.study.files, destination)
            stack.callback(floor.stop)
            servers = [*(kept[name] for name in plan.nodes), kept["orthanc"], floor]
            if GET in plan.phases:
                for jpeg_ls in (False, True):
                    done = bench_get(plan, servers, bar, jpeg_ls=jpeg_ls)
                    results.timings += done.timings
                    results.memory += done.memory
            if destination is not None:
                done = bench_move(plan, servers, destination, bar)
                results.timings += done.timings
                results.memory += done.memory
        stack.close()  # the retrieval servers go before the parallel ingest starts its own
        if PARALLEL in plan.phases:
            parallel, _ = _ingest_rounds(
                plan, plan.parallel, PARALLEL, PARALLEL_CODED,
                lambda server, logs: storescu_parallel(server, plan.parallel.groups, logs), bar,
                fork=True)
            results.timings += parallel.timings
            results.memory += parallel.memory
    return results


def node_plans(tiers: Sequence[str], settings: dict[str, str | int]) -> dict[str, dict[str, str | int]]:
    """One node configuration per tier: ``settings`` with ``codec.tier`` set to it."""
    return {f"{NODE_PREFIX}{tier}": {**settings, "codec.tier": tier} for tier in tiers}
