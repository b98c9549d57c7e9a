"""Quality signals on the record (what each video's frames showed as they streamed to storage), and the
final latents kept beside a video.

Revision: 0005, after 0004. Written by hand to match `Output` in storage/catalog/tables.py (see
storage/signals.py for each measure).

- `outputs.motion`: the mean absolute luma change from frame to frame, in [0, 1];
- `outputs.black_frames`, `flat_frames`, `frozen_frames`: frames that are black, of one colour, or repeat
  the previous frame; `outputs.black`, `flat`, `frozen`: whether such frames make a stretch of a second or
  more (or the whole video);
- `outputs.phash`: the perceptual hash of up to 8 frames spread over the video (hex, 16 characters a frame),
  for near-duplicate search.

- `outputs.latents_uri`, `latents_sha256`, `latents_bytes`: the safetensors file of the video's final
  latents, for runs that keep them (`wanflow generate --save-latents`); NULL otherwise.

Videos stored before 0005 have NULL in all of them (nothing was measured).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

_COLUMNS = (
    ("motion", sa.Double()), ("black_frames", sa.Integer()), ("flat_frames", sa.Integer()),
    ("frozen_frames", sa.Integer()), ("black", sa.Boolean()), ("flat", sa.Boolean()),
    ("frozen", sa.Boolean()), ("phash", sa.String(256)), ("latents_uri", sa.Text()),
    ("latents_sha256", sa.String(64)), ("latents_bytes", sa.BigInteger()),
)  # fmt: skip


def upgrade() -> None:
    with op.batch_alter_table("outputs") as batch:
        for name, kind in _COLUMNS:
            batch.add_column(sa.Column(name, kind, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("outputs") as batch:
        for name, _ in reversed(_COLUMNS):
            batch.drop_column(name)
