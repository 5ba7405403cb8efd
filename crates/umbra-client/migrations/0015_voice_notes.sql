-- Version 15: voice notes. A recording is kept as it is made, in pieces
-- of about half a second, in this (encrypted) store: an interrupted
-- recording loses at most its last piece, and no byte of it is ever on
-- disk in the clear. A draft goes when it is sent or discarded.
CREATE TABLE voice_drafts (
    id INTEGER PRIMARY KEY,
    created_at INTEGER NOT NULL,
    -- The encoder's delay, in samples at 48 kHz (the stream's pre-skip).
    pre_skip INTEGER NOT NULL,
    -- Samples of audio recorded so far, at 48 kHz.
    samples INTEGER NOT NULL DEFAULT 0,
    -- Frames saved so far (20 ms each).
    frames INTEGER NOT NULL DEFAULT 0,
    -- Whether the recording was ended (not cut off).
    finished INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE voice_draft_pieces (
    draft_id INTEGER NOT NULL REFERENCES voice_drafts(id) ON DELETE CASCADE,
    seq INTEGER NOT NULL,
    -- Opus frames of 20 ms, each a 2-byte little-endian length and its bytes.
    frames BLOB NOT NULL,
    -- One level (0-255) per frame.
    levels BLOB NOT NULL,
    PRIMARY KEY (draft_id, seq)
);

-- A voice note's waveform (one level per slice of time), as it was sent.
ALTER TABLE attachments ADD COLUMN waveform BLOB;
ALTER TABLE uploads ADD COLUMN duration_ms INTEGER NOT NULL DEFAULT 0;
ALTER TABLE uploads ADD COLUMN waveform BLOB;
