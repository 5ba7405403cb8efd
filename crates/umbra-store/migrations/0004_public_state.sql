-- Version 4: the delivery service validates every handshake message against
-- each group's public MLS state (ratchet tree and group context; no secret),
-- kept here as an opaque blob. Groups registered before this version have
-- none and accept no further commit.
ALTER TABLE groups ADD COLUMN public_state BLOB;

-- Standalone proposals accepted in a group's current epoch (only members
-- leaving): a commit may reference them, so the service replays them into
-- the public state before validating it. Cleared when the epoch moves.
CREATE TABLE group_proposals (
    group_id  BLOB NOT NULL REFERENCES groups(group_id) ON DELETE CASCADE,
    seq       INTEGER NOT NULL,
    epoch     INTEGER NOT NULL,
    message   BLOB NOT NULL,
    PRIMARY KEY (group_id, seq)
) WITHOUT ROWID;
