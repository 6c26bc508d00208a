"""heat maps, band legends, forced password change, soft-deleted batches

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01 09:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Apply this revision."""
    op.create_table(
        "heatmaps",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("study_id", sa.Integer(), nullable=False),
        sa.Column("model_version_id", sa.Integer(), nullable=False),
        sa.Column("class_name", sa.String(length=16), nullable=False),
        sa.Column("png", sa.LargeBinary(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("elapsed_ms", sa.Float(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["model_version_id"],
            ["model_versions.id"],
            name=op.f("fk_heatmaps_model_version_id_model_versions"),
        ),
        sa.ForeignKeyConstraint(
            ["study_id"], ["studies.id"], name=op.f("fk_heatmaps_study_id_studies"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_heatmaps")),
        sa.UniqueConstraint("study_id", "model_version_id", name="uq_heatmaps_study_model"),
    )
    op.create_index(op.f("ix_heatmaps_study_id"), "heatmaps", ["study_id"], unique=False)
    if op.get_bind().dialect.name == "postgresql":
        # PNG bytes are already compressed (see 0003).
        op.execute("ALTER TABLE heatmaps ALTER COLUMN png SET STORAGE EXTERNAL")
    # batch_alter_table: SQLite cannot add a foreign key to an existing table without a copy.
    with op.batch_alter_table("users") as batch:
        batch.add_column(
            sa.Column("must_change_password", sa.Boolean(), server_default=sa.false(), nullable=False)
        )
    with op.batch_alter_table("batches") as batch:
        batch.add_column(sa.Column("deleted_at", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("deleted_by", sa.Integer(), nullable=True))
        batch.create_foreign_key(
            op.f("fk_batches_deleted_by_users"), "users", ["deleted_by"], ["id"], ondelete="SET NULL"
        )
    with op.batch_alter_table("model_versions") as batch:
        batch.add_column(sa.Column("band_legend", sa.JSON(), nullable=True))


def downgrade() -> None:
    """Revert this revision."""
    with op.batch_alter_table("model_versions") as batch:
        batch.drop_column("band_legend")
    with op.batch_alter_table("batches") as batch:
        batch.drop_constraint(op.f("fk_batches_deleted_by_users"), type_="foreignkey")
        batch.drop_column("deleted_by")
        batch.drop_column("deleted_at")
    with op.batch_alter_table("users") as batch:
        batch.drop_column("must_change_password")
    op.drop_index(op.f("ix_heatmaps_study_id"), table_name="heatmaps")
    op.drop_table("heatmaps")
