"""The initial archive schema: models, patients, studies, series, instances, latents.

Revision ID: 0001
Revises:
Create Date: 2025-01-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def _index(table: str, *columns: str) -> None:
    for column in columns:
        op.create_index(f"ix_{table}_{column}", table, [column])


def upgrade() -> None:
    """Create the six tables with the indexes on every C-FIND key matched in SQL."""
    op.create_table(
        "models",
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("name", sa.String(128), nullable=False),
        sa.Column("arch", sa.String(64), nullable=False),
        sa.Column("card", sa.Text(), nullable=False),
        sa.Column("registered_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("sha256", name="pk_models"),
    )
    op.create_table(
        "patients",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("patient_id", sa.String(), nullable=False),
        sa.Column("patient_name", sa.String(), nullable=False),
        sa.Column("patient_name_folded", sa.String(), nullable=False),
        sa.Column("patient_birth_date", sa.String(), nullable=False),
        sa.Column("patient_sex", sa.String(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_patients"),
        sa.UniqueConstraint("patient_id", name="uq_patients_patient_id"),
    )
    _index("patients", "patient_name_folded", "patient_birth_date", "patient_sex")
    op.create_table(
        "studies",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("patient_fk", sa.Integer(), nullable=False),
        sa.Column("study_instance_uid", sa.String(), nullable=False),
        sa.Column("study_date", sa.String(), nullable=False),
        sa.Column("study_time", sa.String(), nullable=False),
        sa.Column("accession_number", sa.String(), nullable=False),
        sa.Column("study_id", sa.String(), nullable=False),
        sa.Column("study_description", sa.String(), nullable=False),
        sa.ForeignKeyConstraint(["patient_fk"], ["patients.id"], name="fk_studies_patient_fk"),
        sa.PrimaryKeyConstraint("id", name="pk_studies"),
        sa.UniqueConstraint("study_instance_uid", name="uq_studies_study_instance_uid"),
    )
    _index(
        "studies", "patient_fk", "study_date", "study_time", "accession_number", "study_id",
        "study_description",
    )
    op.create_table(
        "series",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("study_fk", sa.Integer(), nullable=False),
        sa.Column("series_instance_uid", sa.String(), nullable=False),
        sa.Column("modality", sa.String(), nullable=False),
        sa.Column("series_number", sa.Integer(), nullable=True),
        sa.Column("series_description", sa.String(), nullable=False),
        sa.ForeignKeyConstraint(["study_fk"], ["studies.id"], name="fk_series_study_fk"),
        sa.PrimaryKeyConstraint("id", name="pk_series"),
        sa.UniqueConstraint("series_instance_uid", name="uq_series_series_instance_uid"),
    )
    _index("series", "study_fk", "modality", "series_number", "series_description")
    op.create_table(
        "instances",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("series_fk", sa.Integer(), nullable=False),
        sa.Column("sop_instance_uid", sa.String(), nullable=False),
        sa.Column("original_sop_instance_uid", sa.String(), nullable=False),
        sa.Column("sop_class_uid", sa.String(), nullable=False),
        sa.Column("instance_number", sa.Integer(), nullable=True),
        sa.Column("tier", sa.String(32), nullable=False),
        sa.Column("header", sa.Text(), nullable=False),
        sa.Column("overrides", sa.Text(), nullable=False),
        sa.Column("pixel_rows", sa.Integer(), nullable=False),
        sa.Column("pixel_columns", sa.Integer(), nullable=False),
        sa.Column("bits_allocated", sa.Integer(), nullable=False),
        sa.Column("bits_stored", sa.Integer(), nullable=False),
        sa.Column("high_bit", sa.Integer(), nullable=False),
        sa.Column("photometric_interpretation", sa.String(16), nullable=False),
        sa.Column("original_transfer_syntax", sa.String(64), nullable=False),
        sa.Column("original_stored_bytes", sa.BigInteger(), nullable=False),
        sa.Column("archived_bytes", sa.BigInteger(), nullable=False),
        sa.Column("stored_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["series_fk"], ["series.id"], name="fk_instances_series_fk"),
        sa.PrimaryKeyConstraint("id", name="pk_instances"),
        sa.UniqueConstraint("sop_instance_uid", name="uq_instances_sop_instance_uid"),
        sa.UniqueConstraint(
            "original_sop_instance_uid", name="uq_instances_original_sop_instance_uid"
        ),
    )
    _index("instances", "series_fk", "sop_class_uid", "instance_number", "tier")
    op.create_table(
        "latents",
        sa.Column("instance_fk", sa.Integer(), nullable=False),
        sa.Column("model_sha256", sa.String(64), nullable=False),
        sa.Column("latent", sa.LargeBinary(), nullable=False),
        sa.Column("residual", sa.LargeBinary(), nullable=True),
        sa.Column("residual_path", sa.String(), nullable=True),
        sa.Column("residual_sha256", sa.String(64), nullable=True),
        sa.Column("residual_size", sa.BigInteger(), nullable=False),
        sa.ForeignKeyConstraint(
            ["instance_fk"], ["instances.id"], name="fk_latents_instance_fk", ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(
            ["model_sha256"], ["models.sha256"], name="fk_latents_model_sha256"
        ),
        sa.PrimaryKeyConstraint("instance_fk", name="pk_latents"),
    )
    _index("latents", "model_sha256", "residual_sha256")


def downgrade() -> None:
    """Drop every archive table (all archived data is lost)."""
    for table in ("latents", "instances", "series", "studies", "patients", "models"):
        op.drop_table(table)
