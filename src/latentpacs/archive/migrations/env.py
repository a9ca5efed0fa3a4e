"""Alembic environment of the archive: runs on the connection the caller hands over.

:func:`latentpacs.archive.database.migrate` opens the connection (with the archive's SQLite
pragmas) and puts it in ``config.attributes["connection"]``; offline SQL generation runs
from ``sqlalchemy.url``.
"""

from __future__ import annotations

from alembic import context

from latentpacs.archive.schema import Base

config = context.config
connection = config.attributes.get("connection")

if connection is None:
    context.configure(
        url=config.get_main_option("sqlalchemy.url"),
        target_metadata=Base.metadata,
        literal_binds=True,
        render_as_batch=True,
    )
    with context.begin_transaction():
        context.run_migrations()
else:
    context.configure(
        connection=connection,
        target_metadata=Base.metadata,
        render_as_batch=connection.dialect.name == "sqlite",
    )
    with context.begin_transaction():
        context.run_migrations()
