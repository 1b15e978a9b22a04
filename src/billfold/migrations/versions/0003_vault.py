"""vault schema: data keys, cards, payment tokens, issuer keys, detokenisation audit

Revision ID: 0003
Revises: 0002
"""

from alembic import op

from billfold.migrations.sql_script import run_script

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

# Nothing here is readable without the HSM: PANs, cardholder names, DPANs and issuer master
# keys are AES-256-GCM ciphertexts under a data key, and data keys are wrapped by a KEK that
# never leaves the HSM. Fingerprints and the DPAN index are HMACs under an HSM key.
VAULT = """
CREATE SCHEMA IF NOT EXISTS vault;

-- Envelope encryption: each data key is wrapped (AES-GCM in the HSM) by KEK `kek_version`.
-- Rotating the KEK re-wraps these rows; ciphertexts under the data keys stay as they are.
CREATE TABLE vault.data_keys (
    id           text PRIMARY KEY,
    kek_version  integer NOT NULL CHECK (kek_version > 0),
    wrapped      bytea NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    rewrapped_at timestamptz,
    retired_at   timestamptz
);
CREATE INDEX data_keys_kek_version ON vault.data_keys (kek_version, id);
-- New ciphertexts use the one current (not retired) data key.
CREATE UNIQUE INDEX data_keys_current ON vault.data_keys ((true)) WHERE retired_at IS NULL;

CREATE TABLE vault.cards (
    id            text PRIMARY KEY,
    owner_id      text NOT NULL,
    -- HMAC-SHA256 of the PAN under the HSM fingerprint key: the same card for every owner.
    fingerprint   bytea NOT NULL CHECK (length(fingerprint) = 32),
    bin           text NOT NULL CHECK (bin ~ '^[0-9]{6}$'),
    last4         text NOT NULL CHECK (last4 ~ '^[0-9]{4}$'),
    data_key_id   text NOT NULL REFERENCES vault.data_keys (id),
    -- nonce || AES-256-GCM(PAN) with aad = the row id; wiped (null) when the card is deleted.
    pan_sealed    bytea,
    name_sealed   bytea,
    expiry_month  smallint NOT NULL CHECK (expiry_month BETWEEN 1 AND 12),
    expiry_year   smallint NOT NULL CHECK (expiry_year BETWEEN 2000 AND 2199),
    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now(),
    deleted_at    timestamptz,
    delete_reason text,
    CHECK ((deleted_at IS NULL) = (pan_sealed IS NOT NULL)),
    CHECK (deleted_at IS NULL OR name_sealed IS NULL)
);
-- One live card per owner and PAN: vaulting the same card again finds this row.
CREATE UNIQUE INDEX cards_owner_fingerprint ON vault.cards (owner_id, fingerprint)
    WHERE deleted_at IS NULL;
CREATE INDEX cards_fingerprint ON vault.cards (fingerprint);
CREATE INDEX cards_data_key ON vault.cards (data_key_id);

-- EMV issuer master keys for application cryptograms (double-length 3DES), per token BIN and
-- version, sealed under a data key. A token keeps the key it was issued under.
CREATE TABLE vault.issuer_keys (
    id          text PRIMARY KEY,
    token_bin   text NOT NULL CHECK (token_bin ~ '^[0-9]{6,8}$'),
    version     integer NOT NULL CHECK (version > 0),
    data_key_id text NOT NULL REFERENCES vault.data_keys (id),
    key_sealed  bytea NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    retired_at  timestamptz,
    UNIQUE (token_bin, version)
);
CREATE UNIQUE INDEX issuer_keys_current ON vault.issuer_keys (token_bin) WHERE retired_at IS NULL;

CREATE TABLE vault.tokens (
    id                 text PRIMARY KEY,
    card_id            text NOT NULL REFERENCES vault.cards (id),
    owner_id           text NOT NULL,
    token_reference_id text NOT NULL UNIQUE,
    token_bin          text NOT NULL,
    issuer_key_id      text NOT NULL REFERENCES vault.issuer_keys (id),
    data_key_id        text NOT NULL REFERENCES vault.data_keys (id),
    -- nonce || AES-256-GCM(DPAN) with aad = the row id.
    dpan_sealed        bytea NOT NULL,
    -- HMAC of the DPAN under the HSM fingerprint key: finds a token by DPAN (network path)
    -- and makes a DPAN collision a unique violation (the issuer retries with another).
    dpan_index         bytea NOT NULL UNIQUE,
    dpan_last4         text NOT NULL CHECK (dpan_last4 ~ '^[0-9]{4}$'),
    psn                text NOT NULL DEFAULT '00' CHECK (psn ~ '^[0-9]{2}$'),
    expiry_month       smallint NOT NULL CHECK (expiry_month BETWEEN 1 AND 12),
    expiry_year        smallint NOT NULL CHECK (expiry_year BETWEEN 2000 AND 2199),
    status             text NOT NULL CHECK (status IN ('active', 'suspended', 'deleted')),
    status_reason      text,
    -- Domain restriction controls: null device/merchant = not restricted.
    device_id          text,
    channels           text[] NOT NULL CHECK (
        cardinality(channels) > 0
        AND channels <@ ARRAY['contactless', 'in_app', 'ecommerce']::text[]),
    merchant_id        text,
    -- Application transaction counter (9F36, two bytes): one per cryptogram, never reused.
    atc                integer NOT NULL DEFAULT 0 CHECK (atc BETWEEN 0 AND 65535),
    -- The highest ATC the issuer side accepted, and which of the 64 ATCs up to it were accepted
    -- (bit i: last_verified_atc - i). Cryptograms may reach the issuer out of order (two payments
    -- at once); an unused ATC within that window is accepted once, anything else is a replay.
    last_verified_atc  integer NOT NULL DEFAULT 0 CHECK (last_verified_atc BETWEEN 0 AND 65535),
    verified_atcs      bigint NOT NULL DEFAULT 0,
    created_at         timestamptz NOT NULL DEFAULT now(),
    updated_at         timestamptz NOT NULL DEFAULT now(),
    deleted_at         timestamptz,
    CHECK ((status = 'deleted') = (deleted_at IS NOT NULL))
);
CREATE INDEX tokens_card ON vault.tokens (card_id, id);
CREATE INDEX tokens_data_key ON vault.tokens (data_key_id);

-- Every detokenisation: who asked, why, when, for which card/token. Append-only: the trigger
-- below refuses UPDATE, DELETE and TRUNCATE, whoever runs them.
CREATE TABLE vault.detokenizations (
    seq        bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    requester  text NOT NULL CHECK (length(requester) BETWEEN 1 AND 200),
    purpose    text NOT NULL CHECK (purpose IN (
        'authorization', 'account_verification', 'refund', 'network_token_update')),
    card_id    text NOT NULL REFERENCES vault.cards (id),
    token_id   text REFERENCES vault.tokens (id),
    at         timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE INDEX detokenizations_card ON vault.detokenizations (card_id, seq);
CREATE INDEX detokenizations_at ON vault.detokenizations (at);

CREATE FUNCTION vault.refuse_audit_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION USING ERRCODE = 'BFV01',
        MESSAGE = 'vault.detokenizations is append-only (' || TG_OP || ' refused)';
END
$$;

CREATE TRIGGER detokenizations_no_update_delete
    BEFORE UPDATE OR DELETE ON vault.detokenizations
    FOR EACH ROW EXECUTE FUNCTION vault.refuse_audit_change();

CREATE TRIGGER detokenizations_no_truncate
    BEFORE TRUNCATE ON vault.detokenizations
    FOR EACH STATEMENT EXECUTE FUNCTION vault.refuse_audit_change();
"""


def upgrade() -> None:
    run_script(VAULT)


def downgrade() -> None:
    op.execute("DROP SCHEMA vault CASCADE")
