"""fraud schema: decisions (feature snapshot, rule and model versions, label) and the review
case queue (cases, comments, audit trail)

Revision ID: 0008
Revises: 0007
"""

from alembic import op

from billfold.migrations.sql_script import run_script

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

# Why this shape:
# - One row per risk check, written in the payment's/transfer's own transaction (so a decision
#   exists exactly when its payment/transfer does), with the whole feature snapshot (jsonb): a
#   rule backtest and the model's training replay it, and the analyst's label (set when a case is
#   decided) makes it a training example.
# - A case is one per payment/transfer (UNIQUE subject_id): a review is opened once; the audit
#   trail is append-only (no UPDATE/DELETE from the code).
SCHEMA = """
CREATE SCHEMA IF NOT EXISTS fraud;

CREATE TABLE fraud.decisions (
    id                 text PRIMARY KEY,
    subject_kind       text NOT NULL CHECK (subject_kind IN ('payment', 'transfer')),
    subject_id         text NOT NULL,
    user_id            text NOT NULL,
    amount             bigint NOT NULL,
    currency           char(3) NOT NULL,
    action             text NOT NULL CHECK (action IN ('allow', 'challenge', 'review', 'block')),
    score              smallint NOT NULL CHECK (score BETWEEN 0 AND 1000),
    reasons            text[] NOT NULL DEFAULT '{}',
    explanations       jsonb NOT NULL DEFAULT '[]',
    hits               jsonb NOT NULL DEFAULT '[]',
    features           jsonb NOT NULL,
    rule_version       text,
    model_version      text,
    model_probability  double precision,
    model_anomaly      double precision,
    challenger         jsonb,
    degraded           boolean NOT NULL DEFAULT false,
    -- Why the normal path was not taken: features (Redis down/slow), model (not loaded/failed),
    -- error (the documented fallback action), NULL when none.
    fallback           text CHECK (fallback IN ('features', 'model', 'error')),
    stepped_up         boolean NOT NULL DEFAULT false,
    duration_ms        real,
    label              text CHECK (label IN ('fraud', 'legit')),
    labelled_at        timestamptz,
    created_at         timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX decisions_subject ON fraud.decisions (subject_id);
CREATE INDEX decisions_user ON fraud.decisions (user_id, created_at);
CREATE INDEX decisions_blocks ON fraud.decisions (user_id, created_at) WHERE action = 'block';
CREATE INDEX decisions_labelled ON fraud.decisions (created_at) WHERE label IS NOT NULL;

CREATE TABLE fraud.cases (
    id            text PRIMARY KEY,
    decision_id   text NOT NULL REFERENCES fraud.decisions (id),
    subject_kind  text NOT NULL CHECK (subject_kind IN ('payment', 'transfer')),
    subject_id    text NOT NULL UNIQUE,
    user_id       text NOT NULL,
    amount        bigint NOT NULL,
    currency      char(3) NOT NULL,
    score         smallint NOT NULL,
    reasons       text[] NOT NULL DEFAULT '{}',
    status        text NOT NULL DEFAULT 'open' CHECK (status IN ('open', 'assigned', 'decided')),
    assignee_id   text,
    outcome       text CHECK (outcome IN ('release', 'confirm_fraud')),
    subject_status text,
    decided_by    text,
    decided_at    timestamptz,
    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now(),
    CHECK ((status = 'decided') = (outcome IS NOT NULL)),
    CHECK (status <> 'assigned' OR assignee_id IS NOT NULL)
);
-- The queue: by status, oldest first (ids sort by time); per assignee; per user.
CREATE INDEX cases_queue ON fraud.cases (status, id);
CREATE INDEX cases_assignee ON fraud.cases (assignee_id, id) WHERE assignee_id IS NOT NULL;
CREATE INDEX cases_user ON fraud.cases (user_id, id);

CREATE TABLE fraud.case_comments (
    id          bigserial PRIMARY KEY,
    case_id     text NOT NULL REFERENCES fraud.cases (id),
    author_id   text NOT NULL,
    body        text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX case_comments_case ON fraud.case_comments (case_id, id);

CREATE TABLE fraud.case_audit (
    id          bigserial PRIMARY KEY,
    case_id     text NOT NULL REFERENCES fraud.cases (id),
    actor_id    text,
    action      text NOT NULL,
    detail      jsonb NOT NULL DEFAULT '{}',
    created_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX case_audit_case ON fraud.case_audit (case_id, id);
"""


def upgrade() -> None:
    run_script(SCHEMA)


def downgrade() -> None:
    # 0007 owns the schema itself (rules and lists); only this revision's tables go.
    op.execute(
        "DROP TABLE IF EXISTS fraud.case_audit, fraud.case_comments, fraud.cases, "
        "fraud.decisions CASCADE"
    )
