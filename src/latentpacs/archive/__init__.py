"""The latentpacs archive: SQL schema, migrations, ingest, C-FIND matching and fetch.

It never decodes pixels or runs models (DESIGN.md "Layout"); it imports pydicom,
SQLAlchemy, Alembic and :mod:`latentpacs.errors` only.
"""

from latentpacs.archive.db import Archive, DuplicatePolicy, StoreResult
from latentpacs.archive.database import upgrade
from latentpacs.archive.records import (
    ArchivedImage, ArchiveStats, CoderStats, StreamRow, TierStats,
)

__all__ = [
    "Archive",
    "ArchiveStats",
    "ArchivedImage",
    "CoderStats",
    "DuplicatePolicy",
    "StoreResult",
    "StreamRow",
    "TierStats",
    "upgrade",
]
