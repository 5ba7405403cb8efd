-- Version 2: attachments' blobs, bytes included (every node reads them).
CREATE TABLE blobs (
    blob_id       BYTEA PRIMARY KEY,
    owner_account TEXT NOT NULL,
    owner_device  BIGINT NOT NULL,
    group_id      BYTEA NOT NULL,
    size          BIGINT NOT NULL,
    stored        BIGINT NOT NULL DEFAULT 0,
    touched_at    BIGINT NOT NULL,
    lifetime      BIGINT NOT NULL,  -- seconds it lives once complete
    expires_at    BIGINT NOT NULL
);
CREATE INDEX blobs_by_owner ON blobs (owner_account);
CREATE INDEX blobs_by_expiry ON blobs (expires_at);

-- The devices a complete blob waits for: its group's other current member
-- devices when its upload ended, less those that fetched it or left the
-- group since. It is deleted once none is left.
CREATE TABLE blob_recipients (
    blob_id    BYTEA NOT NULL REFERENCES blobs (blob_id) ON DELETE CASCADE,
    account_id TEXT NOT NULL,
    device     BIGINT NOT NULL,
    PRIMARY KEY (blob_id, account_id, device)
);

-- A blob's bytes, as uploaded: one row per chunk, from `offset`.
CREATE TABLE blob_chunks (
    blob_id BYTEA NOT NULL REFERENCES blobs (blob_id) ON DELETE CASCADE,
    "offset" BIGINT NOT NULL,
    data    BYTEA NOT NULL,
    PRIMARY KEY (blob_id, "offset")
);
