-- Version 9: KeyPackages belong to a device, not to an account. Each device
-- of an account keeps its own stock of one-time KeyPackages and its own
-- last-resort one, signed by its own key; an account's contacts fetch one
-- per current device. What was stored before belongs to device 1 (whose key
-- is the account key).
ALTER TABLE key_packages ADD COLUMN device INTEGER NOT NULL DEFAULT 1;
DROP INDEX key_packages_by_account;
CREATE INDEX key_packages_by_device ON key_packages(account_id, device, id);

CREATE TABLE last_resort_key_packages_v9 (
    account_id  TEXT NOT NULL REFERENCES accounts(account_id) ON DELETE CASCADE,
    device      INTEGER NOT NULL,
    key_package BLOB NOT NULL,
    PRIMARY KEY (account_id, device)
) WITHOUT ROWID;
INSERT INTO last_resort_key_packages_v9 (account_id, device, key_package)
    SELECT account_id, 1, key_package FROM last_resort_key_packages;
DROP TABLE last_resort_key_packages;
ALTER TABLE last_resort_key_packages_v9 RENAME TO last_resort_key_packages;
