"""The catalog: runs, jobs and outputs in SQL (SQLite or PostgreSQL) behind a small transactional API.

records    statuses, record dataclasses, JobSpec, job keys (`job_key`, `spec_key`), CatalogError; no SQL.
tables     the declarative Base and the tables runs, jobs, run_jobs, outputs, models, rejections (Alembic).
engine     URLs, engines, SQLite pragmas, transactions, and the schema: its check and its upgrade.
planning   idempotent planning: runs created, models registered, rejected rows, jobs planned and found.
lifecycle  runs started, finished, crashed; jobs claimed, started, succeeded, failed, released, requeued.
queries    read-only queries and statistics: runs, jobs as each run sees them, outputs, progress, stats.
facade     `Catalog`, one short transaction per method over the session functions of the three above.
"""

from storage.catalog.engine import MIGRATIONS_DIR, alembic_config, make_engine
from storage.catalog.facade import Catalog
from storage.catalog.records import (
    LATENTS_CODEC,
    MAX_ERROR_CHARS,
    MAX_ID,
    CatalogError,
    JobGroupRow,
    JobRecord,
    JobSpec,
    JobStatus,
    OutputRecord,
    PlanOutcome,
    PlanSummary,
    RejectionRecord,
    RunRecord,
    RunStatus,
    job_key,
    spec_key,
)
from storage.catalog.tables import Base, Job, Model, Output, Rejection, Run, RunJob

__all__ = [
    "LATENTS_CODEC", "MAX_ERROR_CHARS", "MAX_ID", "MIGRATIONS_DIR", "Base", "Catalog", "CatalogError", "Job",
    "JobGroupRow", "JobRecord", "JobSpec", "JobStatus", "Model", "Output", "OutputRecord", "PlanOutcome",
    "PlanSummary", "Rejection", "RejectionRecord", "Run", "RunJob", "RunRecord", "RunStatus",
    "alembic_config", "job_key", "make_engine", "spec_key",
]  # fmt: skip
