-- Version 2: the vault, disappearing messages, settings and remote wipe.

-- Encrypted notes that never leave the device.
CREATE TABLE vault (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    title       TEXT NOT NULL,
    body        TEXT NOT NULL,
    created_at  INTEGER NOT NULL,
    updated_at  INTEGER NOT NULL
);

-- Device-wide choices, one row per key.
CREATE TABLE settings (
    key    TEXT PRIMARY KEY,
    value  TEXT NOT NULL
) WITHOUT ROWID;

-- Disappearing messages: the timer agreed in the group context (seconds,
-- 0 = off), and per message the moment it was first shown and when it goes.
ALTER TABLE conversations ADD COLUMN disappear_after INTEGER NOT NULL DEFAULT 0;
ALTER TABLE messages ADD COLUMN ttl INTEGER NOT NULL DEFAULT 0;  -- the timer in force
ALTER TABLE messages ADD COLUMN shown_at INTEGER;
ALTER TABLE messages ADD COLUMN expires_at INTEGER;
CREATE INDEX messages_by_expiry ON messages(expires_at) WHERE expires_at IS NOT NULL;

-- Receipts: each text's own 16-byte ID, shared by sender and recipients.
ALTER TABLE messages ADD COLUMN uid BLOB;
CREATE INDEX messages_by_uid ON messages(uid) WHERE uid IS NOT NULL;

-- The public half of the remote-wipe key (its secret is the wipe code the
-- user wrote down), and a revocation signed in advance.
ALTER TABLE device ADD COLUMN wipe_public_key BLOB;
