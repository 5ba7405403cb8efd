-- Version 7: who created each group, so the groups an account creates can
-- be counted against its quota (NULL for groups from before this version),
-- and an index to count the contact requests an account sent recently.
ALTER TABLE groups ADD COLUMN created_by TEXT;
CREATE INDEX groups_by_creator ON groups(created_by);
CREATE INDEX contacts_by_requester ON contacts(requester, created_at);
