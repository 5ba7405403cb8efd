-- Umbra server schema, version 1. Holds account metadata, public keys and
-- ciphertext only: no private key and no plaintext is ever written here.

CREATE TABLE activation_codes (
    code_hash   BLOB PRIMARY KEY,            -- SHA-256 of the canonical code
    days        INTEGER NOT NULL,            -- subscription length it grants
    issued_at   INTEGER NOT NULL,
    used_by     TEXT,                        -- account that redeemed it
    used_at     INTEGER
) WITHOUT ROWID;

CREATE TABLE accounts (
    account_id              TEXT PRIMARY KEY,
    identity_key            BLOB NOT NULL UNIQUE,
    created_at              INTEGER NOT NULL,
    subscription_expires_at INTEGER NOT NULL
) WITHOUT ROWID;

CREATE TABLE key_packages (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    account_id  TEXT NOT NULL REFERENCES accounts(account_id) ON DELETE CASCADE,
    key_package BLOB NOT NULL
);
CREATE INDEX key_packages_by_account ON key_packages(account_id, id);

CREATE TABLE last_resort_key_packages (
    account_id  TEXT PRIMARY KEY REFERENCES accounts(account_id) ON DELETE CASCADE,
    key_package BLOB NOT NULL
) WITHOUT ROWID;

-- A row (a, b) with accepted = 0 is a request from a to b; accepted = 1 means
-- a and b are contacts (stored once, from the requester's side).
CREATE TABLE contacts (
    requester   TEXT NOT NULL REFERENCES accounts(account_id) ON DELETE CASCADE,
    addressee   TEXT NOT NULL REFERENCES accounts(account_id) ON DELETE CASCADE,
    accepted    INTEGER NOT NULL DEFAULT 0,
    created_at  INTEGER NOT NULL,
    PRIMARY KEY (requester, addressee)
) WITHOUT ROWID;

CREATE TABLE groups (
    group_id         BLOB PRIMARY KEY,
    epoch            INTEGER NOT NULL,
    last_commit_hash BLOB,                   -- makes a retried commit idempotent
    created_at       INTEGER NOT NULL
) WITHOUT ROWID;

CREATE TABLE group_members (
    group_id    BLOB NOT NULL REFERENCES groups(group_id) ON DELETE CASCADE,
    account_id  TEXT NOT NULL,
    PRIMARY KEY (group_id, account_id)
) WITHOUT ROWID;
CREATE INDEX group_members_by_account ON group_members(account_id);

CREATE TABLE mailbox (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    recipient   TEXT NOT NULL,
    sender      TEXT NOT NULL,
    kind        INTEGER NOT NULL,
    group_id    BLOB,
    payload     BLOB NOT NULL,
    sent_at     INTEGER NOT NULL,
    expires_at  INTEGER NOT NULL
);
CREATE INDEX mailbox_by_recipient ON mailbox(recipient, id);
CREATE INDEX mailbox_by_expiry ON mailbox(expires_at);
