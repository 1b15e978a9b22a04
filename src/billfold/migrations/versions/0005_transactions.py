"""transactions schema: payments (authorize, capture, void, refund, increment), details, MCC
categories

Revision ID: 0005
Revises: 0004
"""

from alembic import op

from billfold.migrations.sql_script import run_script

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

# No PAN, DPAN or cryptogram anywhere here: a card payment names the payment method and the
# vault's token id; what a receipt shows (brand, last4) sits in the details.
SCHEMA = """
CREATE SCHEMA IF NOT EXISTS transactions;

-- Spending categories (the monthly summary groups by these) and the MCC ranges that map to
-- them. Ranges may nest: the narrowest range holding an MCC wins (5411 groceries inside
-- 5200-5999 shopping); an MCC in no range is 'other'.
CREATE TABLE transactions.categories (
    category  text PRIMARY KEY,
    label     text NOT NULL,
    position  smallint NOT NULL UNIQUE
);
INSERT INTO transactions.categories (category, label, position) VALUES
    ('groceries', 'Groceries', 1),
    ('restaurants', 'Restaurants', 2),
    ('transport', 'Transport', 3),
    ('fuel', 'Fuel', 4),
    ('travel', 'Travel', 5),
    ('entertainment', 'Entertainment', 6),
    ('shopping', 'Shopping', 7),
    ('utilities', 'Utilities', 8),
    ('health', 'Health', 9),
    ('services', 'Services', 10),
    ('cash', 'Cash', 11),
    ('other', 'Other', 12);

CREATE TABLE transactions.mcc_categories (
    mcc_from  smallint NOT NULL CHECK (mcc_from BETWEEN 0 AND 9999),
    mcc_to    smallint NOT NULL CHECK (mcc_to BETWEEN 0 AND 9999),
    category  text NOT NULL REFERENCES transactions.categories (category),
    PRIMARY KEY (mcc_from, mcc_to),
    CHECK (mcc_from <= mcc_to)
);
INSERT INTO transactions.mcc_categories (mcc_from, mcc_to, category) VALUES
    -- groceries: supermarkets, food stores
    (5411, 5411, 'groceries'), (5422, 5422, 'groceries'), (5441, 5441, 'groceries'),
    (5451, 5451, 'groceries'), (5462, 5462, 'groceries'), (5499, 5499, 'groceries'),
    -- restaurants: caterers, eating places, bars, fast food
    (5811, 5814, 'restaurants'),
    -- transport: rail, commuter, taxis, buses, tolls, parking
    (4011, 4011, 'transport'), (4111, 4131, 'transport'), (4121, 4121, 'transport'),
    (4784, 4784, 'transport'), (4789, 4789, 'transport'), (7523, 7523, 'transport'),
    -- fuel: service stations, automated fuel dispensers, fuel dealers, EV charging
    (5541, 5542, 'fuel'), (5552, 5552, 'fuel'), (5983, 5983, 'fuel'),
    -- travel: airlines, car rental and hotels by brand (3000-3999), airlines, travel agencies,
    -- cruises, lodging, car rental
    (3000, 3999, 'travel'), (4411, 4411, 'travel'), (4511, 4511, 'travel'),
    (4722, 4722, 'travel'), (7011, 7011, 'travel'), (7512, 7512, 'travel'),
    -- entertainment: cinemas, theatre, recreation; digital media and games; streaming
    (7832, 7832, 'entertainment'), (7922, 7999, 'entertainment'),
    (5815, 5818, 'entertainment'), (4899, 4899, 'entertainment'),
    -- shopping: retail stores in general (narrower ranges above take precedence)
    (5200, 5999, 'shopping'),
    -- utilities: telecommunications, electricity, gas, water
    (4812, 4816, 'utilities'), (4900, 4900, 'utilities'),
    -- health: doctors, dentists, hospitals, pharmacies
    (8000, 8099, 'health'), (5912, 5912, 'health'), (5122, 5122, 'health'),
    -- services: contractors, personal, business, repair, professional, education, insurance
    (1500, 2999, 'services'), (7200, 7299, 'services'), (7300, 7399, 'services'),
    (7500, 7549, 'services'), (7600, 7699, 'services'), (8100, 8999, 'services'),
    (6300, 6399, 'services'),
    -- cash: ATM and manual cash disbursements, quasi-cash
    (6010, 6011, 'cash'), (6012, 6012, 'cash'), (6051, 6051, 'cash');

-- The category of an MCC ('5411' → 'groceries'), for writers and readers alike.
CREATE FUNCTION transactions.category_for_mcc(p_mcc text) RETURNS text
LANGUAGE sql STABLE AS $$
    SELECT coalesce(
        (SELECT c.category FROM transactions.mcc_categories c
         WHERE p_mcc ~ '^[0-9]{4}$' AND p_mcc::smallint BETWEEN c.mcc_from AND c.mcc_to
         ORDER BY c.mcc_to - c.mcc_from, c.mcc_from LIMIT 1),
        'other')
$$;

CREATE TABLE transactions.transactions (
    id                 text PRIMARY KEY,
    user_id            text NOT NULL,
    source             text NOT NULL CHECK (source IN ('card', 'wallet')),
    payment_method_id  text,
    token_id           text,
    status             text NOT NULL CHECK (status IN (
        'authorizing', 'authorized', 'declined', 'challenge_required', 'review',
        'partially_captured', 'captured', 'voided', 'expired', 'partially_refunded',
        'refunded', 'failed')),
    amount             bigint NOT NULL CHECK (amount > 0),
    currency           text NOT NULL CHECK (currency ~ '^[A-Z]{3}$'),
    -- What the authorization covers now (grows with incremental authorizations), what was
    -- captured of it, what was let go without capture (void, final capture, expiry), and what
    -- was refunded of the captured part.
    authorized_amount  bigint NOT NULL DEFAULT 0 CHECK (authorized_amount >= 0),
    captured_amount    bigint NOT NULL DEFAULT 0 CHECK (captured_amount >= 0),
    released_amount    bigint NOT NULL DEFAULT 0 CHECK (released_amount >= 0),
    refunded_amount    bigint NOT NULL DEFAULT 0 CHECK (refunded_amount >= 0),
    merchant_id        text NOT NULL,
    merchant_name      text NOT NULL,
    mcc                text NOT NULL CHECK (mcc ~ '^[0-9]{4}$'),
    category           text NOT NULL REFERENCES transactions.categories (category),
    channel            text NOT NULL CHECK (channel IN ('contactless', 'in_app', 'ecommerce')),
    device_id          text,
    description        text,
    note               text,
    decline_code       text,
    hold_id            text,
    auth_code          text,
    rrn                text,
    stan               text,
    idempotency_key    text NOT NULL,
    -- Keyed hash of the creating request: the same key with another request is refused.
    request_hash       text NOT NULL,
    expires_at         timestamptz,
    created_at         timestamptz NOT NULL DEFAULT now(),
    updated_at         timestamptz NOT NULL DEFAULT now(),
    authorized_at      timestamptz,
    CHECK ((source = 'card') = (payment_method_id IS NOT NULL)),
    -- The limits no concurrent capture or refund may break, whatever the application does.
    CONSTRAINT transactions_capture_limit
        CHECK (captured_amount + released_amount <= authorized_amount),
    CONSTRAINT transactions_refund_limit CHECK (refunded_amount <= captured_amount),
    UNIQUE (user_id, idempotency_key)
);
-- The history's list indexes (user_id, id) and (user_id, created_at) come with its search, in
-- 0006.
CREATE INDEX transactions_payment_method ON transactions.transactions (payment_method_id)
    WHERE payment_method_id IS NOT NULL;
-- The sweepers' work lists: authorizations that lapse, rows a crash left half-done.
-- `expires_at` is set only while something may still be captured or confirmed.
CREATE INDEX transactions_expiry ON transactions.transactions (expires_at)
    WHERE expires_at IS NOT NULL;
CREATE INDEX transactions_authorizing ON transactions.transactions (created_at)
    WHERE status = 'authorizing';

CREATE TABLE transactions.transaction_details (
    transaction_id     text PRIMARY KEY REFERENCES transactions.transactions (id),
    merchant_country   text NOT NULL CHECK (merchant_country ~ '^[A-Z]{2}$'),
    merchant_city      text,
    latitude           double precision CHECK (latitude BETWEEN -90 AND 90),
    longitude          double precision CHECK (longitude BETWEEN -180 AND 180),
    card_brand         text,
    card_last4         text CHECK (card_last4 ~ '^[0-9]{4}$'),
    response_code      text,
    stand_in           boolean NOT NULL DEFAULT false,
    risk_action        text CHECK (risk_action IN ('allow', 'challenge', 'review', 'block')),
    risk_score         integer,
    risk_reasons       text[] NOT NULL DEFAULT '{}',
    -- Milliseconds per step of the authorization: auth, token, fraud, network, db,
    -- notify_enqueue.
    timings            jsonb NOT NULL DEFAULT '{}',
    updated_at         timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE transactions.captures (
    id              text PRIMARY KEY,
    transaction_id  text NOT NULL REFERENCES transactions.transactions (id),
    amount          bigint NOT NULL CHECK (amount > 0),
    final           boolean NOT NULL,
    -- The ledger posting of a wallet payment's capture; card captures move no wallet money.
    posting_id      text UNIQUE,
    idempotency_key text NOT NULL,
    request_hash    text NOT NULL,
    -- A card capture's completion advice (0220) goes to the network after the capture commits:
    -- the worker re-sends those a crash left unsent.
    advised_at      timestamptz,
    created_at      timestamptz NOT NULL DEFAULT now(),
    UNIQUE (transaction_id, idempotency_key)
);
CREATE INDEX captures_transaction ON transactions.captures (transaction_id, id);
CREATE INDEX captures_unadvised ON transactions.captures (created_at) WHERE advised_at IS NULL;

CREATE TABLE transactions.refunds (
    id              text PRIMARY KEY,
    transaction_id  text NOT NULL REFERENCES transactions.transactions (id),
    amount          bigint NOT NULL CHECK (amount > 0),
    status          text NOT NULL CHECK (status IN ('pending', 'succeeded', 'failed')),
    reason          text,
    posting_id      text UNIQUE,
    response_code   text,
    auth_code       text,
    rrn             text,
    failure_code    text,
    idempotency_key text NOT NULL,
    request_hash    text NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    UNIQUE (transaction_id, idempotency_key)
);
CREATE INDEX refunds_transaction ON transactions.refunds (transaction_id, id);
CREATE INDEX refunds_pending ON transactions.refunds (created_at) WHERE status = 'pending';

-- Incremental authorizations (a tip, a longer hotel stay): each one asked of the network or
-- added to the wallet hold.
CREATE TABLE transactions.increments (
    id              text PRIMARY KEY,
    transaction_id  text NOT NULL REFERENCES transactions.transactions (id),
    amount          bigint NOT NULL CHECK (amount > 0),
    status          text NOT NULL CHECK (status IN ('pending', 'approved', 'declined', 'failed')),
    hold_id         text,
    response_code   text,
    decline_code    text,
    auth_code       text,
    stan            text,
    rrn             text,
    idempotency_key text NOT NULL,
    request_hash    text NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    UNIQUE (transaction_id, idempotency_key)
);
CREATE INDEX increments_transaction ON transactions.increments (transaction_id, id);
"""


def upgrade() -> None:
    run_script(SCHEMA)


def downgrade() -> None:
    op.execute("DROP SCHEMA transactions CASCADE")
