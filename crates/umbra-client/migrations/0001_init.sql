-- Umbra device store, version 1. The whole file is encrypted by SQLCipher
-- under a key derived from the user's passphrase; openmls keeps its own
-- tables (its migrations) in the same database.

CREATE TABLE device (
    singleton               INTEGER PRIMARY KEY CHECK (singleton = 1),
    account_id              TEXT NOT NULL,
    identity_secret         BLOB NOT NULL,   -- Ed25519 secret key
    server_address          TEXT NOT NULL,
    server_pin              TEXT NOT NULL,   -- SHA-256 of the server certificate, hex
    subscription_expires_at INTEGER NOT NULL,
    created_at              INTEGER NOT NULL
);

-- state: 'outgoing' (we asked), 'incoming' (they asked), 'accepted'.
CREATE TABLE contacts (
    account_id    TEXT PRIMARY KEY,
    state         TEXT NOT NULL,
    identity_key  BLOB,                      -- first key seen (trust on first use)
    verified      INTEGER NOT NULL DEFAULT 0,
    key_changed   INTEGER NOT NULL DEFAULT 0,
    updated_at    INTEGER NOT NULL
) WITHOUT ROWID;

-- kind: 'direct' (two members, `peer` set) or 'group'.
CREATE TABLE conversations (
    group_id          BLOB PRIMARY KEY,
    kind              TEXT NOT NULL,
    peer              TEXT,
    name              TEXT NOT NULL DEFAULT '',
    active            INTEGER NOT NULL DEFAULT 1,
    created_at        INTEGER NOT NULL,
    last_self_update  INTEGER NOT NULL
) WITHOUT ROWID;
CREATE UNIQUE INDEX conversations_by_peer ON conversations(peer) WHERE peer IS NOT NULL;

-- direction: 'in', 'out' or 'system'. state: 'sending', 'sent', 'failed',
-- 'received'.
CREATE TABLE messages (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    group_id    BLOB NOT NULL,
    sender      TEXT NOT NULL,
    direction   TEXT NOT NULL,
    body        TEXT NOT NULL,
    state       TEXT NOT NULL,
    timestamp   INTEGER NOT NULL
);
CREATE INDEX messages_by_conversation ON messages(group_id, id);

-- Server deliveries already applied, so a redelivery after a crash (applied
-- but not yet acknowledged) is acknowledged without being applied twice.
CREATE TABLE processed_deliveries (
    delivery_id  INTEGER PRIMARY KEY,
    processed_at INTEGER NOT NULL
);

-- A commit sent to the server whose verdict we have not seen; resubmitted
-- on the next connection (the server recognises a duplicate).
CREATE TABLE pending_commits (
    group_id  BLOB PRIMARY KEY,
    epoch     INTEGER NOT NULL,
    commit_   BLOB NOT NULL,
    welcome   BLOB,
    added     TEXT NOT NULL,               -- space-separated account IDs
    removed   TEXT NOT NULL
) WITHOUT ROWID;
