"""Recovery bookkeeping: when a job's task was last sent, and runtime overrides (OOM backoff).

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

from jobstore.models import UTCDateTime

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("dispatched_at", UTCDateTime, nullable=True))
        batch.add_column(sa.Column("overrides", sa.JSON, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("overrides")
        batch.drop_column("dispatched_at")
