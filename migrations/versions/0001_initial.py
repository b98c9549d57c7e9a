"""The initial catalog schema: runs, models, jobs, run_jobs, outputs.

Revision: 0001 (first). Written by hand to match storage/catalog/tables.py; constraint names follow its naming
convention (pk_<table>, uq_<table>_<columns>, ck_<table>_<name>, fk_<table>_<column>_<referred>,
ix_<table>_<column>). Status columns are VARCHAR(16) with CHECK constraints rather than native enums, so
new values only need a new CHECK. The allowed values are spelled out here, frozen at this revision.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

_JSON = sa.JSON()
_TIME = sa.DateTime(timezone=True)


def _one_of(column: str, values: tuple[str, ...], name: str) -> sa.CheckConstraint:
    allowed = ", ".join(f"'{value}'" for value in values)
    return sa.CheckConstraint(f"{column} IN ({allowed})", name=op.f(name))


def upgrade() -> None:
    op.create_table(
        "runs",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("manifest_uri", sa.Text(), nullable=False),
        sa.Column("manifest_sha256", sa.String(64), nullable=False),
        sa.Column("settings", _JSON, nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("flow_run_id", sa.String(64), nullable=True),
        sa.Column("created_at", _TIME, nullable=False),
        sa.Column("started_at", _TIME, nullable=True),
        sa.Column("finished_at", _TIME, nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_runs")),
        sa.UniqueConstraint("name", name=op.f("uq_runs_name")),
        _one_of("status", ("pending", "running", "succeeded", "failed", "cancelled"), "ck_runs_run_status"),
    )
    op.create_index(op.f("ix_runs_flow_run_id"), "runs", ["flow_run_id"])

    op.create_table(
        "models",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("model_id", sa.String(100), nullable=False),
        sa.Column("fingerprint", sa.String(128), nullable=False),
        sa.Column("source", sa.Text(), nullable=False),
        sa.Column("details", _JSON, nullable=False),
        sa.Column("registered_at", _TIME, nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_models")),
        sa.UniqueConstraint("model_id", "fingerprint", name=op.f("uq_models_model_id_fingerprint")),
    )

    op.create_table(
        "jobs",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("key", sa.String(64), nullable=False),
        sa.Column("first_run_id", sa.Integer(), nullable=False),
        sa.Column("item_id", sa.String(200), nullable=False),
        sa.Column("seed", sa.BigInteger(), nullable=False),
        sa.Column("model_id", sa.String(100), nullable=False),
        sa.Column("model_fingerprint", sa.String(128), nullable=False),
        sa.Column("params", _JSON, nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("worker_id", sa.String(200), nullable=True),
        sa.Column("created_at", _TIME, nullable=False),
        sa.Column("claimed_at", _TIME, nullable=True),
        sa.Column("started_at", _TIME, nullable=True),
        sa.Column("finished_at", _TIME, nullable=True),
        sa.Column("seconds", sa.Double(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_jobs")),
        sa.UniqueConstraint("key", name=op.f("uq_jobs_key")),
        sa.ForeignKeyConstraint(["first_run_id"], ["runs.id"], name=op.f("fk_jobs_first_run_id_runs")),
        _one_of("status", ("pending", "running", "succeeded", "failed", "skipped"), "ck_jobs_job_status"),
    )
    op.create_index(op.f("ix_jobs_first_run_id"), "jobs", ["first_run_id"])
    op.create_index(op.f("ix_jobs_item_id"), "jobs", ["item_id"])
    op.create_index(op.f("ix_jobs_status"), "jobs", ["status"])

    op.create_table(
        "run_jobs",
        sa.Column("run_id", sa.Integer(), nullable=False),
        sa.Column("job_id", sa.Integer(), nullable=False),
        sa.Column("outcome", sa.String(16), nullable=False),
        sa.Column("planned_at", _TIME, nullable=False),
        sa.PrimaryKeyConstraint("run_id", "job_id", name=op.f("pk_run_jobs")),
        sa.ForeignKeyConstraint(
            ["run_id"], ["runs.id"], name=op.f("fk_run_jobs_run_id_runs"), ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(
            ["job_id"], ["jobs.id"], name=op.f("fk_run_jobs_job_id_jobs"), ondelete="CASCADE"
        ),
        _one_of(
            "outcome", ("created", "already_done", "requeued", "already_planned"), "ck_run_jobs_plan_outcome"
        ),
    )
    op.create_index(op.f("ix_run_jobs_job_id"), "run_jobs", ["job_id"])

    op.create_table(
        "outputs",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("job_id", sa.Integer(), nullable=False),
        sa.Column("uri", sa.Text(), nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("bytes", sa.BigInteger(), nullable=False),
        sa.Column("width", sa.Integer(), nullable=False),
        sa.Column("height", sa.Integer(), nullable=False),
        sa.Column("frames", sa.Integer(), nullable=False),
        sa.Column("fps", sa.Double(), nullable=False),
        sa.Column("codec", sa.String(32), nullable=False),
        sa.Column("thumbnail_uri", sa.Text(), nullable=True),
        sa.Column("sidecar_uri", sa.Text(), nullable=True),
        sa.Column("device", sa.String(64), nullable=True),
        sa.Column("peak_memory_bytes", sa.BigInteger(), nullable=True),
        sa.Column("created_at", _TIME, nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_outputs")),
        sa.UniqueConstraint("job_id", name=op.f("uq_outputs_job_id")),
        sa.ForeignKeyConstraint(
            ["job_id"], ["jobs.id"], name=op.f("fk_outputs_job_id_jobs"), ondelete="CASCADE"
        ),
    )


def downgrade() -> None:
    op.drop_table("outputs")
    op.drop_index(op.f("ix_run_jobs_job_id"), table_name="run_jobs")
    op.drop_table("run_jobs")
    for column in ("status", "item_id", "first_run_id"):
        op.drop_index(op.f(f"ix_jobs_{column}"), table_name="jobs")
    op.drop_table("jobs")
    op.drop_table("models")
    op.drop_index(op.f("ix_runs_flow_run_id"), table_name="runs")
    op.drop_table("runs")
