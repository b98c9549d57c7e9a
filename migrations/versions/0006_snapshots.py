"""Versioned dataset snapshots: each export of a saved selection, and the samples it holds.

Revision: 0006, after 0005. Written by hand to match `Snapshot` and `SnapshotSample` in
storage/catalog/tables.py (see storage/catalog/snapshots.py).

- `snapshots`: name and version (unique together), where it was written (`uri`, credentials masked), its
  `format`, the saved `selection` it was made from, `content_sha256` over its samples, sample count,
  bytes, the flow run that made it;
- `snapshot_samples`: per snapshot, each sample's key in the export, its job and the video's sha256.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "snapshots",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("uri", sa.Text(), nullable=False),
        sa.Column("format", sa.String(32), nullable=False),
        sa.Column("selection", sa.JSON(), nullable=False),
        sa.Column("content_sha256", sa.String(64), nullable=False),
        sa.Column("samples", sa.Integer(), nullable=False),
        sa.Column("bytes", sa.BigInteger(), nullable=False),
        sa.Column("flow_run_id", sa.String(64), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_snapshots")),
        sa.UniqueConstraint("name", "version", name=op.f("uq_snapshots_name_version")),
    )
    op.create_table(
        "snapshot_samples",
        sa.Column("snapshot_id", sa.Integer(), nullable=False),
        sa.Column("key", sa.String(400), nullable=False),
        sa.Column("job_id", sa.Integer(), nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.PrimaryKeyConstraint("snapshot_id", "key", name=op.f("pk_snapshot_samples")),
        sa.ForeignKeyConstraint(["snapshot_id"], ["snapshots.id"],
                                name=op.f("fk_snapshot_samples_snapshot_id_snapshots"), ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["job_id"], ["jobs.id"], name=op.f("fk_snapshot_samples_job_id_jobs"),
                                ondelete="CASCADE"),
    )  # fmt: skip
    op.create_index(op.f("ix_snapshot_samples_job_id"), "snapshot_samples", ["job_id"])


def downgrade() -> None:
    op.drop_index(op.f("ix_snapshot_samples_job_id"), table_name="snapshot_samples")
    op.drop_table("snapshot_samples")
    op.drop_table("snapshots")
