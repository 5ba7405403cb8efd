-- Version 8: each account's device log (see `umbra_mls::DeviceLog`): the
-- signed entries, in order, and the server's time of each append (for the
-- daily budget of device changes). The server checks an entry before it is
-- stored and keeps it as the device sent it.
CREATE TABLE device_log (
    account_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    entry BLOB NOT NULL,
    appended_at INTEGER NOT NULL,
    PRIMARY KEY (account_id, seq)
) WITHOUT ROWID;
