-- Version 16: anonymous sending.
-- The public half of the current epoch's delivery key, as its committer
-- stated it; cleared by every commit (the next committer states the next).
ALTER TABLE groups ADD COLUMN delivery_key BLOB;
-- The keys that sign send tokens (VOPRF secrets), newest first by age.
CREATE TABLE token_keys (
    key_id BLOB PRIMARY KEY,
    secret BLOB NOT NULL,
    created_at INTEGER NOT NULL
) WITHOUT ROWID;
-- Tokens spent, kept as long as their key is (a token is a random nonce:
-- it says nothing of who spent it).
CREATE TABLE spent_tokens (
    key_id BLOB NOT NULL,
    nonce BLOB NOT NULL,
    PRIMARY KEY (key_id, nonce)
) WITHOUT ROWID;
-- How many tokens each line was issued on a day (UTC day number), for the
-- daily allowance; forgotten once the day is over.
CREATE TABLE token_allowance (
    account_id TEXT NOT NULL,
    day INTEGER NOT NULL,
    issued INTEGER NOT NULL,
    PRIMARY KEY (account_id, day)
) WITHOUT ROWID;
