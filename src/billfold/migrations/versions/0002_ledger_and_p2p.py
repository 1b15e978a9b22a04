"""ledger (accounts, postings, entries, holds) and p2p (transfers, requests, limits) schemas

Revision ID: 0002
Revises: 0001
"""

from alembic import op

from billfold.migrations.sql_script import run_script

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

# Errors raised by the ledger functions carry their own SQLSTATE (class "BF") so the Python side
# maps them to problems without parsing messages: see billfold.ledger.store.
LEDGER = """
CREATE SCHEMA IF NOT EXISTS ledger;

CREATE TABLE ledger.account_kinds (
    kind            text PRIMARY KEY,
    system          boolean NOT NULL,
    allow_overdraft boolean NOT NULL
);
INSERT INTO ledger.account_kinds (kind, system, allow_overdraft) VALUES
    ('wallet', false, false),
    ('escrow', true, false),
    ('funding', true, true),
    ('fees', true, false),
    ('settlement', true, true);

CREATE TABLE ledger.accounts (
    id              text PRIMARY KEY,
    owner_id        text NOT NULL,
    kind            text NOT NULL REFERENCES ledger.account_kinds (kind),
    currency        text NOT NULL CHECK (currency ~ '^[A-Z]{3}$'),
    allow_overdraft boolean NOT NULL,
    posted          bigint NOT NULL DEFAULT 0,
    held            bigint NOT NULL DEFAULT 0 CHECK (held >= 0),
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    -- The invariant no code path may break: available = posted - held never goes below zero.
    CONSTRAINT accounts_available CHECK (allow_overdraft OR posted - held >= 0),
    UNIQUE (owner_id, kind, currency)
);

CREATE TABLE ledger.postings (
    id          text PRIMARY KEY,
    kind        text NOT NULL,
    reference   text NOT NULL,
    memo        text,
    currency    text NOT NULL,
    reverses    text UNIQUE REFERENCES ledger.postings (id),
    created_at  timestamptz NOT NULL
);
CREATE INDEX postings_reference ON ledger.postings (reference);

CREATE TABLE ledger.entries (
    seq           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    posting_id    text NOT NULL REFERENCES ledger.postings (id),
    account_id    text NOT NULL REFERENCES ledger.accounts (id),
    amount        bigint NOT NULL CHECK (amount <> 0),
    balance_after bigint NOT NULL,
    created_at    timestamptz NOT NULL
);
CREATE INDEX entries_account ON ledger.entries (account_id, seq);
CREATE INDEX entries_posting ON ledger.entries (posting_id);

CREATE TABLE ledger.holds (
    id          text PRIMARY KEY,
    account_id  text NOT NULL REFERENCES ledger.accounts (id),
    amount      bigint NOT NULL CHECK (amount > 0),
    remaining   bigint NOT NULL CHECK (remaining >= 0 AND remaining <= amount),
    status      text NOT NULL CHECK (status IN ('active', 'committed', 'voided', 'expired')),
    reference   text NOT NULL,
    expires_at  timestamptz NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now(),
    CHECK ((status = 'active') = (remaining > 0))
);
CREATE INDEX holds_account ON ledger.holds (account_id, id);
CREATE INDEX holds_expiry ON ledger.holds (expires_at) WHERE status = 'active';

-- Opens the accounts a posting names that do not exist yet, then locks all of them in id order
-- (one fixed order for every transaction: concurrent postings never deadlock).
CREATE FUNCTION ledger.lock_accounts(
    p_currency text, p_owners text[], p_kinds text[], p_new_ids text[]
) RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    -- Accounts are never deleted, so a plain look tells whether all exist; only then is the
    -- (much dearer) insert skipped. Missing ones are inserted before any lock is taken here, so
    -- waiting on another transaction's insert of the same account never holds a lock it needs.
    IF (SELECT count(*) FROM ledger.accounts a
        JOIN unnest(p_owners, p_kinds) AS l (owner_id, kind)
          ON a.owner_id = l.owner_id AND a.kind = l.kind AND a.currency = p_currency)
       < cardinality(p_owners) THEN
        INSERT INTO ledger.accounts (id, owner_id, kind, currency, allow_overdraft)
        SELECT l.new_id, l.owner_id, l.kind, p_currency, k.allow_overdraft
        FROM unnest(p_owners, p_kinds, p_new_ids) AS l (owner_id, kind, new_id)
        JOIN ledger.account_kinds k ON k.kind = l.kind
        ORDER BY l.owner_id, l.kind
        ON CONFLICT (owner_id, kind, currency) DO NOTHING;
        IF (SELECT count(*) FROM ledger.account_kinds k WHERE k.kind = ANY (p_kinds))
            < (SELECT count(DISTINCT kind) FROM unnest(p_kinds) AS kind) THEN
            RAISE EXCEPTION USING ERRCODE = 'BF006', MESSAGE = 'unknown account kind';
        END IF;
    END IF;
    PERFORM 1 FROM ledger.accounts a
    JOIN unnest(p_owners, p_kinds) AS l (owner_id, kind)
      ON a.owner_id = l.owner_id AND a.kind = l.kind AND a.currency = p_currency
    ORDER BY a.id
    FOR UPDATE OF a;
END
$$;

-- One balanced posting in one call: legs are (owner, kind, signed amount) in one currency; a
-- positive amount raises the account's balance. Returns each leg's account and new balances.
CREATE FUNCTION ledger.post(
    p_posting_id text, p_kind text, p_reference text, p_memo text, p_currency text,
    p_owners text[], p_kinds text[], p_amounts bigint[], p_new_ids text[],
    p_reverses text DEFAULT NULL
) RETURNS TABLE (account_id text, owner_id text, kind text, amount bigint,
                 posted bigint, held bigint)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    v_now timestamptz;
    n int := coalesce(array_length(p_amounts, 1), 0);
BEGIN
    IF n < 2 OR array_length(p_owners, 1) <> n OR array_length(p_kinds, 1) <> n
        OR array_length(p_new_ids, 1) <> n
        OR (SELECT count(DISTINCT (o, k)) FROM unnest(p_owners, p_kinds) AS x (o, k)) <> n THEN
        RAISE EXCEPTION USING ERRCODE = 'BF006', MESSAGE = 'a posting needs distinct legs';
    END IF;
    IF (SELECT sum(a) FROM unnest(p_amounts) AS a) <> 0 OR 0 = ANY (p_amounts) THEN
        RAISE EXCEPTION USING ERRCODE = 'BF002', MESSAGE = 'posting is not balanced';
    END IF;
    PERFORM ledger.lock_accounts(p_currency, p_owners, p_kinds, p_new_ids);
    -- After the locks: entries of one account are stamped in the order they were written.
    v_now := clock_timestamp();
    INSERT INTO ledger.postings (id, kind, reference, memo, currency, reverses, created_at)
    VALUES (p_posting_id, p_kind, p_reference, p_memo, p_currency, p_reverses, v_now);
    RETURN QUERY
    WITH legs AS (
        SELECT * FROM unnest(p_owners, p_kinds, p_amounts) WITH ORDINALITY AS l (o, k, amt, ord)
    ), moved AS (
        UPDATE ledger.accounts a
        SET posted = a.posted + legs.amt, updated_at = v_now
        FROM legs
        WHERE a.owner_id = legs.o AND a.kind = legs.k AND a.currency = p_currency
        RETURNING a.id, a.owner_id, a.kind, legs.amt, a.posted, a.held, a.allow_overdraft, legs.ord
    ), written AS (
        INSERT INTO ledger.entries (posting_id, account_id, amount, balance_after, created_at)
        SELECT p_posting_id, moved.id, moved.amt, moved.posted, v_now FROM moved ORDER BY moved.ord
    )
    SELECT moved.id, moved.owner_id, moved.kind, moved.amt, moved.posted, moved.held
    FROM moved ORDER BY moved.ord;
END
$$;

-- Moves part or all of an active hold: the held amount is released and posted to the receiver
-- in one step. `p_final` releases whatever remains of the hold after this amount.
CREATE FUNCTION ledger.commit_hold(
    p_hold_id text, p_amount bigint, p_final boolean,
    p_posting_id text, p_kind text, p_memo text,
    p_to_owner text, p_to_kind text, p_new_id text
) RETURNS TABLE (account_id text, owner_id text, kind text, amount bigint,
                 posted bigint, held bigint)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    h ledger.holds%ROWTYPE;
    a ledger.accounts%ROWTYPE;
    v_release bigint;
BEGIN
    SELECT * INTO h FROM ledger.holds WHERE id = p_hold_id FOR UPDATE;
    IF NOT FOUND OR h.status <> 'active' THEN
        RAISE EXCEPTION USING ERRCODE = 'BF003', MESSAGE = 'hold is not active';
    END IF;
    IF h.expires_at <= now() THEN
        RAISE EXCEPTION USING ERRCODE = 'BF005', MESSAGE = 'hold has expired';
    END IF;
    IF p_amount <= 0 OR p_amount > h.remaining THEN
        RAISE EXCEPTION USING ERRCODE = 'BF004', MESSAGE = 'amount exceeds the hold';
    END IF;
    SELECT * INTO a FROM ledger.accounts WHERE id = h.account_id;
    PERFORM ledger.lock_accounts(a.currency, ARRAY[a.owner_id, p_to_owner],
                                 ARRAY[a.kind, p_to_kind], ARRAY[a.id, p_new_id]);
    v_release := CASE WHEN p_final THEN h.remaining ELSE p_amount END;
    UPDATE ledger.holds
    SET remaining = h.remaining - v_release,
        status = CASE WHEN h.remaining - v_release = 0 THEN 'committed' ELSE 'active' END,
        updated_at = now()
    WHERE id = p_hold_id;
    UPDATE ledger.accounts SET held = ledger.accounts.held - v_release WHERE id = h.account_id;
    RETURN QUERY SELECT * FROM ledger.post(
        p_posting_id, p_kind, h.reference, p_memo, a.currency,
        ARRAY[a.owner_id, p_to_owner], ARRAY[a.kind, p_to_kind], ARRAY[-p_amount, p_amount],
        ARRAY[a.id, p_new_id]);
END
$$;

-- Releases what remains of an active hold (voided by the caller or expired by the sweeper).
CREATE FUNCTION ledger.release_hold(p_hold_id text, p_status text)
RETURNS bigint LANGUAGE plpgsql AS $$
DECLARE
    h ledger.holds%ROWTYPE;
BEGIN
    SELECT * INTO h FROM ledger.holds WHERE id = p_hold_id FOR UPDATE;
    IF NOT FOUND OR h.status <> 'active' THEN
        RAISE EXCEPTION USING ERRCODE = 'BF003', MESSAGE = 'hold is not active';
    END IF;
    UPDATE ledger.holds SET remaining = 0, status = p_status, updated_at = now()
    WHERE id = p_hold_id;
    UPDATE ledger.accounts SET held = held - h.remaining, updated_at = now()
    WHERE id = h.account_id;
    RETURN h.remaining;
END
$$;
"""

P2P = """
CREATE SCHEMA IF NOT EXISTS p2p;

CREATE TABLE p2p.transfers (
    id                 text PRIMARY KEY,
    sender_id          text NOT NULL,
    sender_name        text NOT NULL,
    recipient_id       text,
    recipient_name     text,
    recipient_kind     text NOT NULL
        CHECK (recipient_kind IN ('user_id', 'email', 'phone', 'handle')),
    -- Keyed hash of the e-mail address or phone number an unclaimed transfer waits for, and the
    -- contact itself sealed (for the invitation when a transfer held for review is released).
    recipient_contact_hash bytea,
    recipient_contact_sealed bytea,
    recipient_hint     text NOT NULL,
    amount             bigint NOT NULL CHECK (amount > 0),
    currency           text NOT NULL,
    note               text,
    status             text NOT NULL CHECK (status IN (
        'pending', 'completed', 'failed', 'cancelled', 'pending_claim', 'expired', 'reversed')),
    failure_reason     text,
    request_id         text,
    posting_id         text,
    hold_id            text,
    claim_expires_at   timestamptz,
    -- The sender's limit windows (local day and month) this transfer was counted in: a transfer
    -- that never arrives gives its amount back to those, whatever the sender's time zone is now.
    limit_day          date NOT NULL,
    limit_month        date NOT NULL,
    created_at         timestamptz NOT NULL DEFAULT now(),
    updated_at         timestamptz NOT NULL DEFAULT now(),
    completed_at       timestamptz,
    -- Only a transfer addressed to an e-mail/phone can lack a recipient (until it is claimed).
    CHECK (recipient_id IS NOT NULL OR recipient_kind IN ('email', 'phone'))
);
CREATE INDEX transfers_sender ON p2p.transfers (sender_id, id);
CREATE INDEX transfers_recipient ON p2p.transfers (recipient_id, id);
CREATE INDEX transfers_unclaimed ON p2p.transfers (recipient_contact_hash)
    WHERE status = 'pending_claim';
CREATE INDEX transfers_claim_expiry ON p2p.transfers (claim_expires_at)
    WHERE status = 'pending_claim';
-- A money request is paid by one live transfer at most, whatever the application does; one that
-- never arrived (cancelled, refused or expired on review) leaves the request open to pay again.
CREATE UNIQUE INDEX transfers_request ON p2p.transfers (request_id)
    WHERE request_id IS NOT NULL AND status NOT IN ('failed', 'cancelled', 'expired');

CREATE TABLE p2p.transfer_requests (
    id                 text PRIMARY KEY,
    requester_id       text NOT NULL,
    requester_name     text NOT NULL,
    payer_id           text,
    payer_name         text,
    payer_kind         text NOT NULL CHECK (payer_kind IN ('user_id', 'email', 'phone', 'handle')),
    payer_contact_hash bytea,
    payer_hint         text NOT NULL,
    amount             bigint NOT NULL CHECK (amount > 0),
    currency           text NOT NULL,
    note               text,
    status             text NOT NULL
        CHECK (status IN ('pending', 'accepted', 'declined', 'cancelled', 'expired')),
    transfer_id        text REFERENCES p2p.transfers (id),
    expires_at         timestamptz NOT NULL,
    created_at         timestamptz NOT NULL DEFAULT now(),
    updated_at         timestamptz NOT NULL DEFAULT now(),
    decided_at         timestamptz
);
CREATE INDEX transfer_requests_requester ON p2p.transfer_requests (requester_id, id);
CREATE INDEX transfer_requests_payer ON p2p.transfer_requests (payer_id, id);
CREATE INDEX transfer_requests_unmatched ON p2p.transfer_requests (payer_contact_hash)
    WHERE status = 'pending' AND payer_id IS NULL;
CREATE INDEX transfer_requests_expiry ON p2p.transfer_requests (expires_at)
    WHERE status = 'pending';

-- Defaults by KYC tier; a null limit means "not allowed" is expressed as 0, never as null.
CREATE TABLE p2p.tier_limits (
    kyc_tier     smallint NOT NULL,
    currency     text NOT NULL,
    per_transfer bigint NOT NULL CHECK (per_transfer >= 0),
    daily        bigint NOT NULL CHECK (daily >= 0),
    monthly      bigint NOT NULL CHECK (monthly >= 0),
    PRIMARY KEY (kyc_tier, currency)
);
-- Tier 0 (identity not verified) may send small amounts; 1 = basic, 2 = full KYC.
INSERT INTO p2p.tier_limits (kyc_tier, currency, per_transfer, daily, monthly)
SELECT t.tier, c.currency, t.per_transfer, t.daily, t.monthly
FROM (VALUES (0, 5000, 10000, 20000), (1, 100000, 250000, 1000000),
             (2, 500000, 1000000, 5000000)) AS t (tier, per_transfer, daily, monthly)
CROSS JOIN (VALUES ('USD'), ('EUR'), ('GBP'), ('CHF'), ('CAD'), ('AUD')) AS c (currency);

-- Per user and currency: overrides (null = the tier's default) and what was used in the user's
-- current local day and month.
CREATE TABLE p2p.transfer_limits (
    user_id            text NOT NULL,
    currency           text NOT NULL,
    per_transfer_limit bigint CHECK (per_transfer_limit >= 0),
    daily_limit        bigint CHECK (daily_limit >= 0),
    monthly_limit      bigint CHECK (monthly_limit >= 0),
    used_today         bigint NOT NULL DEFAULT 0,
    usage_day          date,
    used_this_month    bigint NOT NULL DEFAULT 0,
    usage_month        date,
    updated_at         timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (user_id, currency)
);
"""


def upgrade() -> None:
    run_script(LEDGER)
    run_script(P2P)


def downgrade() -> None:
    op.execute("DROP SCHEMA p2p CASCADE")
    op.execute("DROP SCHEMA ledger CASCADE")
