"""The text-video similarity of each video, where the worker has a CLIP file (`WANFLOW_CLIP_SCORE`).

Revision: 0007, after 0006. Written by hand to match `Output` in storage/catalog/tables.py.

- `outputs.clip_score`: the mean cosine similarity, -1 to 1, of the prompt's and up to 8 evenly spaced
  frames' embeddings under open-clip's xlm-roberta-large-ViT-H-14 (`wan.clip_score`); NULL where no CLIP
  file was configured, for latents-only outputs, and for videos stored before 0007.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("outputs") as batch:
        batch.add_column(sa.Column("clip_score", sa.Double(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("outputs") as batch:
        batch.drop_column("clip_score")
