"""platform (outbox, inbox, idempotency) and users schemas

Revision ID: 0001
Revises:
"""

from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

PLATFORM = """
CREATE SCHEMA IF NOT EXISTS platform;

CREATE TABLE platform.outbox (
    seq          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    id           text NOT NULL UNIQUE,
    type         text NOT NULL,
    source       text NOT NULL,
    subject      text NOT NULL,
    aggregate_id text NOT NULL,
    time         timestamptz NOT NULL,
    data         jsonb NOT NULL,
    published_at timestamptz
);
CREATE INDEX outbox_unpublished ON platform.outbox (seq) WHERE published_at IS NULL;
CREATE INDEX outbox_type_time ON platform.outbox (type, time);

CREATE TABLE platform.inbox (
    consumer   text NOT NULL,
    event_id   text NOT NULL,
    handled_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer, event_id)
);

CREATE TABLE platform.dead_letters (
    id         bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    consumer   text NOT NULL,
    event_id   text NOT NULL,
    event      jsonb NOT NULL,
    error      text NOT NULL,
    attempts   int NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE platform.idempotency_keys (
    scope            text NOT NULL,
    key              text NOT NULL,
    method           text NOT NULL,
    path             text NOT NULL,
    request_hash     text NOT NULL,
    status_code      int NOT NULL,
    response_headers jsonb NOT NULL,
    response_body    bytea NOT NULL,
    created_at       timestamptz NOT NULL,
    expires_at       timestamptz NOT NULL,
    PRIMARY KEY (scope, key)
);
CREATE INDEX idempotency_keys_expiry ON platform.idempotency_keys (expires_at);
"""

USERS = """
CREATE SCHEMA IF NOT EXISTS users;

CREATE TABLE users.users (
    id                text PRIMARY KEY,
    email             text NOT NULL,
    phone             text NOT NULL,
    password_hash     text NOT NULL,
    name              text NOT NULL,
    date_of_birth     date NOT NULL,
    country           char(2) NOT NULL,
    handle            text,
    address           jsonb,
    locale            text NOT NULL DEFAULT 'en',
    timezone          text NOT NULL DEFAULT 'UTC',
    avatar_key        text,
    email_verified_at timestamptz,
    phone_verified_at timestamptz,
    kyc_status        text NOT NULL DEFAULT 'unverified'
        CHECK (kyc_status IN ('unverified', 'pending', 'verified', 'rejected', 'review')),
    kyc_tier          smallint NOT NULL DEFAULT 0 CHECK (kyc_tier BETWEEN 0 AND 2),
    role              text NOT NULL DEFAULT 'user' CHECK (role IN ('user', 'admin')),
    status            text NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'locked', 'closed')),
    created_at        timestamptz NOT NULL DEFAULT now(),
    updated_at        timestamptz NOT NULL DEFAULT now()
);
CREATE UNIQUE INDEX users_email ON users.users (email);
CREATE UNIQUE INDEX users_phone ON users.users (phone);
CREATE UNIQUE INDEX users_handle ON users.users (lower(handle)) WHERE handle IS NOT NULL;

CREATE TABLE users.verifications (
    id           text PRIMARY KEY,
    user_id      text NOT NULL REFERENCES users.users (id),
    channel      text NOT NULL CHECK (channel IN ('email', 'phone')),
    target       text NOT NULL,
    code_hash    bytea NOT NULL,
    attempts     int NOT NULL DEFAULT 0,
    expires_at   timestamptz NOT NULL,
    confirmed_at timestamptz,
    created_at   timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX verifications_user ON users.verifications (user_id, created_at);

CREATE TABLE users.kyc_submissions (
    id                   text PRIMARY KEY,
    user_id              text NOT NULL REFERENCES users.users (id),
    legal_name           text NOT NULL,
    date_of_birth        date NOT NULL,
    address              jsonb NOT NULL,
    document_type        text NOT NULL,
    document_country     char(2) NOT NULL,
    document_number_last4 text NOT NULL,
    document_number_hash bytea NOT NULL,
    status               text NOT NULL
        CHECK (status IN ('pending', 'verified', 'rejected', 'review')),
    tier                 smallint NOT NULL DEFAULT 0,
    checks               jsonb NOT NULL DEFAULT '[]',
    reason               text,
    decided_by           text,
    created_at           timestamptz NOT NULL DEFAULT now(),
    decided_at           timestamptz
);
CREATE INDEX kyc_submissions_user ON users.kyc_submissions (user_id, created_at);
CREATE INDEX kyc_submissions_status ON users.kyc_submissions (status, created_at);
-- Finds the same identity document on another account (KYC reuse check).
CREATE INDEX kyc_submissions_document ON users.kyc_submissions (document_number_hash);

CREATE TABLE users.kyc_audit (
    id            bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    user_id       text NOT NULL REFERENCES users.users (id),
    submission_id text REFERENCES users.kyc_submissions (id),
    from_status   text NOT NULL,
    to_status     text NOT NULL,
    actor         text NOT NULL,
    reason        text,
    at            timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE users.devices (
    id            text PRIMARY KEY,
    user_id       text NOT NULL REFERENCES users.users (id),
    name          text NOT NULL,
    platform      text NOT NULL CHECK (platform IN ('ios', 'android', 'web', 'watch')),
    push_token    text,
    public_key    text,
    attestation   jsonb,
    scopes        text[] NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now(),
    last_seen_at  timestamptz,
    revoked_at    timestamptz
);
CREATE INDEX devices_user ON users.devices (user_id, created_at);

CREATE TABLE users.sessions (
    id            text PRIMARY KEY,
    user_id       text NOT NULL REFERENCES users.users (id),
    device_id     text REFERENCES users.devices (id),
    auth_method   text NOT NULL,
    scopes        text[] NOT NULL,
    ip            text,
    user_agent    text,
    created_at    timestamptz NOT NULL DEFAULT now(),
    last_used_at  timestamptz NOT NULL DEFAULT now(),
    expires_at    timestamptz NOT NULL,
    revoked_at    timestamptz,
    revoke_reason text
);
CREATE INDEX sessions_user ON users.sessions (user_id, created_at);
CREATE INDEX sessions_device ON users.sessions (device_id) WHERE revoked_at IS NULL;

CREATE TABLE users.refresh_tokens (
    token_hash  bytea PRIMARY KEY,
    session_id  text NOT NULL REFERENCES users.sessions (id),
    created_at  timestamptz NOT NULL DEFAULT now(),
    expires_at  timestamptz NOT NULL,
    used_at     timestamptz
);
CREATE INDEX refresh_tokens_session ON users.refresh_tokens (session_id);

CREATE TABLE users.signing_keys (
    kid          text PRIMARY KEY,
    algorithm    text NOT NULL DEFAULT 'ES256',
    private_key  bytea NOT NULL,
    public_jwk   jsonb NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    retired_at   timestamptz
);

CREATE TABLE users.totp_factors (
    user_id        text PRIMARY KEY REFERENCES users.users (id),
    secret         bytea NOT NULL,
    confirmed_at   timestamptz,
    last_used_step bigint,
    created_at     timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE users.webauthn_credentials (
    id            text PRIMARY KEY,
    user_id       text NOT NULL REFERENCES users.users (id),
    credential_id bytea NOT NULL UNIQUE,
    public_key    bytea NOT NULL,
    sign_count    bigint NOT NULL DEFAULT 0,
    transports    text[] NOT NULL DEFAULT '{}',
    name          text NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now(),
    last_used_at  timestamptz
);
CREATE INDEX webauthn_credentials_user ON users.webauthn_credentials (user_id);
"""


def _run(script: str) -> None:
    # asyncpg prepares each statement, so a script is sent one statement at a time.
    for statement in script.split(";\n"):
        if statement.strip():
            op.execute(statement)


def upgrade() -> None:
    _run(PLATFORM)
    _run(USERS)


def downgrade() -> None:
    op.execute("DROP SCHEMA users CASCADE")
    op.execute(
        "DROP TABLE platform.outbox, platform.inbox, platform.dead_letters, "
        "platform.idempotency_keys"
    )
