-- Version 12: declines the server has not heard of yet. A contact request
-- declined while offline (or whose decline did not reach the server) is
-- told to the server on the next connection, so it stops reaching this
-- account's other devices and its requester cannot send it again.
CREATE TABLE pending_declines (
    account_id TEXT PRIMARY KEY NOT NULL
) WITHOUT ROWID;
