-- Version 12: the newest wipe command relayed for each line, whole (its
-- issue time and the wipe key's signature), kept with the line for ever, so
-- that a device that was offline when its line ended (revoking drops the
-- mailboxes, and the command's copy for it with them) can be shown the
-- command the account's owner gave, and erase itself.
ALTER TABLE accounts ADD COLUMN last_wipe_command BLOB;
