"""images.data: no compression attempt on PostgreSQL

Image bytes are already compressed (PNG, JPEG, JPEG 2000); PostgreSQL's default EXTENDED storage tries pglz on
every insert and gives up, which cost about half of the web's insert time in bench/throughput.py. EXTERNAL
keeps out-of-line TOAST storage without the compression attempt. SQLite has no such setting.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-30 09:25:00
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Apply this revision."""
    if op.get_bind().dialect.name == "postgresql":
        op.execute("ALTER TABLE images ALTER COLUMN data SET STORAGE EXTERNAL")
        op.execute("ALTER TABLE studies ALTER COLUMN thumbnail_png SET STORAGE EXTERNAL")


def downgrade() -> None:
    """Revert this revision."""
    if op.get_bind().dialect.name == "postgresql":
        op.execute("ALTER TABLE studies ALTER COLUMN thumbnail_png SET STORAGE EXTENDED")
        op.execute("ALTER TABLE images ALTER COLUMN data SET STORAGE EXTENDED")
