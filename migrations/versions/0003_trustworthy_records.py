"""Records a team can trust: who made each job, where its output lives, which runs died, and posters.

Revision: 0003, after 0002. Written by hand to match storage/catalog/tables.py.

- `jobs.storage_root`: the storage root the job's output is written under. It joins the job's key, so a
  run into another root plans its own jobs instead of counting videos elsewhere as done.
- `jobs.last_run_id`: the run whose worker last claimed the job. A run's figures count only the jobs it
  made; a job another run made is `skipped` in its view.
- `runs.owner`: `<host>:<pid>:<start ticks>` of the process that runs the batch, so a later run on that
  host sees a run whose process died and marks it `crashed` (a new run status).
- `outputs.poster_uri`: the contact sheet stored beside each video.

Jobs planned before this revision have no storage root; they keep their keys and are found again only by
runs that plan them the old way (none): a run after the upgrade plans its jobs anew, once.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

_OLD_RUN_STATUSES = ("pending", "running", "succeeded", "failed", "cancelled")
_RUN_STATUSES = (*_OLD_RUN_STATUSES, "crashed")


def _one_of(values: tuple[str, ...]) -> str:
    return "status IN (" + ", ".join(f"'{value}'" for value in values) + ")"


def upgrade() -> None:
    with op.batch_alter_table("runs") as batch:
        batch.add_column(sa.Column("owner", sa.String(200), nullable=True))
        batch.drop_constraint(op.f("ck_runs_run_status"), type_="check")
        batch.create_check_constraint(op.f("ck_runs_run_status"), _one_of(_RUN_STATUSES))
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("storage_root", sa.Text(), nullable=True))
        batch.add_column(sa.Column("last_run_id", sa.Integer(), nullable=True))
        batch.create_foreign_key(
            op.f("fk_jobs_last_run_id_runs"), "runs", ["last_run_id"], ["id"], ondelete="SET NULL"
        )
        batch.create_index(op.f("ix_jobs_last_run_id"), ["last_run_id"])
    with op.batch_alter_table("outputs") as batch:
        batch.add_column(sa.Column("poster_uri", sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("outputs") as batch:
        batch.drop_column("poster_uri")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_index(op.f("ix_jobs_last_run_id"))
        batch.drop_constraint(op.f("fk_jobs_last_run_id_runs"), type_="foreignkey")
        batch.drop_column("last_run_id")
        batch.drop_column("storage_root")
    op.execute("UPDATE runs SET status = 'failed' WHERE status = 'crashed'")
    with op.batch_alter_table("runs") as batch:
        batch.drop_constraint(op.f("ck_runs_run_status"), type_="check")
        batch.create_check_constraint(op.f("ck_runs_run_status"), _one_of(_OLD_RUN_STATUSES))
        batch.drop_column("owner")
