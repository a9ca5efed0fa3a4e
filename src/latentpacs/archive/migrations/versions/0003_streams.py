"""Streams, not residuals: the latents table names the coder of each stream.

The bytes beside a latent are a full stream of the stored values, never a difference
from the network output, so the columns lose the word "residual":
``residual`` -> ``stream``, ``residual_path`` -> ``stream_path``, ``residual_sha256`` ->
``stream_sha256``, ``residual_size`` -> ``stream_size``. Each stream names its coder and
the coder's format version (DESIGN.md "Contracts": a stream names its coder), so a later
coder can sit beside JPEG-LS and every archived stream stays decodable. Rows already
archived hold JPEG-LS streams (version 1) or none.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

_RENAMES = (("residual", "stream"), ("residual_path", "stream_path"),
            ("residual_sha256", "stream_sha256"), ("residual_size", "stream_size"))


def upgrade() -> None:
    """Rename the stream columns and add the coder's name and version."""
    with op.batch_alter_table("latents") as batch:
        batch.drop_index("ix_latents_residual_sha256")
        for old, new in _RENAMES:
            batch.alter_column(old, new_column_name=new)
        batch.add_column(sa.Column("stream_coder", sa.String(32), nullable=False,
                                   server_default=""))
        batch.add_column(sa.Column("stream_coder_version", sa.Integer(), nullable=False,
                                   server_default="0"))
    op.create_index("ix_latents_stream_sha256", "latents", ["stream_sha256"])
    op.execute("UPDATE latents SET stream_coder = 'jpeg-ls', stream_coder_version = 1 "
               "WHERE stream_size > 0")


def downgrade() -> None:
    """Back to the 0002 names (the coder columns are dropped)."""
    op.drop_index("ix_latents_stream_sha256", "latents")
    with op.batch_alter_table("latents") as batch:
        batch.drop_column("stream_coder_version")
        batch.drop_column("stream_coder")
        for old, new in _RENAMES:
            batch.alter_column(new, new_column_name=old)
    op.create_index("ix_latents_residual_sha256", "latents", ["residual_sha256"])
