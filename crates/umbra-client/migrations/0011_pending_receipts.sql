-- Version 11: receipts wait before they are sent. A delivered or read
-- receipt is kept here until its batch is due (a random time within the
-- device's receipt delay after the first receipt of the batch), so that
-- when a receipt leaves says nothing the server could link to the message
-- it answers; all receipts of one kind due in a conversation go in one
-- message.
CREATE TABLE pending_receipts (
    group_id BLOB    NOT NULL,
    kind     INTEGER NOT NULL,
    uid      BLOB    NOT NULL,
    due_at   INTEGER NOT NULL,
    PRIMARY KEY (group_id, kind, uid)
) WITHOUT ROWID;
CREATE INDEX pending_receipts_by_due ON pending_receipts(due_at);
