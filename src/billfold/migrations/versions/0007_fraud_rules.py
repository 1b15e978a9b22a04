"""fraud schema: rules as data (versioned CEL expressions), block/allow lists, the default rules

Revision ID: 0007
Revises: 0006
"""

from alembic import op

from billfold.migrations.sql_script import run_script

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

# Why this shape:
# - A rule is a name (`fraud.rules`) and its versions (`fraud.rule_versions`). A version's content
#   (expression, score, action, reason, description) never changes once written: every edit is a
#   new version, so a stored decision that names (rule, version) can always be explained. Only a
#   version's state moves: at most one version of a rule is `active` (enforced) and at most one is
#   `shadow` (evaluated and logged, not enforced), so a new version can run in shadow beside the
#   one in force before it is promoted; every other version is `disabled`.
# - `fraud.rule_set` is one row with a counter per kind of data, bumped in the transaction of
#   every change: each process compares the counters every second or so (one tiny read) and
#   reloads its compiled rules or lists only when one moved.
# - List entries are never deleted, only marked removed (history kept); one live entry per
#   (list, kind, value).
# - The default rules below are a frozen copy of `billfold.fraud.rules.DEFAULT_RULES` as shipped
#   with this revision (a migration must not change meaning when the code moves on);
#   tests/integration/test_fraud_rules.py checks that the two agree.
SCHEMA = r"""
CREATE SCHEMA IF NOT EXISTS fraud;

CREATE TABLE fraud.rule_set (
    id             boolean PRIMARY KEY DEFAULT true CHECK (id),
    rules_version  bigint NOT NULL DEFAULT 1,
    lists_version  bigint NOT NULL DEFAULT 1,
    changed_at     timestamptz NOT NULL DEFAULT now()
);
INSERT INTO fraud.rule_set (id) VALUES (true);

CREATE TABLE fraud.rules (
    id              text PRIMARY KEY CHECK (id ~ '^[a-z][a-z0-9_]{2,63}$'),
    latest_version  integer NOT NULL CHECK (latest_version >= 1),
    created_by      text,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE fraud.rule_versions (
    rule_id           text NOT NULL REFERENCES fraud.rules (id),
    version           integer NOT NULL CHECK (version >= 1),
    expression        text NOT NULL CHECK (length(expression) BETWEEN 1 AND 2000),
    score             integer NOT NULL DEFAULT 0 CHECK (score BETWEEN 0 AND 1000),
    action            text CHECK (action IN ('allow', 'challenge', 'review', 'block')),
    reason_code       text NOT NULL CHECK (reason_code ~ '^[a-z][a-z0-9_]{2,63}$'),
    description       text NOT NULL CHECK (length(description) BETWEEN 1 AND 500),
    state             text NOT NULL CHECK (state IN ('shadow', 'active', 'disabled')),
    note              text,
    -- The version this one was copied from (a rollback) or edited from.
    based_on          integer,
    created_by        text,
    created_at        timestamptz NOT NULL DEFAULT now(),
    -- When the state last changed, by whom; the last time it became active (for rollback).
    state_changed_by  text,
    state_changed_at  timestamptz NOT NULL DEFAULT now(),
    activated_at      timestamptz,
    PRIMARY KEY (rule_id, version),
    CHECK (score > 0 OR action IS NOT NULL)
);
CREATE UNIQUE INDEX rule_versions_one_active ON fraud.rule_versions (rule_id)
    WHERE state = 'active';
CREATE UNIQUE INDEX rule_versions_one_shadow ON fraud.rule_versions (rule_id)
    WHERE state = 'shadow';
-- What every process loads: the versions that are evaluated.
CREATE INDEX rule_versions_live ON fraud.rule_versions (rule_id, version)
    WHERE state <> 'disabled';

CREATE TABLE fraud.list_entries (
    id          text PRIMARY KEY,
    list        text NOT NULL CHECK (list IN ('block', 'allow')),
    kind        text NOT NULL CHECK (kind IN (
        'device', 'ip', 'card', 'recipient', 'merchant', 'country')),
    value       text NOT NULL CHECK (length(value) BETWEEN 1 AND 200),
    reason      text NOT NULL CHECK (length(reason) BETWEEN 1 AND 500),
    expires_at  timestamptz,
    created_by  text,
    created_at  timestamptz NOT NULL DEFAULT now(),
    removed_by  text,
    removed_at  timestamptz
);
CREATE UNIQUE INDEX list_entries_live ON fraud.list_entries (list, kind, value)
    WHERE removed_at IS NULL;
CREATE INDEX list_entries_kind ON fraud.list_entries (kind, value);

INSERT INTO fraud.rules (id, latest_version) VALUES
    ('card_testing_burst', 1),
    ('card_repeated_declines', 1),
    ('velocity_user_minute', 1),
    ('velocity_user_hour', 1),
    ('velocity_amount_day', 1),
    ('amount_anomaly', 1),
    ('impossible_travel', 1),
    ('new_device_large_amount', 1),
    ('account_takeover_pattern', 1),
    ('mule_fan_out', 1),
    ('mule_fan_in', 1),
    ('high_risk_merchant', 1),
    ('high_risk_merchant_new_account', 1),
    ('young_account_large_amount', 1),
    ('unusual_time', 1),
    ('shared_device', 1),
    ('shared_ip', 1);

INSERT INTO fraud.rule_versions
    (rule_id, version, expression, score, action, reason_code, description, state, note,
     activated_at)
VALUES
    ('card_testing_burst', 1,
     'is_ecommerce && card_count_1m >= 5 && amount <= 1000', 900, 'block',
     'card_testing_burst',
     'Five or more small online attempts on this card within a minute: the pattern of testing stolen card numbers',
     'active', 'shipped default', now()),
    ('card_repeated_declines', 1,
     'card_declines_1h >= 3 && card_count_1h >= 4', 800, 'block',
     'card_repeated_declines',
     'This card was declined three or more times in the last hour and is being tried again',
     'active', 'shipped default', now()),
    ('velocity_user_minute', 1,
     'user_count_1m >= 10', 150, NULL,
     'velocity_user_minute',
     'Ten or more payments or transfers by this user within a minute',
     'active', 'shipped default', now()),
    ('velocity_user_hour', 1,
     'user_count_1h >= 30', 150, NULL,
     'velocity_user_hour',
     'Thirty or more payments or transfers by this user within an hour',
     'active', 'shipped default', now()),
    ('velocity_amount_day', 1,
     'user_sum_24h >= 1000000', 150, NULL,
     'velocity_amount_day',
     'This user moved 10,000 or more (in minor units: 1,000,000) within 24 hours',
     'active', 'shipped default', now()),
    ('amount_anomaly', 1,
     'history_count >= 5 && amount_zscore >= 4.0 && amount_to_max >= 3.0', 350, NULL,
     'amount_anomaly',
     'The amount is far above anything this user has paid before (over 4 standard deviations and 3 times their largest)',
     'active', 'shipped default', now()),
    ('impossible_travel', 1,
     'has_location && km_from_last > 300.0 && speed_kmh > 900.0', 450, 'challenge',
     'impossible_travel',
     'The payment is too far from the last one for the time between them (faster than an airliner)',
     'active', 'shipped default', now()),
    ('new_device_large_amount', 1,
     'new_device && history_count >= 3 && amount >= 50000 && amount_to_max >= 2.0', 350, 'challenge',
     'new_device_large_amount',
     'A large amount, at least twice this user''s largest, from a device they have not used before',
     'active', 'shipped default', now()),
    ('account_takeover_pattern', 1,
     'is_payment && new_device && new_country && country_mismatch && history_count >= 3 && amount_to_max >= 2.0', 450, 'challenge',
     'account_takeover_pattern',
     'A new device paying in a new country, away from the user''s own, more than twice their largest amount',
     'active', 'shipped default', now()),
    ('mule_fan_out', 1,
     '!is_payment && new_recipient && user_recipients_24h >= 10', 500, 'review',
     'mule_fan_out',
     'This sender paid ten or more different people within 24 hours, this one for the first time',
     'active', 'shipped default', now()),
    ('mule_fan_in', 1,
     '!is_payment && recipient_senders_24h >= 10', 450, 'review',
     'mule_fan_in',
     'The recipient received money from ten or more different people within 24 hours',
     'active', 'shipped default', now()),
    ('high_risk_merchant', 1,
     'mcc_risk >= 0.8 && amount >= 50000', 250, NULL,
     'high_risk_merchant',
     'A large payment to a high-risk kind of merchant (gambling, crypto, money transfer)',
     'active', 'shipped default', now()),
    ('high_risk_merchant_new_account', 1,
     'mcc_risk >= 0.8 && account_age_days < 7.0', 200, NULL,
     'high_risk_merchant_new_account',
     'A payment to a high-risk kind of merchant from an account less than a week old',
     'active', 'shipped default', now()),
    ('young_account_large_amount', 1,
     'account_age_days < 1.0 && kyc_tier == 0 && amount >= 50000', 150, NULL,
     'young_account_large_amount',
     'A large amount from an unverified account opened less than a day ago',
     'active', 'shipped default', now()),
    ('unusual_time', 1,
     'history_count >= 20 && hour_habit_share < 0.02 && amount_zscore >= 2.0', 150, NULL,
     'unusual_time',
     'An unusually large amount at an hour this user is almost never active',
     'active', 'shipped default', now()),
    ('shared_device', 1,
     'device_users_24h >= 4', 250, NULL,
     'shared_device',
     'Four or more different users were on this device within 24 hours',
     'active', 'shipped default', now()),
    ('shared_ip', 1,
     'ip_users_24h >= 20', 150, NULL,
     'shared_ip',
     'Twenty or more different users came from this IP address within 24 hours',
     'shadow', 'shipped default: in shadow until measured (offices and carrier NAT share IPs)', NULL)
"""


def upgrade() -> None:
    run_script(SCHEMA)


def downgrade() -> None:
    op.execute("DROP TABLE IF EXISTS fraud.list_entries")
    op.execute("DROP TABLE IF EXISTS fraud.rule_versions")
    op.execute("DROP TABLE IF EXISTS fraud.rules")
    op.execute("DROP TABLE IF EXISTS fraud.rule_set")
    # Not CASCADE: later revisions' fraud tables are dropped by their own downgrades first.
    op.execute("DROP SCHEMA IF EXISTS fraud")
