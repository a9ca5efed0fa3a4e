"""The archive schema comes from Alembic migrations only, and matches the ORM models;
SQLite runs in WAL mode; the PostgreSQL fixture serves a real server; the archive stays
free of torch and the codec (DESIGN.md "Layout")."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine, inspect, text

from latentpacs.archive import Archive, upgrade
from latentpacs.archive.schema import Base
from latentpacs.errors import ArchiveError, ConfigError


def test_migrations_create_exactly_the_orm_tables(archive_url: str) -> None:
    upgrade(archive_url)
    engine = create_engine(archive_url)
    try:
        with engine.connect() as connection:
            tables = set(inspect(connection).get_table_names())
            assert tables == set(Base.metadata.tables) | {"alembic_version"}
            context = MigrationContext.configure(connection, opts={"compare_type": True})
            assert compare_metadata(context, Base.metadata) == []
            assert connection.execute(text("SELECT version_num FROM alembic_version")).all() == [
                ("0003",)]
    finally:
        engine.dispose()


def test_upgrade_is_repeatable_and_the_archive_opens_on_it(archive_url: str) -> None:
    upgrade(archive_url)
    upgrade(archive_url)
    with Archive(archive_url, migrate=False) as archive:
        assert archive.stats().instances == 0


def test_sqlite_archive_uses_wal(tmp_path: Path) -> None:
    path = tmp_path / "archive.db"
    Archive(f"sqlite:///{path}").dispose()
    with sqlite3.connect(path) as connection:
        assert connection.execute("PRAGMA journal_mode").fetchone() == ("wal",)


def test_unusable_urls_are_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        Archive("mysql://nobody@127.0.0.1/x")
    with pytest.raises(ArchiveError):
        Archive(f"sqlite:///{tmp_path / 'missing-dir' / 'archive.db'}")


def test_postgres_url_fixture_serves_the_latentpacs_database(postgres_url: str) -> None:
    assert postgres_url.startswith("postgresql+psycopg://postgres@127.0.0.1:")
    assert postgres_url.endswith("/latentpacs")
    with Archive(postgres_url) as archive:
        assert archive.stats().patients == 0


def test_archive_never_imports_torch_or_the_codec() -> None:
    # Only the tier grammar (pure Python, one definition for archive and codec) is shared.
    probe = ("import sys, latentpacs.archive; "
             "print(sorted(m for m in sys.modules "
             "if m.split('.')[0] == 'torch' or m.startswith('latentpacs.codec')))")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                            timeout=120, check=True)
    assert result.stdout.strip() in ("[]", "['latentpacs.codec', 'latentpacs.codec.tiers']")
