"""loyalty schema: members (tier, the per-user lock), earn rules, earnings per capture, FIFO
lots, reversals per refund, redemptions, the activity feed; the ledger's `points` and `loyalty`
account kinds

Revision ID: 0011
Revises: 0010
"""

from alembic import op

from billfold.migrations.sql_script import run_script

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None

# Why this shape:
# - Points are the ledger unit PTS. A user's `points` account may go below zero only because a
#   refund claws back points already redeemed; redemption and expiry check the balance
#   themselves under the member row lock. The system `loyalty` account issues and takes back
#   PTS, and in real currencies is the rewards expense that pays for redemptions.
# - `members` is one row per user that ever earned: its row lock serialises every loyalty
#   change of that user (earn, reversal, redemption, expiry, tier), always taken first.
# - `earnings` is one row per capture (UNIQUE capture_id), also when it earned nothing, so a
#   refund's proportional reversal knows all that was captured. `reversals` is one per refund.
# - `lots` hold what is left of each earning for FIFO expiry and spending: the sum of the
#   remaining points of a user's lots equals their points balance whenever it is not negative.
SCHEMA = r"""
CREATE SCHEMA IF NOT EXISTS loyalty;

INSERT INTO ledger.account_kinds (kind, system, allow_overdraft) VALUES
    ('points', false, true),
    ('loyalty', true, true);

CREATE TABLE loyalty.members (
    user_id         text PRIMARY KEY,
    tier            text NOT NULL,
    tier_changed_at timestamptz NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX members_tier ON loyalty.members (tier, user_id);

-- `base` rules: the points one unit (10^minor digits minor units) of a currency earns.
-- `bonus` rules: a multiplier for captures that match every non-null condition; the best
-- match (priority, then multiplier) applies; caps bound the extra points it gives.
CREATE TABLE loyalty.earn_rules (
    id                  text PRIMARY KEY CHECK (id ~ '^[a-z0-9][a-z0-9_-]{0,63}$'),
    name                text NOT NULL,
    kind                text NOT NULL CHECK (kind IN ('base', 'bonus')),
    currency            text CHECK (currency ~ '^[A-Z]{3}$'),
    points_per_unit     numeric(12, 4) CHECK (points_per_unit >= 0),
    mcc                 text CHECK (mcc ~ '^[0-9]{4}$'),
    category            text,
    merchant_id         text,
    channel             text,
    multiplier          numeric(8, 3) CHECK (multiplier >= 1),
    cap_per_transaction bigint CHECK (cap_per_transaction >= 0),
    cap_per_month       bigint CHECK (cap_per_month >= 0),
    priority            integer NOT NULL DEFAULT 0,
    active              boolean NOT NULL DEFAULT true,
    created_at          timestamptz NOT NULL DEFAULT now(),
    CHECK (
        (kind = 'base' AND currency IS NOT NULL AND points_per_unit IS NOT NULL
         AND multiplier IS NULL)
        OR (kind = 'bonus' AND multiplier IS NOT NULL AND points_per_unit IS NULL)
    )
);
CREATE UNIQUE INDEX earn_rules_one_base ON loyalty.earn_rules (currency)
    WHERE kind = 'base' AND active;

INSERT INTO loyalty.earn_rules
    (id, name, kind, currency, points_per_unit, mcc, category, merchant_id, channel,
     multiplier, cap_per_transaction, cap_per_month, priority)
VALUES
    ('base-usd', '1 point per dollar', 'base', 'USD', 1, NULL, NULL, NULL, NULL,
     NULL, NULL, NULL, 0),
    ('base-eur', '1 point per euro', 'base', 'EUR', 1, NULL, NULL, NULL, NULL,
     NULL, NULL, NULL, 0),
    ('base-gbp', '1 point per pound', 'base', 'GBP', 1, NULL, NULL, NULL, NULL,
     NULL, NULL, NULL, 0),
    ('groceries-2x', 'Double points on groceries', 'bonus', NULL, NULL, NULL, 'groceries',
     NULL, NULL, 2, 500, 2000, 10),
    ('restaurants-3x', 'Triple points at restaurants', 'bonus', NULL, NULL, NULL,
     'restaurants', NULL, NULL, 3, 1000, 5000, 10),
    ('fuel-2x', 'Double points on fuel', 'bonus', NULL, NULL, '5541', NULL, NULL, NULL,
     2, 500, 2000, 20),
    ('contactless-1_5x', '1.5x when you tap to pay', 'bonus', NULL, NULL, NULL, NULL, NULL,
     'contactless', 1.5, 250, 1000, 0);

CREATE TABLE loyalty.earnings (
    id              bigserial PRIMARY KEY,
    capture_id      text NOT NULL UNIQUE,
    transaction_id  text NOT NULL,
    user_id         text NOT NULL,
    spend_amount    bigint NOT NULL CHECK (spend_amount >= 0),
    currency        text NOT NULL CHECK (currency ~ '^[A-Z]{3}$'),
    category        text,
    mcc             text,
    merchant_id     text,
    channel         text,
    tier            text NOT NULL,
    base_points     bigint NOT NULL CHECK (base_points >= 0),
    bonus_points    bigint NOT NULL CHECK (bonus_points >= 0),
    points          bigint NOT NULL CHECK (points = base_points + bonus_points),
    rule_ids        text[] NOT NULL,
    bonus_rule_id   text,
    posting_id      text,
    earned_at       timestamptz NOT NULL
);
CREATE INDEX earnings_transaction ON loyalty.earnings (transaction_id);
CREATE INDEX earnings_user_time ON loyalty.earnings (user_id, earned_at);
CREATE INDEX earnings_bonus_month ON loyalty.earnings (user_id, bonus_rule_id, earned_at)
    WHERE bonus_rule_id IS NOT NULL;

CREATE TABLE loyalty.lots (
    id              bigserial PRIMARY KEY,
    user_id         text NOT NULL,
    earning_id      bigint NOT NULL UNIQUE REFERENCES loyalty.earnings (id),
    transaction_id  text NOT NULL,
    points          bigint NOT NULL CHECK (points > 0),
    remaining       bigint NOT NULL CHECK (remaining BETWEEN 0 AND points),
    earned_at       timestamptz NOT NULL,
    expires_at      timestamptz NOT NULL,
    expired_points  bigint NOT NULL DEFAULT 0 CHECK (expired_points >= 0),
    expired_at      timestamptz
);
CREATE INDEX lots_open_by_user ON loyalty.lots (user_id, expires_at, id) WHERE remaining > 0;
CREATE INDEX lots_open_by_expiry ON loyalty.lots (expires_at) WHERE remaining > 0;

CREATE TABLE loyalty.reversals (
    id              bigserial PRIMARY KEY,
    refund_id       text NOT NULL UNIQUE,
    transaction_id  text NOT NULL,
    user_id         text NOT NULL,
    refund_amount   bigint NOT NULL CHECK (refund_amount >= 0),
    currency        text NOT NULL CHECK (currency ~ '^[A-Z]{3}$'),
    points          bigint NOT NULL CHECK (points >= 0),
    posting_id      text,
    created_at      timestamptz NOT NULL
);
CREATE INDEX reversals_transaction ON loyalty.reversals (transaction_id);
CREATE INDEX reversals_user_time ON loyalty.reversals (user_id, created_at);

CREATE TABLE loyalty.redemptions (
    id                text PRIMARY KEY,
    user_id           text NOT NULL,
    idempotency_key   text NOT NULL,
    points            bigint NOT NULL CHECK (points > 0),
    amount            bigint NOT NULL CHECK (amount > 0),
    currency          text NOT NULL CHECK (currency ~ '^[A-Z]{3}$'),
    points_posting_id text NOT NULL,
    money_posting_id  text NOT NULL,
    created_at        timestamptz NOT NULL,
    UNIQUE (user_id, idempotency_key)
);

-- What `GET /v1/loyalty/activity` lists: one line per effect on a user's points, signed.
CREATE TABLE loyalty.activity (
    id          bigserial PRIMARY KEY,
    user_id     text NOT NULL,
    type        text NOT NULL CHECK (type IN ('earned', 'reversed', 'redeemed', 'expired')),
    points      bigint NOT NULL,
    reference   text NOT NULL,
    created_at  timestamptz NOT NULL
);
CREATE INDEX activity_user ON loyalty.activity (user_id, id DESC);
"""


def upgrade() -> None:
    run_script(SCHEMA)


def downgrade() -> None:
    op.execute("DROP SCHEMA IF EXISTS loyalty CASCADE")
    op.execute(
        "DELETE FROM ledger.account_kinds k WHERE k.kind IN ('points', 'loyalty') "
        "AND NOT EXISTS (SELECT 1 FROM ledger.accounts a WHERE a.kind = k.kind)"
    )
