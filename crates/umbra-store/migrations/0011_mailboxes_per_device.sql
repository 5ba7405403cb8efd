-- Version 11: a mailbox per device, group membership per leaf, and each
-- account's current devices.
--
-- Every device of an account has its own mailbox: a fan-out stores one
-- copy per device, which that device alone reads and acknowledges. What
-- was stored before belongs to device 1 (the only device any client had).
ALTER TABLE mailbox ADD COLUMN device INTEGER NOT NULL DEFAULT 1;
DROP INDEX mailbox_by_recipient;
CREATE INDEX mailbox_by_recipient ON mailbox(recipient, device, id);

-- A group's members are leaves: one row per device in the group's tree.
CREATE TABLE group_members_v11 (
    group_id    BLOB NOT NULL REFERENCES groups(group_id) ON DELETE CASCADE,
    account_id  TEXT NOT NULL,
    device      INTEGER NOT NULL,
    PRIMARY KEY (group_id, account_id, device)
) WITHOUT ROWID;
INSERT INTO group_members_v11 (group_id, account_id, device)
    SELECT group_id, account_id, 1 FROM group_members;
DROP TABLE group_members;
ALTER TABLE group_members_v11 RENAME TO group_members;
CREATE INDEX group_members_by_account ON group_members(account_id);

-- The account's current devices and their keys, as its device log says:
-- kept up to date as entries are appended (the store reads each entry's
-- change), so that a notice meant for the account (a contact request, a
-- wipe command) reaches each device. Device 1's key is the account key.
-- Devices added in logs written before this version are filled in by the
-- store as it applies the migration (it reads the entries).
CREATE TABLE devices (
    account_id  TEXT NOT NULL REFERENCES accounts(account_id) ON DELETE CASCADE,
    device      INTEGER NOT NULL,
    device_key  BLOB NOT NULL,
    PRIMARY KEY (account_id, device)
) WITHOUT ROWID;
INSERT INTO devices (account_id, device, device_key)
    SELECT account_id, 1, identity_key FROM accounts WHERE status != 'revoked';
