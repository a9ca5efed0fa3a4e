"""The process's operational metrics, served at ``/metrics`` in the Prometheus text format.

One :class:`prometheus_client.CollectorRegistry` per process (:data:`REGISTRY`, not
prometheus-client's global one), written to by the DIMSE node, the DICOMweb server,
the service, the coding queue and the inference engine, and read by the ``/metrics``
route (:mod:`latentpacs.web.instrument`). Names carry their unit and kind
(``..._seconds`` histograms, ``..._total`` counters, ``..._bytes`` sizes); label values
come from small fixed sets (service names, status codes, tiers, reasons), never from a
request: no UID, AE title, patient or path reaches a label.

Services are named as PS3.7 and PS3.18 name them: ``C-ECHO``, ``C-STORE``, ``C-FIND``,
``C-GET``, ``C-MOVE`` (DIMSE, status as four hex digits, PS3.7 Annex C) and ``QIDO-RS``,
``WADO-RS``, ``STOW-RS``, ``rendered``, ``viewer``, ``metrics`` (HTTP, status as the
decimal HTTP code).

Updates are cheap: one labelled child looked up per request or per message, one
lock-protected addition each (prometheus-client's own), nothing per PDU, no lock held
across I/O. Values that live elsewhere (associations open, archive size per tier, the
coding backlog) are computed when a scrape asks for them, from callables the node and
the web app register: :func:`watch_associations`, :func:`watch_archive`. The archive's
figures (one :meth:`~latentpacs.archive.Archive.stats` call, its own session) are
fetched again only after this process archived something or when the last figures are
older than :data:`ARCHIVE_MAX_AGE_S`, and by one scrape at a time.

This module imports prometheus-client only: no SQL, no DICOM networking, no torch, so
``codec/`` and ``archive/`` may report through it.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator
from typing import Any, ParamSpec, Protocol, TypeVar

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from prometheus_client.registry import Collector

logger = logging.getLogger(__name__)

P = ParamSpec("P")
R = TypeVar("R")
T = TypeVar("T")

# No ``*_created`` series beside every counter and histogram: they double the text and
# Prometheus reads a counter's resets from its values.
disable_created_metrics()

#: The process's registry (one per process; prometheus-client's default one stays unused).
REGISTRY = CollectorRegistry(auto_describe=True)
ProcessCollector(registry=REGISTRY)
PlatformCollector(registry=REGISTRY)
GCCollector(registry=REGISTRY)

#: Content type of :func:`exposition`: the Prometheus text format, version 0.0.4 (what
#: :func:`generate_latest` writes and every Prometheus server reads).
CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4

#: Seconds after which a scrape fetches the archive's figures again even when this process
#: archived nothing (another process sharing the database may have).
ARCHIVE_MAX_AGE_S = 30.0

#: Request latency buckets: a C-ECHO or QIDO-RS in milliseconds, a C-STORE of a mammogram
#: in tens to hundreds of milliseconds, a study's C-GET or C-MOVE in seconds to minutes.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                   10.0, 30.0, 60.0, 120.0, 300.0, float("inf"))
#: Engine batch sizes (images per torch batch; ``codec.max_batch`` is 8 by default).
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64, float("inf"))
#: Engine queue wait (seconds from a request's submission to the start of its batch).
WAIT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                5.0, 10.0, float("inf"))

#: DIMSE services (PS3.7 Section 9) by the name of their response message class.
DIMSE_RESPONSES = {
    "C_ECHO_RSP": "C-ECHO",
    "C_STORE_RSP": "C-STORE",
    "C_FIND_RSP": "C-FIND",
    "C_GET_RSP": "C-GET",
    "C_MOVE_RSP": "C-MOVE",
}
#: Pending statuses (PS3.4 C.4.1.1.4, C.4.2.1.5, C.4.3.1.4): not final, not counted.
PENDING = frozenset({0xFF00, 0xFF01})

#: Why an association was refused, by the A-ASSOCIATE-RJ Result Source and Diagnostic
#: (PS3.8 7.1.1.9, Table 9-21).
REJECT_REASONS = {
    (0x01, 0x03): "calling-ae-title",
    (0x01, 0x07): "called-ae-title",
    (0x01, 0x02): "application-context",
    (0x02, 0x01): "user-identity",
    (0x02, 0x02): "protocol-version",
    (0x03, 0x01): "congestion",
    (0x03, 0x02): "max-associations",
}
#: Refusal reasons besides those of :data:`REJECT_REASONS`.
NO_PRESENTATION_CONTEXT = "no-presentation-context"
TLS_HANDSHAKE = "tls-handshake"
OTHER = "other"

ASSOCIATIONS = Counter(
    "latentpacs_associations_total",
    "Associations the node accepted (A-ASSOCIATE-AC, PS3.8 7.1).",
    registry=REGISTRY)
ASSOCIATIONS_REFUSED = Counter(
    "latentpacs_associations_refused_total",
    "Connections refused an association: A-ASSOCIATE-RJ (reason: the PS3.8 Table 9-21 "
    "diagnostic), no acceptable presentation context, or a failed TLS handshake.",
    ["reason"], registry=REGISTRY)
REQUEST_SECONDS = Histogram(
    "latentpacs_request_seconds",
    "Time to serve one DIMSE request (handler start to its last answer) or HTTP request "
    "(arrival to the last body byte), by service; its _count is the number of requests.",
    ["service"], buckets=LATENCY_BUCKETS, registry=REGISTRY)
REQUESTS = Counter(
    "latentpacs_requests_total",
    "Final responses, by service and status (DIMSE: four hex digits, PS3.7 Annex C; "
    "HTTP: the status code).",
    ["service", "status"], registry=REGISTRY)
RECEIVED_BYTES = Counter(
    "latentpacs_received_bytes_total",
    "Bytes received: C-STORE data sets (in the transfer syntax they arrived in) and HTTP "
    "request bodies, by service.",
    ["service"], registry=REGISTRY)
SENT_BYTES = Counter(
    "latentpacs_sent_bytes_total",
    "Bytes sent: DIMSE P-DATA-TF PDUs (C-STORE sub-operations count as C-GET or C-MOVE) "
    "and HTTP response bodies, by service.",
    ["service"], registry=REGISTRY)
ARCHIVED_BYTES = Counter(
    "latentpacs_archived_bytes_total",
    "Pixel bytes written to the archive (latent plus stream), by tier: each stored "
    "instance, and each stream the coding queue swapped in.",
    ["tier"], registry=REGISTRY)
ARCHIVED_INSTANCES = Counter(
    "latentpacs_archived_instances_total",
    "Instances this process archived (stored or replaced; a re-sent instance the duplicate "
    "policy kept is not counted), by tier.",
    ["tier"], registry=REGISTRY)
CODED = Counter(
    "latentpacs_deferred_coded_total",
    "Instances the coding queue finished, by outcome (coded: its stream swapped in; "
    "failed: kept as received).",
    ["outcome"], registry=REGISTRY)
ENGINE_BATCH = Histogram(
    "latentpacs_engine_batch_images",
    "Images (or latents) per torch batch the inference engine ran, by kind.",
    ["kind"], buckets=BATCH_BUCKETS, registry=REGISTRY)
ENGINE_WAIT = Histogram(
    "latentpacs_engine_queue_wait_seconds",
    "Time an inference request waited in the engine's queue before its batch started, by kind.",
    ["kind"], buckets=WAIT_BUCKETS, registry=REGISTRY)


class _Server(Protocol):
    """What :func:`watch_associations` reads of a pynetdicom ``AssociationServer``."""

    @property
    def active_associations(self) -> list[Any]: ...


_SERVERS: weakref.WeakSet[Any] = weakref.WeakSet()
_SERVERS_LOCK = threading.Lock()


def _open_associations() -> float:
    with _SERVERS_LOCK:
        servers = list(_SERVERS)
    return float(sum(1 for server in servers for association in server.active_associations
                     if association.is_established))


ASSOCIATIONS_OPEN = Gauge(
    "latentpacs_associations_open",
    "Associations established with the node now (read at scrape time).",
    registry=REGISTRY)
ASSOCIATIONS_OPEN.set_function(_open_associations)


def watch_associations(server: _Server) -> None:
    """Count ``server``'s established associations in ``latentpacs_associations_open``.

    Held weakly: a server that is gone stops counting.
    """
    with _SERVERS_LOCK:
        _SERVERS.add(server)


# --- DIMSE ----------------------------------------------------------------------------


def timed(service: str, handler: Callable[P, R]) -> Callable[P, R]:
    """``handler`` (C-ECHO, C-STORE: it returns its status) timed into ``latentpacs_request_seconds``."""
    histogram = REQUEST_SECONDS.labels(service)

    @functools.wraps(handler)
    def call(*args: P.args, **kwargs: P.kwargs) -> R:
        start = time.perf_counter()
        try:
            return handler(*args, **kwargs)
        finally:
            histogram.observe(time.perf_counter() - start)

    return call


def timed_iter(service: str, handler: Callable[P, Iterator[T]]) -> Callable[P, Iterator[T]]:
    """A generator ``handler`` (C-FIND, C-GET, C-MOVE) timed from its first step to its end.

    pynetdicom steps the handler as it sends each answer or sub-operation, so the time
    covers the whole request but the final response. A handler pynetdicom drops (the
    association ended) is observed when the generator is closed.
    """
    histogram = REQUEST_SECONDS.labels(service)

    @functools.wraps(handler)
    def call(*args: P.args, **kwargs: P.kwargs) -> Iterator[T]:
        start = time.perf_counter()
        try:
            yield from handler(*args, **kwargs)
        finally:
            histogram.observe(time.perf_counter() - start)

    return call


def on_dimse_sent(event: Any) -> None:
    """``EVT_DIMSE_SENT`` handler: count each final response by service and status.

    Pending responses and requests (C-STORE sub-operations) are skipped after one lookup
    of the message's class name. The status is the one the peer gets, including those
    pynetdicom sets itself (A801 for an unknown move destination, the C-GET/C-MOVE
    sub-operation outcome B000/A702, C211 for a handler that failed).
    """
    message = event.message
    service = DIMSE_RESPONSES.get(type(message).__name__)
    if service is None:
        return
    status = message.command_set.get("Status")
    if status is None or int(status) in PENDING:
        return
    REQUESTS.labels(service, f"{int(status):04X}").inc()


def on_established(event: Any) -> None:
    """``EVT_ESTABLISHED`` handler: an accepted association; one with no accepted
    presentation context (PS3.8 9.3.3.2: every context rejected) counts as refused."""
    ASSOCIATIONS.inc()
    if not event.assoc.accepted_contexts:
        ASSOCIATIONS_REFUSED.labels(NO_PRESENTATION_CONTEXT).inc()


def on_rejected(event: Any) -> None:
    """``EVT_REJECTED`` handler (acceptor): the A-ASSOCIATE-RJ's reason (PS3.8 Table 9-21)."""
    primitive = getattr(event.assoc.acceptor, "primitive", None)
    key = (int(getattr(primitive, "result_source", 0) or 0),
           int(getattr(primitive, "diagnostic", 0) or 0))
    refused(REJECT_REASONS.get(key, OTHER))


def refused(reason: str) -> None:
    """Count one refused association (``reason``: a name of :data:`REJECT_REASONS` or above)."""
    ASSOCIATIONS_REFUSED.labels(reason).inc()


def store_received_bytes(event: Any) -> int:
    """The data set bytes of a C-STORE request as they arrived (PS3.7 9.3.1.1).

    With pynetdicom's chunked receive the data set is in a PS3.10 file after a preamble
    and a File Meta group whose length its (0002,0000) element gives (PS3.10 7.1); else
    it is in memory. 0 when neither can be read.
    """
    request = event.request
    located = getattr(request, "_dataset_path", None)
    if located is not None:
        path = located[0] if isinstance(located, tuple) else located
        try:
            with open(path, "rb") as handle:
                head = handle.read(144)
                size = os.fstat(handle.fileno()).st_size
        except OSError:
            return 0
        # preamble (128), "DICM", then (0002,0000) UL: tag 4, VR 2, length 2, value 4
        if len(head) == 144 and head[128:132] == b"DICM" and head[132:136] == b"\x02\x00\x00\x00":
            return max(size - 144 - int.from_bytes(head[140:144], "little"), 0)
        return max(size - 132, 0)
    data_set = getattr(request, "DataSet", None)
    if data_set is None:
        return 0
    try:
        return int(data_set.getbuffer().nbytes)
    except (AttributeError, ValueError):
        return 0


def received(service: str, nbytes: int) -> None:
    """Count ``nbytes`` received for ``service``."""
    if nbytes > 0:
        RECEIVED_BYTES.labels(service).inc(nbytes)


def sent(service: str, nbytes: int) -> None:
    """Count ``nbytes`` sent for ``service``."""
    if nbytes > 0:
        SENT_BYTES.labels(service).inc(nbytes)


#: The service a DIMSE message the node sends belongs to, by message class name and
#: whether the node is the association's requestor (a C-MOVE sub-association) or not.
_SENT_AS = {
    **{(name, False): service for name, service in DIMSE_RESPONSES.items()},
    ("C_STORE_RQ", False): "C-GET",  # a C-GET's sub-operations go back on its association
    ("C_STORE_RQ", True): "C-MOVE",  # a C-MOVE's on the sub-association the node opened
}


def dimse_sent(message_class: str, requestor: bool, nbytes: int) -> None:
    """Count the bytes of one DIMSE message the node sent (PDU headers included)."""
    service = _SENT_AS.get((message_class, requestor))
    if service is not None:
        SENT_BYTES.labels(service).inc(nbytes)


# --- archive and coding queue ----------------------------------------------------------


def archived(tier: str, nbytes: int) -> None:
    """Count one instance archived at ``tier`` with ``nbytes`` of latent plus stream."""
    ARCHIVED_INSTANCES.labels(tier).inc()
    ARCHIVED_BYTES.labels(tier).inc(nbytes)
    archive_changed()


def recoded(tier: str, nbytes: int) -> None:
    """Count one stream the coding queue swapped in (``nbytes`` of latent plus stream)."""
    CODED.labels("coded").inc()
    ARCHIVED_BYTES.labels(tier).inc(nbytes)
    archive_changed()


def coding_failed() -> None:
    """Count one instance the coding queue could not code (it stays as received)."""
    CODED.labels("failed").inc()


class _TierFigures(Protocol):
    @property
    def tier(self) -> str: ...

    @property
    def instances(self) -> int: ...

    @property
    def original_bytes(self) -> int: ...

    @property
    def archived_bytes(self) -> int: ...


class _ArchiveFigures(Protocol):
    """What the archive collector reads of :class:`~latentpacs.archive.ArchiveStats`."""

    @property
    def patients(self) -> int: ...

    @property
    def studies(self) -> int: ...

    @property
    def series(self) -> int: ...

    @property
    def instances(self) -> int: ...

    @property
    def tiers(self) -> Iterable[_TierFigures]: ...

    @property
    def pending(self) -> int: ...


class ArchiveCollector(Collector):
    """Archive size per tier and the coding backlog, from a stats callable, at scrape time.

    The figures are fetched again when this process archived something since
    (:func:`archive_changed`), when they are older than ``max_age_s``, or never were;
    one scrape fetches while concurrent ones serve the figures they find. A failing
    fetch is logged and the last figures are served.
    """

    def __init__(self, max_age_s: float = ARCHIVE_MAX_AGE_S) -> None:
        self.max_age_s = max_age_s
        self._source: Callable[[], _ArchiveFigures] | None = None
        self._figures: _ArchiveFigures | None = None
        self._fetched_at = 0.0
        self._fetched_generation = -1
        self._generation = 0
        self._fetching = threading.Lock()

    def watch(self, source: Callable[[], _ArchiveFigures] | None) -> None:
        """Read the archive's figures from ``source`` (None: stop reporting them)."""
        self._source = source
        self._figures = None
        self._fetched_generation = -1

    def changed(self) -> None:
        """Mark the figures stale: this process archived or recoded an instance."""
        self._generation += 1

    def figures(self) -> _ArchiveFigures | None:
        """The current figures, fetched again if stale (see the class docstring)."""
        source = self._source
        if source is None:
            return None
        stale = (self._figures is None or self._fetched_generation != self._generation
                 or time.monotonic() - self._fetched_at > self.max_age_s)
        if stale and self._fetching.acquire(blocking=self._figures is None):
            try:
                generation = self._generation
                self._figures = source()
                self._fetched_at = time.monotonic()
                self._fetched_generation = generation
            except Exception as exc:
                logger.warning("archive figures for /metrics unavailable: %s", exc)
            finally:
                self._fetching.release()
        return self._figures

    def collect(self) -> Iterator[GaugeMetricFamily]:
        """The gauges (prometheus-client calls this for each scrape)."""
        figures = self.figures()
        if figures is None:
            return
        instances = GaugeMetricFamily(
            "latentpacs_archive_instances", "Instances in the archive, by tier.", labels=["tier"])
        archived_bytes = GaugeMetricFamily(
            "latentpacs_archive_bytes",
            "Pixel bytes the archive keeps (latent plus stream), by tier.", labels=["tier"])
        original = GaugeMetricFamily(
            "latentpacs_archive_original_bytes",
            "Pixel Data bytes of the archived instances as their senders stored them, by tier.",
            labels=["tier"])
        for tier in figures.tiers:
            instances.add_metric([tier.tier], tier.instances)
            archived_bytes.add_metric([tier.tier], tier.archived_bytes)
            original.add_metric([tier.tier], tier.original_bytes)
        entities = GaugeMetricFamily(
            "latentpacs_archive_entities",
            "Patients, studies, series and instances in the archive (PS3.4 C.6.1 levels).",
            labels=["level"])
        for level, count in (("PATIENT", figures.patients), ("STUDY", figures.studies),
                             ("SERIES", figures.series), ("IMAGE", figures.instances)):
            entities.add_metric([level], count)
        yield from (instances, archived_bytes, original, entities)
        yield GaugeMetricFamily(
            "latentpacs_deferred_pending_instances",
            "Instances archived as received whose tier's stream is not coded yet "
            "(the recompression backlog, codec.deferred).", value=figures.pending)


ARCHIVE = ArchiveCollector()
REGISTRY.register(ARCHIVE)


def watch_archive(source: Callable[[], _ArchiveFigures] | None) -> None:
    """Report the archive's figures from ``source`` (``archive.stats``) at scrape time."""
    ARCHIVE.watch(source)


def archive_changed() -> None:
    """Tell the archive collector this process changed what the archive holds."""
    ARCHIVE.changed()


# --- engine ---------------------------------------------------------------------------


def engine_batch(kind: str, images: int) -> None:
    """Observe one torch batch of ``images`` (``kind``: encode or decode)."""
    ENGINE_BATCH.labels(kind).observe(images)


def engine_waits(kind: str, waits: Iterable[float]) -> None:
    """Observe the queue wait of each request of a batch group."""
    histogram = ENGINE_WAIT.labels(kind)
    for wait in waits:
        histogram.observe(wait)


def exposition() -> bytes:
    """The registry in the Prometheus text format (:data:`CONTENT_TYPE`), gauges read now."""
    return generate_latest(REGISTRY)
