-- Version 5: the newest wipe command relayed for each line, by its signed
-- issue time, so that a command seen once cannot be replayed.
ALTER TABLE accounts ADD COLUMN last_wipe_issued_at INTEGER;
