"""vault schema: data keys, cards, payment tokens, issuer keys, detokenisation audit

Revision ID: 0003
Revises: 0002
"""

from alembic import op  # noqa: F401  (the vault owner fills this in)

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    pass


def downgrade() -> None:
    pass
