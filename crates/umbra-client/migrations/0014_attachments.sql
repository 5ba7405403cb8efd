-- Version 14: attachments. A file's key and what describes it, beside the
-- message that carries it (and gone with it); the sealed bytes are in
-- `files/<blob id>` under the device directory, readable only with the
-- key kept here. state: sent (this device sent it, its sealed copy is
-- here), available (received, not fetched yet), fetched (its sealed copy
-- is here), gone (the server no longer has it, and this device never got it),
-- invalid (what the server gave did not open under its key or match its
-- digest: not fetched again unless asked).
CREATE TABLE attachments (
    message_id INTEGER PRIMARY KEY REFERENCES messages(id) ON DELETE CASCADE,
    blob_id BLOB NOT NULL,
    file_key BLOB NOT NULL,
    digest BLOB NOT NULL,
    size INTEGER NOT NULL,
    mime_type TEXT NOT NULL,
    name TEXT NOT NULL,
    duration_ms INTEGER NOT NULL DEFAULT 0,
    -- A photo's thumbnail (a small JPEG from its sender), if any.
    thumbnail BLOB,
    state TEXT NOT NULL
);
CREATE INDEX attachments_by_blob ON attachments(blob_id);

-- Uploads not finished (the connection dropped): resumed from the
-- server's stored offset, then sent as a message under `uid` (the same
-- ID each time, so a message sent twice is kept once).
CREATE TABLE uploads (
    blob_id BLOB PRIMARY KEY,
    uid BLOB NOT NULL,
    group_id BLOB NOT NULL,
    file_key BLOB NOT NULL,
    digest BLOB NOT NULL,
    size INTEGER NOT NULL,
    mime_type TEXT NOT NULL,
    name TEXT NOT NULL,
    caption TEXT NOT NULL,
    thumbnail BLOB
);
