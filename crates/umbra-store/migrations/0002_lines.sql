-- Version 2: remote wipe, revocation, distributors and subscription lines.

ALTER TABLE accounts ADD COLUMN wipe_key BLOB;               -- Ed25519 public key
ALTER TABLE accounts ADD COLUMN status TEXT NOT NULL DEFAULT 'active';
                                                            -- active | suspended | revoked
ALTER TABLE accounts ADD COLUMN distributor_id INTEGER;     -- NULL: issued by the operator
ALTER TABLE accounts ADD COLUMN last_seen_day INTEGER;      -- Unix day of the last login

CREATE TABLE distributors (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    name        TEXT NOT NULL UNIQUE,
    public_key  BLOB NOT NULL UNIQUE,        -- Ed25519; the secret is the distributor's
    quota       INTEGER NOT NULL,            -- codes it may still issue
    created_at  INTEGER NOT NULL
);

-- Codes are for activation (a new line) or renewal (more days on a line).
ALTER TABLE activation_codes ADD COLUMN kind TEXT NOT NULL DEFAULT 'activation';
ALTER TABLE activation_codes ADD COLUMN distributor_id INTEGER;

-- The hash of every accepted commit, by epoch, so that a commit resubmitted
-- after a lost reply is recognised as accepted however many epochs later.
CREATE TABLE group_commits (
    group_id  BLOB NOT NULL REFERENCES groups(group_id) ON DELETE CASCADE,
    epoch     INTEGER NOT NULL,              -- the epoch the commit was made in
    hash      BLOB NOT NULL,
    PRIMARY KEY (group_id, epoch)
) WITHOUT ROWID;
