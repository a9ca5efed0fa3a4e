"""DICOMweb throughput: STOW-RS and WADO-RS of one study, the node against Orthanc's DICOMweb plugin.

Run from the repository root::

    .venv/bin/python benchmarks/bench_web.py --count 20 --repeats 3 --out bench_web.json
    .venv/bin/python benchmarks/bench_web.py --quick      # 4 images, 1 run: a smoke run

In one run, on one set of synthetic mammograms (``latentpacs.phantom``, one study of
``--count`` distinct images of ``--size``), with one HTTP client (``http.client``, one
connection per request, no compression asked) and byte-identical requests for every
server, it measures

* STOW-RS (PS3.18 10.5): the whole study in one ``POST {base}/studies``, a
  ``multipart/related; type="application/dicom"`` body built once, into Orthanc with its
  DICOMweb plugin (``/dicom-web``) and into a node at each of ``--tiers`` (default
  ``latent`` and ``lossless``), each server fresh for each repetition; the time runs
  from the request to the last byte of the answer, whose Referenced SOP Sequence must
  name every instance and whose Failed SOP Sequence must be absent. For a node at a
  stream tier also the time until its archive has nothing pending (``stow-rs+coded``).
* WADO-RS (PS3.18 10.4): ``GET {base}/studies/{uid}`` from the servers of the last STOW
  round, once asking for explicit VR little endian
  (``Accept: multipart/related; type="application/dicom"; transfer-syntax=1.2.840.10008.1.2.1``)
  and once with ``transfer-syntax=*`` (each server sends what it keeps: the lossless node
  its JPEG-LS streams); the time runs to the last byte; every part must be a DICOM
  object, one per instance, in the syntax asked for.
* for reference, C-GET of the same study from the same servers (DCMTK ``getscu``,
  native, 16 KiB PDUs, as ``bench.py`` runs it): what the DIMSE path costs in this run.

The node's requests carry a bearer token with store, query and retrieve (as a client
would); Orthanc runs without authentication. Every phase runs ``--repeats`` times,
every server in turn within a repetition, with the page cache flushed (``sync``) before
each timed request; the table shows the median (the JSON keeps every run) and each
node's speed over Orthanc's (images/s of this same run). Nothing here asserts.
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import json
import logging
import os
import secrets
import shutil
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path

import pydicom
from bench import machine, make_study
from bench_network import ImageSet
from bench_peers import (
    HOST,
    BenchError,
    Server,
    getscu_study,
    start_node,
    start_orthanc,
    stored_instances,
    wait_until_coded,
)
from bench_report import (
    GET,
    NODE_PREFIX,
    STOW,
    STOW_CODED,
    WADO,
    WADO_ANY,
    Memory,
    Timing,
    memory_table,
    readme_figures,
    speed_ratios,
    timing_table,
    with_overall,
)
from tqdm import tqdm

logger = logging.getLogger("bench_web")

EXPLICIT_VR_LE = "1.2.840.10008.1.2.1"
HTTP_TIMEOUT_S = 600.0
#: The node's bearer token: what a DICOMweb client that stores and reads back would hold.
TOKEN_SERVICES = ["store", "query", "retrieve"]
#: Referenced SOP Sequence and Failed SOP Sequence of a STOW-RS answer (PS3.18 10.5.3).
REFERENCED_SOP = "00081199"
FAILED_SOP = "00081198"


@dataclass(frozen=True)
class Target:
    """A server to benchmark and how a client reaches its DICOMweb base."""

    server: Server
    base_path: str
    headers: Mapping[str, str]

    @property
    def name(self) -> str:
        """``orthanc`` or ``node-<tier>``."""
        return self.server.name


@dataclass(frozen=True)
class Multipart:
    """A ``multipart/related`` body (RFC 2387) and its Content-Type."""

    content_type: str
    body: bytes


def stow_body(files: Sequence[Path]) -> Multipart:
    """One ``multipart/related; type="application/dicom"`` body with each file as a part (PS3.18 8.6.1.2)."""
    boundary = secrets.token_hex(16)
    chunks = []
    for path in files:
        chunks += [f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode(),
                   path.read_bytes(), b"\r\n"]
    chunks.append(f"--{boundary}--\r\n".encode())
    return Multipart(f'multipart/related; type="application/dicom"; boundary={boundary}',
                     b"".join(chunks))


def _boundary(content_type: str) -> bytes:
    for param in content_type.split(";")[1:]:
        key, _, value = param.strip().partition("=")
        if key.lower() == "boundary":
            return value.strip('"').encode()
    raise BenchError(f"no boundary in Content-Type {content_type!r}")


def multipart_parts(content_type: str, body: bytes) -> list[bytes]:
    """The payload of each part of a ``multipart/related`` answer (RFC 2046 5.1.1)."""
    delimiter = b"--" + _boundary(content_type)
    sections = body.split(delimiter)[1:]  # the preamble goes
    parts = []
    for section in sections:
        if section.startswith(b"--"):
            break  # the close delimiter
        headers_end = section.find(b"\r\n\r\n")
        if headers_end < 0:
            raise BenchError("a multipart part without a header block")
        payload = section[headers_end + 4:]
        parts.append(payload[:-2] if payload.endswith(b"\r\n") else payload)
    return parts


@dataclass(frozen=True)
class Answer:
    """An HTTP answer, read to its last byte, and the seconds from the request to it."""

    status: int
    content_type: str
    body: bytes
    seconds: float


def http_request(target: Target, method: str, path: str, headers: Mapping[str, str],
                 body: bytes | None = None) -> Answer:
    """One request on a fresh connection; the time runs until the whole answer is read."""
    connection = http.client.HTTPConnection(HOST, target.server.web_port, timeout=HTTP_TIMEOUT_S)
    try:
        start = time.perf_counter()
        connection.request(method, target.base_path + path, body=body,
                           headers={**target.headers, **headers})
        response = connection.getresponse()
        payload = response.read()
        seconds = time.perf_counter() - start
    finally:
        connection.close()
    return Answer(response.status, response.getheader("Content-Type", ""), payload, seconds)


def stow(target: Target, request: Multipart, expected: int) -> float:
    """STOW-RS the study; seconds. BenchError unless every instance is referenced and none failed."""
    answer = http_request(target, "POST", "/studies",
                          {"Content-Type": request.content_type, "Accept": "application/dicom+json"},
                          request.body)
    if answer.status != 200:
        raise BenchError(f"STOW-RS to {target.name}: HTTP {answer.status}: "
                         f"{answer.body[:2000].decode(errors='replace')}")
    result = json.loads(answer.body)
    stored = len(result.get(REFERENCED_SOP, {}).get("Value", []))
    failed = len(result.get(FAILED_SOP, {}).get("Value", []))
    if stored != expected or failed:
        raise BenchError(f"STOW-RS to {target.name}: {stored} of {expected} stored, {failed} failed")
    return answer.seconds


@dataclass(frozen=True)
class Retrieved:
    """One WADO-RS retrieval: seconds, bytes of the answer's body, transfer syntaxes received."""

    seconds: float
    body_bytes: int
    syntaxes: Counter[str]


def wado(target: Target, study_uid: str, syntax: str, expected: int) -> Retrieved:
    """WADO-RS the study in ``syntax`` (``*``: as the server keeps it).

    BenchError unless ``expected`` parts arrive, each a DICOM object (in ``syntax``
    unless ``*``).
    """
    accept = f'multipart/related; type="application/dicom"; transfer-syntax={syntax}'
    answer = http_request(target, "GET", f"/studies/{study_uid}", {"Accept": accept})
    if answer.status != 200:
        raise BenchError(f"WADO-RS from {target.name}: HTTP {answer.status}: "
                         f"{answer.body[:2000].decode(errors='replace')}")
    parts = multipart_parts(answer.content_type, answer.body)
    if len(parts) != expected:
        raise BenchError(f"WADO-RS from {target.name}: {len(parts)} of {expected} instances")
    syntaxes: Counter[str] = Counter()
    for part in parts:
        meta = pydicom.dcmread(BytesIO(part), stop_before_pixels=True).file_meta
        syntaxes[str(meta.TransferSyntaxUID)] += 1
    if syntax != "*" and set(syntaxes) != {syntax}:
        raise BenchError(f"WADO-RS from {target.name}: asked for {syntax}, got {dict(syntaxes)}")
    return Retrieved(answer.seconds, len(answer.body), syntaxes)


@dataclass(frozen=True)
class WebPlan:
    """What the run does: the study, the node configurations by name, the repetitions."""

    work: Path
    study: ImageSet
    nodes: dict[str, dict[str, str | int | list[str]]]
    repeats: int

    @property
    def targets(self) -> list[str]:
        """Orthanc, then each node."""
        return ["orthanc", *self.nodes]

    def steps(self) -> int:
        """Progress-bar steps: one STOW, two WADO-RS and one C-GET per server and repetition."""
        return 4 * self.repeats * len(self.targets)


def node_settings(tiers: Sequence[str], extra: Mapping[str, str | int],
                  token: str) -> dict[str, dict[str, str | int | list[str]]]:
    """One node configuration per tier, with ``token`` as its ``[web.tokens.bench]``."""
    digest = hashlib.sha256(token.encode()).hexdigest()
    return {f"{NODE_PREFIX}{tier}": {**extra, "codec.tier": tier, "web.tokens.bench.sha256": digest,
                                     "web.tokens.bench.services": TOKEN_SERVICES}
            for tier in tiers}


def _start(plan: WebPlan, name: str, workdir: Path, token: str) -> Target:
    if name == "orthanc":
        server = start_orthanc(workdir, dicomweb=True)
        return Target(server, "/dicom-web", {})
    server = start_node(workdir, name=name, settings=plan.nodes[name])
    if server.web_port is None:
        server.stop()
        raise BenchError(f"{name} started without its web server (web.enabled)")
    return Target(server, "/dicom-web", {"Authorization": f"Bearer {token}"})


@dataclass
class Results:
    """What the phases measured, in the order they ran."""

    timings: list[Timing] = field(default_factory=list)
    memory: list[Memory] = field(default_factory=list)


def _stow_rounds(plan: WebPlan, request: Multipart, token: str, bar: tqdm,
                 keep: ExitStack) -> tuple[Results, list[Target]]:
    """STOW-RS into fresh servers ``repeats`` times; the last round's servers stay up (on ``keep``)."""
    count = len(plan.study.files)
    sent: dict[str, list[float]] = {n: [] for n in plan.targets}
    coded: dict[str, list[float]] = {n: [] for n in plan.nodes}
    peak = dict.fromkeys(plan.targets, 0)
    kept: list[Target] = []
    for rep in range(plan.repeats):
        for name in plan.targets:
            bar.set_postfix_str(f"{STOW}: {name}")
            target = _start(plan, name, plan.work / "stow-rs" / f"{name}-{rep}", token)
            last = rep == plan.repeats - 1
            if last:
                keep.callback(target.server.stop)
                kept.append(target)
            try:
                os.sync()  # nobody's fsyncs pay for another server's dirty pages
                seconds = stow(target, request, count)
                sent[name].append(seconds)
                if name in plan.nodes:
                    coded[name].append(seconds + wait_until_coded(target.server))
                held = stored_instances(target.server)
                if held != count:
                    raise BenchError(f"{STOW}: {name} holds {held} of {count} instances")
                peak[name] = max(peak[name], target.server.peak_memory_kib())
            finally:
                if not last:
                    target.server.stop()
            bar.update(1)
    notes: dict[str, float | int | str] = {"body_mb": round(len(request.body) / 1e6, 1),
                                           "requests": 1}
    results = Results()
    for name in plan.targets:
        results.timings.append(Timing(STOW, name, count, plan.study.pixel_mb, tuple(sent[name]), notes))
        results.memory.append(Memory(STOW, name, peak[name]))
    for name, runs in coded.items():
        if plan.nodes[name].get("codec.tier") != "latent":  # nothing is coded later at latent
            results.timings.append(Timing(STOW_CODED, name, count, plan.study.pixel_mb, tuple(runs), notes))
    return results, kept


def _wado_rounds(plan: WebPlan, targets: Sequence[Target], syntax: str, bar: tqdm) -> Results:
    """WADO-RS the study from each of ``targets`` ``repeats`` times in ``syntax``."""
    phase = WADO_ANY if syntax == "*" else WADO
    count = len(plan.study.files)
    runs: dict[str, list[float]] = {t.name: [] for t in targets}
    last: dict[str, Retrieved] = {}
    for _ in range(plan.repeats):
        for target in targets:
            bar.set_postfix_str(f"{phase}: {target.name}")
            os.sync()
            last[target.name] = wado(target, plan.study.study_uid, syntax, count)
            runs[target.name].append(last[target.name].seconds)
            bar.update(1)
    results = Results()
    for target in targets:
        got = last[target.name]
        notes: dict[str, float | int | str] = {
            "accept_transfer_syntax": syntax, "body_mb": round(got.body_bytes / 1e6, 1),
            "received": ", ".join(f"{uid} x{n}" for uid, n in sorted(got.syntaxes.items()))}
        results.timings.append(Timing(phase, target.name, count, plan.study.pixel_mb,
                                      tuple(runs[target.name]), notes))
        results.memory.append(Memory(phase, target.name, target.server.peak_memory_kib()))
    return results


def _get_rounds(plan: WebPlan, targets: Sequence[Target], bar: tqdm) -> Results:
    """C-GET the study from each of ``targets`` ``repeats`` times (the DIMSE reference)."""
    count = len(plan.study.files)
    runs: dict[str, list[float]] = {t.name: [] for t in targets}
    for rep in range(plan.repeats):
        for target in targets:
            bar.set_postfix_str(f"{GET}: {target.name}")
            out = plan.work / "c-get" / f"{target.name}-{rep}"
            os.sync()
            runs[target.name].append(getscu_study(target.server, plan.study.study_uid, out))
            got = len(list(out.iterdir()))
            shutil.rmtree(out)
            if got != count:
                raise BenchError(f"C-GET from {target.name} returned {got} of {count} images")
            bar.update(1)
    results = Results()
    for target in targets:
        results.timings.append(Timing(GET, target.name, count, plan.study.pixel_mb,
                                      tuple(runs[target.name]), {"getscu_max_pdu": 16384}))
        results.memory.append(Memory(GET, target.name, target.server.peak_memory_kib()))
    return results


def run_web(plan: WebPlan, token: str, bar: tqdm) -> Results:
    """STOW-RS, WADO-RS in both syntaxes, C-GET; every server started is stopped by its PID."""
    request = stow_body(plan.study.files)
    results = Results()
    with ExitStack() as stack:
        stowed, kept = _stow_rounds(plan, request, token, bar, stack)
        results.timings += stowed.timings
        results.memory += stowed.memory
        retrievals = [_wado_rounds(plan, kept, EXPLICIT_VR_LE, bar), _wado_rounds(plan, kept, "*", bar),
                      _get_rounds(plan, kept, bar)]
        for done in retrievals:
            results.timings += done.timings
            results.memory += done.memory
    return results


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line (``--help`` lists it)."""
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    p.add_argument("--count", type=int, default=20, help="distinct images of the study")
    p.add_argument("--size", type=int, nargs=2, default=(2294, 1914), metavar=("ROWS", "COLS"))
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--repeats", type=int, default=3, help="runs per phase (median shown)")
    p.add_argument("--tiers", nargs="*", default=("latent", "lossless"),
                   help="one node configuration per codec.tier (default: latent lossless; "
                   "none: Orthanc alone)")
    p.add_argument("--node-setting", action="append", default=[], metavar="NAME=VALUE",
                   help="extra setting of every node configuration (codec.tier comes from --tiers)")
    p.add_argument("--quick", action="store_true", help="a smoke run: 4 images, 1 repetition")
    p.add_argument("--work", type=Path, help="working folder (default: a temporary one)")
    p.add_argument("--out", type=Path, default=Path("bench_web.json"))
    args = p.parse_args(argv)
    if args.quick:
        args.count, args.repeats = 4, 1
    return args


def print_report(timings: Sequence[Timing], memory: Sequence[Memory], out: Path, work: Path) -> None:
    """The timing table with each node's ratio to Orthanc, the ratios alone, the memory table."""
    print(timing_table(timings))
    print("\nnode / Orthanc (images/s of this run; higher is better)")
    for ratio in speed_ratios(timings):
        print(f"{ratio.name:<44} {ratio.value:>6.2f}x")
    print("\npeak memory (VmHWM)")
    print(memory_table(memory))
    print(f"figures written to {out} (work folder {work})")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; 0 when every phase ran."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    work = args.work or Path(tempfile.mkdtemp(prefix="latentpacs-bench-web-"))
    token = secrets.token_urlsafe(24)
    extra = {k: (int(v) if v.isdigit() else v) for k, v in (s.split("=", 1) for s in args.node_setting)}
    report: dict[str, object] = {"machine": machine(), "args": {k: str(v) for k, v in vars(args).items()},
                                 "loadavg_start": os.getloadavg()}
    started = time.perf_counter()
    with tqdm(total=1, desc="bench_web") as bar:
        bar.set_postfix_str("images")
        study = make_study(work / "images" / "study", args.count, (args.size[0], args.size[1]), args.seed)
        plan = WebPlan(work, study, node_settings(args.tiers, extra, token), args.repeats)
        bar.total += plan.steps()
        bar.update(1)
        results = run_web(plan, token, bar)
    timings, memory = results.timings, with_overall(results.memory)
    report["wall_s"] = time.perf_counter() - started
    report["loadavg_end"] = os.getloadavg()
    report["timings"] = [t.as_json() for t in timings]
    report["ratios"] = {r.name: r.value for r in speed_ratios(timings)}
    report["memory"] = [{"phase": m.phase, "server": m.server, "peak_mib": m.peak_mib} for m in memory]
    report["readme"] = readme_figures(timings, memory)
    args.out.write_text(json.dumps(report, indent=2))
    print_report(timings, memory, args.out, work)
    return 0


if __name__ == "__main__":
    sys.exit(main())
