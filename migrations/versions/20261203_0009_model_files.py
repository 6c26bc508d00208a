"""model_files: each model version's artifact files in SQL, so worker hosts need no shared folder (issue 14)

Bytes as in `images` (LargeBinary: bytea on PostgreSQL, BLOB on SQLite).

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-02 15:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Apply this revision."""
    op.create_table(
        "model_files",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("model_version_id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=255), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("size_bytes", sa.BigInteger(), nullable=False),
        sa.Column("data", sa.LargeBinary(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["model_version_id"],
            ["model_versions.id"],
            name=op.f("fk_model_files_model_version_id_model_versions"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_model_files")),
        sa.UniqueConstraint("model_version_id", "name", name="uq_model_files_version_name"),
    )
    if op.get_bind().dialect.name == "postgresql":
        # As images.data (0003): bytea stored out of line without a compression attempt (model.keras is a zip,
        # model.tflite float weights: pglz would try and give up on every insert).
        op.execute("ALTER TABLE model_files ALTER COLUMN data SET STORAGE EXTERNAL")


def downgrade() -> None:
    """Revert this revision."""
    op.drop_table("model_files")
