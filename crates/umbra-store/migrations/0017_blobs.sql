-- Version 17: attachments' blobs. The bytes live in files beside the
-- database (`blobs/<id>`); these rows say whose they are, how much of
-- them is stored, and which devices have yet to fetch them.
CREATE TABLE blobs (
    blob_id BLOB PRIMARY KEY,
    owner_account TEXT NOT NULL,
    owner_device INTEGER NOT NULL,
    group_id BLOB NOT NULL,
    size INTEGER NOT NULL,
    stored INTEGER NOT NULL DEFAULT 0,
    touched_at INTEGER NOT NULL,
    -- Seconds it lives once complete (its message is sent then).
    lifetime INTEGER NOT NULL,
    expires_at INTEGER NOT NULL
) WITHOUT ROWID;
CREATE INDEX blobs_by_owner ON blobs(owner_account);
CREATE INDEX blobs_by_expiry ON blobs(expires_at);
-- The devices a complete blob waits for: its group's other current member
-- devices when its upload ended, less those that fetched it or left the
-- group since. It is deleted once none is left.
CREATE TABLE blob_recipients (
    blob_id BLOB NOT NULL REFERENCES blobs(blob_id) ON DELETE CASCADE,
    account_id TEXT NOT NULL,
    device INTEGER NOT NULL,
    PRIMARY KEY (blob_id, account_id, device)
) WITHOUT ROWID;
