"""Database engines and Alembic migrations for the archive.

SQLite (the default) runs in WAL journal mode with ``synchronous=FULL`` so a committed
store survives a power cut or SIGKILL, foreign keys on, case-sensitive ``LIKE`` (C-FIND
wildcard matching is case-sensitive, PS3.4 C.2.2.2.4) and a busy timeout. Transactions
are begun explicitly (the pysqlite driver's own transaction handling is switched off) so
that DDL is transactional and writers take the lock up front (``BEGIN IMMEDIATE``).
PostgreSQL (``postgresql+psycopg://``): a connection attempt gives up after
:data:`PG_CONNECT_TIMEOUT_S` and TCP keepalives find a vanished server, so a store fails
with A700 instead of hanging (a URL's own ``connect_timeout`` or ``keepalives*`` wins).
Every engine pings a pooled connection before lending it (``pool_pre_ping``): after a
server restart, broken connections are replaced, not reused.

Migrations live in this package (``migrations/``) and are configured programmatically;
no ``alembic.ini`` is needed at run time.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, create_engine, event, make_url
from sqlalchemy.exc import ArgumentError, SQLAlchemyError

from latentpacs.errors import ArchiveError, ConfigError

logger = logging.getLogger(__name__)

MIGRATIONS = Path(__file__).with_name("migrations")
#: Execution option that makes a SQLite transaction start with BEGIN IMMEDIATE.
IMMEDIATE = "latentpacs_immediate"
SQLITE_BUSY_TIMEOUT_MS = 30_000
#: pg_advisory_xact_lock key serialising concurrent migrations of one PostgreSQL archive.
PG_MIGRATION_LOCK = 0x4C50_4143
#: Seconds a PostgreSQL connection attempt may take (libpq ``connect_timeout``).
PG_CONNECT_TIMEOUT_S = 10
#: libpq TCP keepalives: a server gone without a word is noticed after about a minute.
PG_KEEPALIVES = {"keepalives": 1, "keepalives_idle": 30, "keepalives_interval": 10,
                 "keepalives_count": 3}


def make_engine(url: str) -> Engine:
    """Create the one engine an :class:`~latentpacs.archive.db.Archive` uses for its life.

    Parameters
    ----------
    url:
        SQLAlchemy URL: ``sqlite:///path/archive.db`` or
        ``postgresql+psycopg://user@host:port/database``.

    Raises
    ------
    ConfigError
        When the URL cannot be parsed or names an unsupported database.
    """
    try:
        parsed = make_url(url)
        connect_args: dict[str, Any] = {}
        if parsed.get_backend_name() == "postgresql":
            defaults = {"connect_timeout": PG_CONNECT_TIMEOUT_S, **PG_KEEPALIVES}
            connect_args = {key: value for key, value in defaults.items()
                            if key not in parsed.query}
        engine = create_engine(url, pool_pre_ping=True, connect_args=connect_args)
    except (ArgumentError, ImportError) as exc:
        raise ConfigError(f"archive URL {url!r} is not usable: {exc}") from exc
    if engine.dialect.name == "sqlite":
        _configure_sqlite(engine)
    elif engine.dialect.name != "postgresql":
        engine.dispose()
        raise ConfigError(f"archive URL {url!r}: only sqlite and postgresql+psycopg are supported")
    return engine


def _configure_sqlite(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None  # we emit BEGIN ourselves
        cursor = dbapi_connection.cursor()
        for pragma in (
            "journal_mode=WAL",
            "synchronous=FULL",
            "foreign_keys=ON",
            "case_sensitive_like=ON",
            f"busy_timeout={SQLITE_BUSY_TIMEOUT_MS}",
        ):
            cursor.execute(f"PRAGMA {pragma}")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Any) -> None:
        immediate = connection.get_execution_options().get(IMMEDIATE, False)
        connection.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")


def alembic_config() -> Config:
    """An Alembic configuration pointing at this package's migrations."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    return config


def migrate(engine: Engine) -> None:
    """Apply the archive's Alembic migrations up to head, in one transaction.

    Concurrent node processes may call this at the same time: SQLite serialises them
    with BEGIN IMMEDIATE, PostgreSQL with a transaction-scoped advisory lock.

    Raises
    ------
    ArchiveError
        When the database cannot be reached or a migration fails (nothing is applied).
    """
    config = alembic_config()
    try:
        with engine.connect() as connection:
            connection = connection.execution_options(**{IMMEDIATE: True})
            with connection.begin():
                if engine.dialect.name == "postgresql":
                    connection.exec_driver_sql(f"SELECT pg_advisory_xact_lock({PG_MIGRATION_LOCK})")
                config.attributes["connection"] = connection
                command.upgrade(config, "head")
    except SQLAlchemyError as exc:
        raise ArchiveError(f"archive migration failed: {exc}") from exc
    logger.info("archive schema at head (%s)", engine.url.render_as_string(hide_password=True))


def upgrade(url: str) -> None:
    """Bring the archive at ``url`` to the newest schema (``latentpacs db upgrade``).

    Raises
    ------
    ConfigError
        When the URL is not usable.
    ArchiveError
        When the database cannot be reached or a migration fails.
    """
    engine = make_engine(url)
    try:
        migrate(engine)
    finally:
        engine.dispose()
