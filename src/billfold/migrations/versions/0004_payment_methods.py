"""payment_methods schema: cards and bank accounts, verification, defaults, funding

Revision ID: 0004
Revises: 0003
"""

from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

# No PAN, CVV or account number in clear anywhere here: a card is the vault's card and token ids
# plus what a wallet shows (brand, last4, expiry); a bank account number or IBAN is sealed under
# the process key (AES-256-GCM, bound to its row) and deduplicated by a keyed HMAC.
SCHEMA = """
CREATE SCHEMA IF NOT EXISTS payment_methods;

CREATE TABLE payment_methods.methods (
    id               text PRIMARY KEY,
    user_id          text NOT NULL,
    type             text NOT NULL CHECK (type IN ('card', 'bank_account')),
    status           text NOT NULL
        CHECK (status IN ('pending_verification', 'verified', 'failed', 'removed')),
    nickname         text,
    -- Card: the vault's HMAC of the PAN; bank account: our keyed HMAC of the account.
    fingerprint      text NOT NULL,
    last4            text NOT NULL CHECK (last4 ~ '^[0-9A-Z]{4}$'),
    brand            text,
    expiry_month     smallint CHECK (expiry_month BETWEEN 1 AND 12),
    expiry_year      smallint,
    cardholder_name  text,
    billing_address  jsonb,
    vault_card_id    text,
    vault_token_id   text,
    token_last4      text,
    bank_country     text CHECK (bank_country ~ '^[A-Z]{2}$'),
    routing_number   text CHECK (routing_number ~ '^[0-9]{9}$'),
    account_type     text CHECK (account_type IN ('checking', 'savings')),
    bic              text,
    bank_name        text,
    account_sealed   bytea,
    currency         text CHECK (currency ~ '^[A-Z]{3}$'),
    is_default       boolean NOT NULL DEFAULT false,
    failure_code     text,
    failure_reason   text,
    verified_at      timestamptz,
    removed_at       timestamptz,
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT methods_card_shape CHECK (
        type <> 'card' OR (brand IS NOT NULL AND vault_card_id IS NOT NULL
                           AND expiry_month IS NOT NULL AND expiry_year IS NOT NULL
                           AND account_sealed IS NULL)),
    CONSTRAINT methods_bank_shape CHECK (
        type <> 'bank_account' OR (bank_country IS NOT NULL AND currency IS NOT NULL
                                   AND vault_card_id IS NULL
                                   AND (account_sealed IS NOT NULL OR status = 'removed'))),
    -- Only a verified method can be the default one.
    CONSTRAINT methods_default_verified CHECK (NOT is_default OR status = 'verified')
);
-- At most one default per user, whatever the application does (that a user with a verified
-- method has one is the service's rule, not the database's).
CREATE UNIQUE INDEX methods_one_default ON payment_methods.methods (user_id) WHERE is_default;
-- The same card or account once per user while it is live (failed or removed ones may return).
CREATE UNIQUE INDEX methods_live_fingerprint ON payment_methods.methods (user_id, fingerprint)
    WHERE status IN ('pending_verification', 'verified');
CREATE INDEX methods_user ON payment_methods.methods (user_id, id);
-- Failed verifications of one card across all users (the card-testing cap).
CREATE INDEX methods_failed_fingerprint ON payment_methods.methods (fingerprint, created_at)
    WHERE failure_code IS NOT NULL;

-- The two small deposits that prove a bank account is the user's (amounts in minor units).
CREATE TABLE payment_methods.micro_deposits (
    payment_method_id text PRIMARY KEY REFERENCES payment_methods.methods (id),
    amount_1          smallint NOT NULL CHECK (amount_1 BETWEEN 1 AND 99),
    amount_2          smallint NOT NULL CHECK (amount_2 BETWEEN 1 AND 99),
    currency          text NOT NULL,
    status            text NOT NULL CHECK (status IN ('pending', 'confirmed', 'failed', 'expired')),
    attempts          integer NOT NULL DEFAULT 0 CHECK (attempts >= 0),
    max_attempts      integer NOT NULL CHECK (max_attempts > 0),
    expires_at        timestamptz NOT NULL,
    created_at        timestamptz NOT NULL DEFAULT now(),
    updated_at        timestamptz NOT NULL DEFAULT now(),
    CHECK (attempts <= max_attempts)
);

-- Money in (a card charge or an ACH debit) and out (an ACH credit), each with its ledger posting
-- once completed. A card top-up is written `pending` (with the user's Idempotency-Key) before the
-- card is charged, gets the approval after it, and is `completed` with its posting: a retry or
-- the recovery job finds it by its key and never charges the card a second time. `failed`: the
-- network's answer was lost to a crash (topup_interrupted).
CREATE TABLE payment_methods.fundings (
    id                 text PRIMARY KEY,
    user_id            text NOT NULL,
    payment_method_id  text NOT NULL REFERENCES payment_methods.methods (id),
    type               text NOT NULL CHECK (type IN ('topup', 'withdrawal')),
    rail               text NOT NULL CHECK (rail IN ('card', 'ach')),
    status             text NOT NULL DEFAULT 'completed'
        CHECK (status IN ('pending', 'completed', 'failed')),
    amount             bigint NOT NULL CHECK (amount > 0),
    currency           text NOT NULL CHECK (currency ~ '^[A-Z]{3}$'),
    posting_id         text UNIQUE,
    response_code      text,
    authorization_code text,
    network_reference  text,
    failure_code       text,
    idempotency_key    text,
    request_hash       text,
    balance_posted     bigint,
    balance_held       bigint,
    balance_available  bigint,
    created_at         timestamptz NOT NULL DEFAULT now(),
    updated_at         timestamptz NOT NULL DEFAULT now(),
    completed_at       timestamptz,
    CONSTRAINT fundings_completed_posted CHECK (
        (status = 'completed') = (posting_id IS NOT NULL AND completed_at IS NOT NULL))
);
CREATE INDEX fundings_user ON payment_methods.fundings (user_id, id);
CREATE INDEX fundings_method ON payment_methods.fundings (payment_method_id);
-- One top-up per user and Idempotency-Key, whatever runs at once.
CREATE UNIQUE INDEX fundings_idempotency ON payment_methods.fundings (user_id, idempotency_key)
    WHERE idempotency_key IS NOT NULL;
-- What the recovery job looks through: top-ups left between the charge and the credit.
CREATE INDEX fundings_pending ON payment_methods.fundings (updated_at) WHERE status = 'pending';
"""


def upgrade() -> None:
    for statement in SCHEMA.split(";\n"):
        code = [line for line in statement.splitlines() if not line.lstrip().startswith("--")]
        if "".join(code).strip():
            op.execute(statement)


def downgrade() -> None:
    op.execute("DROP SCHEMA payment_methods CASCADE")
