"""${message}

Revision: ${up_revision} (after ${down_revision | comma,n}), written ${create_date}.
Name every constraint and index with op.f() as the naming convention in storage/catalog/tables.py does, and keep
SQLite in mind: env.py sets render_as_batch, so column changes go through op.batch_alter_table.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
${imports if imports else ""}
revision = ${repr(up_revision)}
down_revision = ${repr(down_revision)}
branch_labels = ${repr(branch_labels)}
depends_on = ${repr(depends_on)}


def upgrade() -> None:
    ${upgrades if upgrades else "pass"}


def downgrade() -> None:
    ${downgrades if downgrades else "pass"}
