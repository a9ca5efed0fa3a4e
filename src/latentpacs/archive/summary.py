"""What the viewer shows beside the QIDO-RS attributes: each study's tiers and compression.

QIDO-RS (PS3.18 10.6) answers with the DICOM attributes of a study; how the archive
holds it is not among them. :func:`study_summaries` adds, per study, the fidelity tiers
of its instances, their bytes as received (the Pixel Data the sender stored) and as
archived (latent plus stream), and how many still wait for the coding queue (archived
as received, :data:`~latentpacs.codec.tiers.RECEIVED`); :func:`instance_summaries` the
same per instance of one study, keyed by the *effective* SOP Instance UID (the one
QIDO-RS and WADO-RS name, PS3.3 C.7.6.1.1.5 for derived images). Both are aggregate
queries on indexed columns; neither reads a header or a stream, and both are bounded by
the caller's ``limit``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass

from sqlalchemy import ColumnElement, Integer, case, func, select
from sqlalchemy.orm import Session

from latentpacs.archive.schema import Instance, Latent, Series, Study
from latentpacs.codec.tiers import RECEIVED

#: Opens one read transaction (``Archive._session``).
OpenSession = Callable[[], AbstractContextManager[Session]]


@dataclass(frozen=True)
class StorageSummary:
    """How the archive holds some instances: tiers, bytes in and out, pending coding.

    Parameters
    ----------
    instances:
        How many instances.
    tiers:
        Their fidelity tiers (``latent``, ``lossless``, ``near-lossless:K``), sorted.
    original_bytes:
        Pixel Data bytes as the senders stored them.
    archived_bytes:
        Latent and stream bytes the archive keeps for them.
    pending:
        Instances still archived as received (the coding queue has not coded them yet).
    lossy_on_arrival:
        Instances whose pixels had already lost information when they arrived.
    """

    instances: int
    tiers: tuple[str, ...]
    original_bytes: int
    archived_bytes: int
    pending: int
    lossy_on_arrival: int

    @property
    def ratio(self) -> float | None:
        """Bytes received over bytes archived (None while nothing is archived)."""
        return self.original_bytes / self.archived_bytes if self.archived_bytes > 0 else None


@dataclass(frozen=True)
class StudySummary(StorageSummary):
    """A :class:`StorageSummary` of one study (Study Instance UID (0020,000D))."""

    study_instance_uid: str = ""


@dataclass(frozen=True)
class InstanceSummary(StorageSummary):
    """A :class:`StorageSummary` of one instance, by its effective UIDs (PS3.4 C.6.1.1.5)."""

    series_instance_uid: str = ""
    sop_instance_uid: str = ""


def _aggregates() -> tuple[ColumnElement[int], ...]:
    """count, bytes received, bytes archived, pending, lossy on arrival (in that order)."""
    return (
        func.count(Instance.id),
        func.coalesce(func.sum(Instance.original_stored_bytes), 0),
        func.coalesce(func.sum(Instance.archived_bytes), 0),
        func.coalesce(func.sum(case((Latent.stream_coder == RECEIVED, 1), else_=0)), 0),
        func.coalesce(func.sum(func.cast(Instance.lossy_on_arrival, Integer)), 0),
    )


def study_summaries(open_session: OpenSession, *, study_uids: Sequence[str] | None = None,
                    limit: int, offset: int = 0) -> list[StudySummary]:
    """Storage summaries of studies, in storage order (the order QIDO-RS answers in).

    Parameters
    ----------
    open_session:
        Opens a read transaction.
    study_uids:
        Only these studies (validated UIDs); None for every study.
    limit, offset:
        At most ``limit`` studies, after skipping ``offset`` (PS3.18 8.3.4.4).
    """
    with open_session() as session:
        chosen = select(Study.id, Study.study_instance_uid).order_by(Study.id)
        if study_uids is not None:
            chosen = chosen.where(Study.study_instance_uid.in_(list(study_uids)))
        studies = session.execute(chosen.limit(limit).offset(offset)).all()
        ids = [row.id for row in studies]
        if not ids:
            return []
        figures: dict[int, tuple[int, int, int, int, int]] = {
            row[0]: (row[1], row[2], row[3], row[4], row[5]) for row in session.execute(
                select(Series.study_fk, *_aggregates())
                .join(Instance, Instance.series_fk == Series.id)
                .join(Latent, Latent.instance_fk == Instance.id)
                .where(Series.study_fk.in_(ids)).group_by(Series.study_fk))
        }
        tiers: dict[int, set[str]] = {}
        for study_fk, tier in session.execute(
                select(Series.study_fk, Instance.tier).join(Instance, Instance.series_fk == Series.id)
                .where(Series.study_fk.in_(ids)).distinct()):
            tiers.setdefault(study_fk, set()).add(tier)
    summaries = []
    for row in studies:
        count, original, archived, pending, lossy = figures.get(row.id, (0, 0, 0, 0, 0))
        summaries.append(StudySummary(
            instances=int(count), tiers=tuple(sorted(tiers.get(row.id, ()))),
            original_bytes=int(original), archived_bytes=int(archived), pending=int(pending),
            lossy_on_arrival=int(lossy), study_instance_uid=row.study_instance_uid))
    return summaries


def instance_summaries(open_session: OpenSession, study_uid: str, *,
                       limit: int) -> list[InstanceSummary]:
    """Storage summaries of the instances of study ``study_uid`` (at most ``limit``).

    In series then instance storage order; empty when the study is not archived.
    """
    with open_session() as session:
        rows = session.execute(
            select(Series.series_instance_uid, Instance.sop_instance_uid, Instance.tier,
                   Instance.original_stored_bytes, Instance.archived_bytes,
                   Latent.stream_coder, Instance.lossy_on_arrival)
            .join(Series, Instance.series_fk == Series.id)
            .join(Study, Series.study_fk == Study.id)
            .join(Latent, Latent.instance_fk == Instance.id)
            .where(Study.study_instance_uid == study_uid)
            .order_by(Series.id, Instance.id).limit(limit)).all()
    return [
        InstanceSummary(
            instances=1, tiers=(row.tier,), original_bytes=int(row.original_stored_bytes),
            archived_bytes=int(row.archived_bytes), pending=int(row.stream_coder == RECEIVED),
            lossy_on_arrival=int(bool(row.lossy_on_arrival)),
            series_instance_uid=row.series_instance_uid, sop_instance_uid=row.sop_instance_uid)
        for row in rows
    ]
