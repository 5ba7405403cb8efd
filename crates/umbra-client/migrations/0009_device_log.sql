-- Version 9: the device logs this device verified (its own account's and
-- its contacts'), entry by entry as the server sent them. A log fetched
-- later must extend these: a server that drops, replaces or reorders an
-- entry is caught.
CREATE TABLE device_log (
    account_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    entry BLOB NOT NULL,
    PRIMARY KEY (account_id, seq)
);
