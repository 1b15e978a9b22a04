"""notifications schema: notifications (the in-app inbox), deliveries per channel with their
log, preferences per user/category/channel, quiet hours

Revision ID: 0010
Revises: 0008
"""

from alembic import op

from billfold.migrations.sql_script import run_script

revision = "0010"
down_revision = "0008"
branch_labels = None
depends_on = None

# Why this shape:
# - One `notifications` row per thing a user is told (`kind` + the event that caused it). Its
#   `dedupe_key` is unique per user: the same transfer's "received" is one row however often
#   the event arrives (redelivery, a replay with a new consumer, two events of one fact).
# - One `deliveries` row per channel and target (a push goes to each device). The worker
#   claims due rows with SKIP LOCKED and a lease (`sending` until `lease_until`), sends outside
#   any transaction, then records the answer: a crash while sending leaves a lease that runs
#   out and the delivery is tried again (at least once; providers dedupe nothing for us).
# - A one-time code never lies in clear: its rendered message is sealed (`sealed_content`,
#   AES-GCM under the secret key, bound to the delivery id) and wiped once the delivery ends.
# - `delivery_log` is append-only: every state a delivery passed through, with the provider's
#   answer (`queued → sent → delivered | failed`; `sending` and retries show as entries too).
SCHEMA = r"""
CREATE SCHEMA IF NOT EXISTS notifications;

CREATE TABLE notifications.notifications (
    id          text PRIMARY KEY,
    user_id     text NOT NULL,
    kind        text NOT NULL,
    category    text NOT NULL,
    dedupe_key  text NOT NULL,
    event_id    text,
    event_type  text,
    locale      text NOT NULL,
    -- Shown in the inbox (a one-time code is not).
    in_app      boolean NOT NULL,
    title       text NOT NULL,
    body        text NOT NULL,
    data        jsonb NOT NULL DEFAULT '{}',
    read_at     timestamptz,
    created_at  timestamptz NOT NULL DEFAULT now()
);
CREATE UNIQUE INDEX notifications_dedupe ON notifications.notifications (user_id, dedupe_key);
CREATE INDEX notifications_inbox ON notifications.notifications (user_id, id) WHERE in_app;
CREATE INDEX notifications_unread ON notifications.notifications (user_id)
    WHERE in_app AND read_at IS NULL;

CREATE TABLE notifications.deliveries (
    id               text PRIMARY KEY,
    notification_id  text NOT NULL REFERENCES notifications.notifications (id),
    user_id          text NOT NULL,
    channel          text NOT NULL CHECK (channel IN ('push', 'email', 'sms', 'in_app')),
    provider         text NOT NULL,
    -- A device id (push), an e-mail address, an E.164 number, or the user id (in-app).
    target           text NOT NULL,
    status           text NOT NULL
        CHECK (status IN ('queued', 'sending', 'sent', 'delivered', 'failed')),
    content          jsonb,
    sealed_content   bytea,
    attempts         int NOT NULL DEFAULT 0,
    max_attempts     int NOT NULL,
    next_attempt_at  timestamptz NOT NULL DEFAULT now(),
    lease_until      timestamptz,
    -- A security alert that could not be pushed is sent by SMS: that SMS names the push.
    fallback_of      text REFERENCES notifications.deliveries (id),
    provider_message_id text,
    error            text,
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now(),
    CHECK (content IS NULL OR sealed_content IS NULL)
);
CREATE INDEX deliveries_due ON notifications.deliveries (next_attempt_at)
    WHERE status IN ('queued', 'sending');
CREATE INDEX deliveries_notification ON notifications.deliveries (notification_id);
-- The per-user rate limit counts a user's recent deliveries on the outside channels.
CREATE INDEX deliveries_user_recent ON notifications.deliveries (user_id, created_at);
CREATE INDEX deliveries_provider_message ON notifications.deliveries (provider, provider_message_id)
    WHERE provider_message_id IS NOT NULL;

CREATE TABLE notifications.delivery_log (
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    delivery_id  text NOT NULL REFERENCES notifications.deliveries (id),
    status       text NOT NULL,
    detail       text,
    at           timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE INDEX delivery_log_delivery ON notifications.delivery_log (delivery_id, id);

-- Only what differs from the defaults is stored.
CREATE TABLE notifications.preferences (
    user_id     text NOT NULL,
    category    text NOT NULL,
    channel     text NOT NULL CHECK (channel IN ('push', 'email', 'sms', 'in_app')),
    enabled     boolean NOT NULL,
    updated_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (user_id, category, channel)
);

CREATE TABLE notifications.settings (
    user_id           text PRIMARY KEY,
    -- Local times in the user's time zone; a window may wrap midnight (22:00-07:00).
    quiet_start       time,
    quiet_end         time,
    updated_at        timestamptz NOT NULL DEFAULT now(),
    CHECK ((quiet_start IS NULL) = (quiet_end IS NULL))
);

-- Conditions a user has been told about and that must not be told again until they end (the
-- wallet below the low-balance line, per currency: `low_balance:USD`).
CREATE TABLE notifications.flags (
    user_id  text NOT NULL,
    key      text NOT NULL,
    set_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (user_id, key)
);

-- Where a user has signed in from (a hash of the device or browser): a sign-in from a new one
-- is a security alert.
CREATE TABLE notifications.known_signins (
    user_id      text NOT NULL,
    fingerprint  text NOT NULL,
    first_seen   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (user_id, fingerprint)
);
"""


def upgrade() -> None:
    run_script(SCHEMA)


def downgrade() -> None:
    op.execute("DROP SCHEMA IF EXISTS notifications CASCADE")
