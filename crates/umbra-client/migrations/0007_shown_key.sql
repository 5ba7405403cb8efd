-- Version 7: the contact key whose safety number was last shown to the
-- user. Marking a contact verified (or accepting a changed key) applies
-- only if the key is still that one: a key that changed between showing
-- the number and marking it is not marked unseen.
ALTER TABLE contacts ADD COLUMN shown_key BLOB;
