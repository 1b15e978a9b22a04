"""fraud: where the lock policy's count of a user's blocks starts again (after each request)

Revision ID: 0012
Revises: 0011
"""

from alembic import op

from billfold.migrations.sql_script import run_script

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None

# One row per user the policy ever requested a lock for: blocks are counted after
# `counted_after` (the request's time), so after a lock and an unlock N more blocks request a
# lock again, instead of the count within the window going past N and never equalling it again.
SCHEMA = r"""
CREATE TABLE fraud.lock_policy (
    user_id       text PRIMARY KEY,
    counted_after timestamptz NOT NULL,
    requests      integer NOT NULL DEFAULT 1
);
"""


def upgrade() -> None:
    run_script(SCHEMA)


def downgrade() -> None:
    op.execute("DROP TABLE IF EXISTS fraud.lock_policy")
