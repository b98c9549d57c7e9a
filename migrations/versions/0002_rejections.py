"""Manifest rows a run left out (`wanflow generate --skip-invalid`), with their line and reason.

Revision: 0002, after 0001. Written by hand to match `Rejection` in storage/catalog/tables.py.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "rejections",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("run_id", sa.Integer(), nullable=False),
        sa.Column("line", sa.Integer(), nullable=False),
        sa.Column("item_id", sa.String(200), nullable=True),
        sa.Column("field", sa.String(100), nullable=True),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("raw", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_rejections")),
        sa.ForeignKeyConstraint(
            ["run_id"], ["runs.id"], name=op.f("fk_rejections_run_id_runs"), ondelete="CASCADE"
        ),
    )
    op.create_index(op.f("ix_rejections_run_id"), "rejections", ["run_id"])


def downgrade() -> None:
    op.drop_index(op.f("ix_rejections_run_id"), table_name="rejections")
    op.drop_table("rejections")
