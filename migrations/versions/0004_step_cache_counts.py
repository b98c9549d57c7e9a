"""Step caching on the record: how many DiT forwards each video ran and how many of them a step cache skipped.

Revision: 0004, after 0003. Written by hand to match `Output` in storage/catalog/tables.py.

- `outputs.dit_forwards`: the DiT forwards the video's sampling loop made (per guidance branch when the
  branches are separate calls); NULL for videos made without a step cache and for those from before 0004.
- `outputs.dit_forwards_skipped`: how many of them the step cache skipped (all but the first block for the
  first-block cache, every block for MagCache).

The LoRA set and the cache setting need no column: they are job parameters (`jobs.params`, in the key).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("outputs") as batch:
        batch.add_column(sa.Column("dit_forwards", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("dit_forwards_skipped", sa.Integer(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("outputs") as batch:
        batch.drop_column("dit_forwards_skipped")
        batch.drop_column("dit_forwards")
