-- Version 10: a device apart from its account. `identity_secret` is this
-- device's own key. Device 1's key is the account key; a linked device
-- (number 2 and up) keeps the account key's secret apart, as the device
-- that linked it sent it, and the certificate its MLS leaves carry (the
-- account key and the log entry that added it).
ALTER TABLE device ADD COLUMN device_number INTEGER NOT NULL DEFAULT 1;
ALTER TABLE device ADD COLUMN account_secret BLOB;
ALTER TABLE device ADD COLUMN certificate BLOB;
