"""drift watch: each study's input statistics, and each model version's training reference (issue 14)

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-02 09:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Apply this revision."""
    with op.batch_alter_table("model_versions", schema=None) as batch:
        batch.add_column(sa.Column("drift_reference", sa.JSON(), nullable=True))
    op.create_table(
        "input_stats",
        sa.Column("study_id", sa.Integer(), nullable=False),
        sa.Column("width", sa.Integer(), nullable=False),
        sa.Column("height", sa.Integer(), nullable=False),
        sa.Column("bit_depth", sa.Integer(), nullable=True),
        sa.Column("mean_intensity", sa.Float(), nullable=False),
        sa.Column("border_minus_centre", sa.Float(), nullable=False),
        sa.Column("manufacturer", sa.String(length=64), nullable=True),
        sa.Column("view", sa.String(length=16), nullable=True),
        sa.ForeignKeyConstraint(
            ["study_id"], ["studies.id"], name=op.f("fk_input_stats_study_id_studies"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("study_id", name=op.f("pk_input_stats")),
    )


def downgrade() -> None:
    """Revert this revision."""
    op.drop_table("input_stats")
    with op.batch_alter_table("model_versions", schema=None) as batch:
        batch.drop_column("drift_reference")
