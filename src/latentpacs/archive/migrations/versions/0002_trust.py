"""Trust at the tier of record: patient issuer, pixel checksums, lossy arrival.

* ``patients.issuer_of_patient_id``: a patient is Patient ID (0010,0020) plus Issuer of
  Patient ID (0010,0021) (PS3.3 C.7.1.1), unique together.
* ``instances.pixel_sha256``: SHA-256 of the original Pixel Data as native little-endian
  cells (every bit of every cell, unused high bits included).
* ``instances.returned_sha256``: SHA-256 of the pixel cells a retrieval returns (equal to
  ``pixel_sha256`` for ``lossless``; the decoded bounded stream for ``near-lossless``).
* ``instances.lossy_on_arrival``: the pixels arrived through a lossy transfer syntax or
  with Lossy Image Compression 01 (PS3.3 C.7.6.1.1.5).

Rows archived before this revision get empty checksums and are verified by decoding only.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Add the columns; patients become unique on (patient_id, issuer_of_patient_id)."""
    with op.batch_alter_table("patients") as batch:
        batch.add_column(
            sa.Column("issuer_of_patient_id", sa.String(), nullable=False, server_default="")
        )
        batch.drop_constraint("uq_patients_patient_id", type_="unique")
        batch.create_unique_constraint(
            "uq_patients_patient_id", ["patient_id", "issuer_of_patient_id"]
        )
    with op.batch_alter_table("instances") as batch:
        batch.add_column(
            sa.Column("pixel_sha256", sa.String(64), nullable=False, server_default="")
        )
        batch.add_column(
            sa.Column("returned_sha256", sa.String(64), nullable=False, server_default="")
        )
        batch.add_column(
            sa.Column("lossy_on_arrival", sa.Boolean(), nullable=False, server_default=sa.false())
        )


def downgrade() -> None:
    """Drop the columns again (two patients sharing an ID under two issuers must not exist)."""
    with op.batch_alter_table("instances") as batch:
        batch.drop_column("lossy_on_arrival")
        batch.drop_column("returned_sha256")
        batch.drop_column("pixel_sha256")
    with op.batch_alter_table("patients") as batch:
        batch.drop_constraint("uq_patients_patient_id", type_="unique")
        batch.create_unique_constraint("uq_patients_patient_id", ["patient_id"])
        batch.drop_column("issuer_of_patient_id")
