"""studies: (batch_id, status) index for the progress poll, replacing the batch_id one (issue 14)

The poll counts a batch's studies by status; with both columns in one index PostgreSQL answers it with an
index-only scan (no heap row read per study). The index leads with batch_id, so it serves every lookup by
batch as the single-column index did.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-03 09:00:00
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Apply this revision."""
    with op.batch_alter_table("studies", schema=None) as batch_op:
        batch_op.create_index("ix_studies_batch_id_status", ["batch_id", "status"], unique=False)
        batch_op.drop_index("ix_studies_batch_id")


def downgrade() -> None:
    """Revert this revision."""
    with op.batch_alter_table("studies", schema=None) as batch_op:
        batch_op.create_index("ix_studies_batch_id", ["batch_id"], unique=False)
        batch_op.drop_index("ix_studies_batch_id_status")
