"""payment_methods schema: cards and bank accounts, verification, defaults, funding

Revision ID: 0004
Revises: 0003
"""

from alembic import op  # noqa: F401  (the payment methods owner fills this in)

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    pass


def downgrade() -> None:
    pass
