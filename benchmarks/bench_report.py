"""The benchmark's figures, the ratios between them, the targets of issue 10 and the printed tables.

Every ratio compares two figures of the same run: speeds (images per second, higher is
better) for the network phases, peak memory (lower is better) for the servers. A ratio
with a target says whether it is met; nothing here asserts.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field

# Network phases (Timing.phase). A "+coded" phase runs from the first storescu start until
# the node's archive has nothing pending (deferred coding, issue 10); the peers have none.
INGEST = "ingest"
INGEST_CODED = "ingest+coded"
PARALLEL = "parallel ingest"
PARALLEL_CODED = "parallel ingest+coded"
GET = "c-get"
#: C-GET by a getscu that accepts JPEG-LS lossless (``+xt``): each server may send as it stores.
GET_JLS = "c-get +xt"
MOVE = "c-move"
#: DICOMweb (bench_web.py, PS3.18): STOW-RS of the study in one ``POST /studies``; for a
#: node also until its archive has nothing pending; WADO-RS of the study asking for
#: explicit VR little endian, and with ``transfer-syntax=*`` (each server sends as it keeps).
STOW = "stow-rs"
STOW_CODED = "stow-rs+coded"
WADO = "wado-rs"
WADO_ANY = "wado-rs ts=*"
#: The memory row that holds each server's largest peak over every phase.
ALL_PHASES_ROW = "all phases"
#: The phase whose peer figures a node's "+coded" phase is compared with.
BASE_PHASE = {INGEST_CODED: INGEST, PARALLEL_CODED: PARALLEL, STOW_CODED: STOW}
#: The servers a node is compared with, in the order of the table's columns.
PEERS = ("storescp", "orthanc", "pynetdicom-floor")
NODE_PREFIX = "node-"


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


@dataclass(frozen=True)
class Memory:
    """A server's peak resident memory after a phase, the largest over the repetitions.

    Servers kept from the last ingest for retrieval carry their peak on, so ``c-get`` and
    ``c-move`` are "peak so far"; the parallel ingest starts fresh servers.
    """

    phase: str
    server: str
    peak_kib: int

    @property
    def peak_mib(self) -> float:
        """The peak in MiB."""
        return self.peak_kib / 1024


def with_overall(memory: Sequence[Memory]) -> list[Memory]:
    """``memory`` plus one :data:`ALL_PHASES_ROW` row per server: its largest peak of the run."""
    overall: dict[str, int] = {}
    for m in memory:
        overall[m.server] = max(overall.get(m.server, 0), m.peak_kib)
    return [*memory, *(Memory(ALL_PHASES_ROW, server, peak) for server, peak in overall.items())]


@dataclass(frozen=True)
class Goal:
    """A target of issue 10: a ratio of at least (or, with ``at_most``, at most) ``bound``."""

    bound: float
    at_most: bool = False

    def met(self, ratio: float) -> bool:
        """Whether ``ratio`` meets the target."""
        return ratio <= self.bound if self.at_most else ratio >= self.bound

    def __str__(self) -> str:
        return f"{'<=' if self.at_most else '>='} {self.bound:.1f}x"


#: Speed targets (phase, peer) -> goal, at every tier; issue 10 "The benchmark at the tier of
#: record": C-GET and C-MOVE >= 1.0x Orthanc, ingest >= 0.8x storescp and >= 1.0x Orthanc,
#: 4-association ingest >= 1.0x Orthanc.
SPEED_GOALS: dict[tuple[str, str], Goal] = {
    (INGEST, "storescp"): Goal(0.8),
    (INGEST, "orthanc"): Goal(1.0),
    (PARALLEL, "orthanc"): Goal(1.0),
    (GET, "orthanc"): Goal(1.0),
    (MOVE, "orthanc"): Goal(1.0),
}
#: Node peak memory within 1.5x Orthanc's.
MEMORY_GOAL = Goal(1.5, at_most=True)


@dataclass(frozen=True)
class Ratio:
    """``name`` is e.g. ``ingest node-lossless/storescp``; ``goal`` None: no target."""

    name: str
    value: float
    goal: Goal | None = None

    @property
    def verdict(self) -> str:
        """``met``, ``not met``, or empty without a target."""
        if self.goal is None:
            return ""
        return "met" if self.goal.met(self.value) else "not met"

    def as_json(self) -> dict[str, object]:
        """Name, value, target and verdict."""
        return {"name": self.name, "value": self.value,
                "target": str(self.goal) if self.goal else None,
                "met": self.goal.met(self.value) if self.goal else None}


def _is_node(name: str) -> bool:
    return name.startswith(NODE_PREFIX)


def speed_ratios(timings: Sequence[Timing]) -> list[Ratio]:
    """Each node row over each peer of the same (base) phase, and the floor over Orthanc."""
    speed = {(t.phase, t.target): t.images_per_s for t in timings}
    out = []
    for t in timings:
        base = BASE_PHASE.get(t.phase, t.phase)
        if not (_is_node(t.target) or t.target == "pynetdicom-floor"):
            continue
        for peer in PEERS:
            if peer == t.target or (base, peer) not in speed:
                continue
            if t.target == "pynetdicom-floor" and peer != "orthanc":
                continue
            goal = SPEED_GOALS.get((t.phase, peer)) if _is_node(t.target) else None
            out.append(Ratio(f"{t.phase} {t.target}/{peer}", speed[(t.phase, t.target)]
                             / speed[(base, peer)], goal))
    return out


def memory_ratios(memory: Sequence[Memory]) -> list[Ratio]:
    """Each node's peak over Orthanc's after the same phase."""
    peak = {(m.phase, m.server): m.peak_kib for m in memory}
    return [Ratio(f"memory after {m.phase} {m.server}/orthanc", m.peak_kib / peak[(m.phase, "orthanc")],
                  MEMORY_GOAL)
            for m in memory if _is_node(m.server) and peak.get((m.phase, "orthanc"))]


def _ratio_cell(speed: dict[tuple[str, str], float], t: Timing, peer: str) -> str:
    base = BASE_PHASE.get(t.phase, t.phase)
    if t.target == peer or not _is_node(t.target) and t.target != "pynetdicom-floor":
        return ""
    other = speed.get((base, peer))
    return f"{speed[(t.phase, t.target)] / other:.2f}x" if other else ""


def timing_table(timings: Sequence[Timing]) -> str:
    """The figures as a plain-text table; node rows carry their ratio to each peer."""
    speed = {(t.phase, t.target): t.images_per_s for t in timings}
    header = (f"{'phase':<22} {'target':<22} {'images':>6} {'MB':>8} {'s (med)':>9} "
              f"{'img/s':>9} {'MB/s':>8} " + " ".join(f"{'vs ' + p.split('-')[0]:>11}" for p in PEERS))
    lines = [header]
    for t in timings:
        cells = " ".join(f"{_ratio_cell(speed, t, p):>11}" for p in PEERS)
        lines.append(f"{t.phase:<22} {t.target:<22} {t.images:>6} {t.megabytes:>8.1f} "
                     f"{t.seconds:>9.3f} {t.images_per_s:>9.2f} {t.mb_per_s:>8.1f} {cells}")
    return "\n".join(lines)


def target_table(ratios: Iterable[Ratio]) -> str:
    """Every ratio that has a target, with met / not met."""
    lines = [f"{'comparison':<52} {'ratio':>7} {'target':>8}  verdict"]
    lines += [f"{r.name:<52} {r.value:>6.2f}x {str(r.goal):>8}  {r.verdict}"
              for r in ratios if r.goal is not None]
    return "\n".join(lines)


def memory_table(memory: Sequence[Memory]) -> str:
    """Peak MiB per phase (rows) and server (columns), then each node over Orthanc."""
    servers = list(dict.fromkeys(m.server for m in memory))
    nodes = [s for s in servers if _is_node(s)]
    peak = {(m.phase, m.server): m.peak_mib for m in memory}
    header = f"{'peak MiB after':<22} " + " ".join(f"{s:>16}" for s in servers) + " " + \
        " ".join(f"{s + '/orthanc':>22}" for s in nodes) + f"  target {MEMORY_GOAL}"
    lines = [header]
    for phase in dict.fromkeys(m.phase for m in memory):
        cells = " ".join(f"{peak[(phase, s)]:>16.0f}" if (phase, s) in peak else f"{'-':>16}"
                         for s in servers)
        ratios = []
        for node in nodes:
            mine, theirs = peak.get((phase, node)), peak.get((phase, "orthanc"))
            text = "-"
            if mine and theirs:
                ratio = mine / theirs
                text = f"{ratio:.2f}x {'met' if MEMORY_GOAL.met(ratio) else 'not met'}"
            ratios.append(f"{text:>22}")
        lines.append(f"{phase:<22} {cells} {' '.join(ratios)}")
    return "\n".join(lines)


#: Short names of the phases in README placeholders.
_PHASE_KEYS = {INGEST: "ingest", INGEST_CODED: "ingest_coded", PARALLEL: "parallel",
               PARALLEL_CODED: "parallel_coded", GET: "get", GET_JLS: "get_jls", MOVE: "move",
               STOW: "stow", STOW_CODED: "stow_coded", WADO: "wado", WADO_ANY: "wado_any",
               ALL_PHASES_ROW: "all"}


def _key(text: str) -> str:
    """A placeholder-safe name: ``node-near-lossless:2`` -> ``near_lossless_2``, ``pynetdicom-floor`` -> ``floor``."""
    text = text.removeprefix(NODE_PREFIX).removeprefix("pynetdicom-")
    return "".join(c if c.isalnum() else "_" for c in text.lower()).strip("_")


def readme_figures(timings: Sequence[Timing], memory: Sequence[Memory]) -> dict[str, str]:
    """Every figure under the placeholder name the README template uses, formatted as shown there.

    Per row ``<phase>_<target>_s``, ``_img_s``, ``_mb_s``, ``_images``, ``_mb`` (e.g.
    ``{ingest_lossless_img_s}``); per ratio ``<phase>_<target>_vs_<peer>`` and, with a
    target, ``..._met`` (e.g. ``{ingest_lossless_vs_storescp}``); per memory figure
    ``mem_<phase>_<server>_mib`` and ``mem_<phase>_<tier>_vs_orthanc[_met]``. Phases are
    ingest, ingest_coded, parallel, parallel_coded, get, move (and encode, decode, train);
    targets storescp, orthanc, floor and the node tiers (latent, lossless, ...).
    """
    out: dict[str, str] = {}
    for t in timings:
        row = f"{_PHASE_KEYS.get(t.phase, _key(t.phase))}_{_key(t.target)}"
        out |= {f"{row}_s": f"{t.seconds:.3f}", f"{row}_img_s": f"{t.images_per_s:.1f}",
                f"{row}_mb_s": f"{t.mb_per_s:.1f}", f"{row}_images": str(t.images),
                f"{row}_mb": f"{t.megabytes:.1f}"}
        if "projected_paper_run_s" in t.notes:  # training: the paper's 637 images x 1000 epochs
            out[f"{row}_projected_h"] = f"{float(t.notes['projected_paper_run_s']) / 3600:.1f}"
    for r in speed_ratios(timings):
        phase, pair = r.name.rsplit(" ", 1)
        mine, peer = pair.split("/")
        key = f"{_PHASE_KEYS.get(phase, _key(phase))}_{_key(mine)}_vs_{_key(peer)}"
        out[key] = f"{r.value:.2f}x"
        if r.goal is not None:
            out[f"{key}_met"] = r.verdict
    for m in memory:
        out[f"mem_{_PHASE_KEYS[m.phase]}_{_key(m.server)}_mib"] = f"{m.peak_mib:.0f}"
    for r in memory_ratios(memory):
        phase, pair = r.name.removeprefix("memory after ").rsplit(" ", 1)
        key = f"mem_{_PHASE_KEYS[phase]}_{_key(pair.split('/')[0])}_vs_orthanc"
        out |= {key: f"{r.value:.2f}x", f"{key}_met": r.verdict}
    return out
