-- Version 4: a verified contact whose identity key changed is not written
-- to until the user confirms the new safety number (or accepts the new key
-- unverified). Set together with key_changed when the contact was verified.
ALTER TABLE contacts ADD COLUMN key_unconfirmed INTEGER NOT NULL DEFAULT 0;
