-- Version 3: the delivery service derives who a commit adds and removes
-- from the commit itself, so a pending commit no longer keeps the lists it
-- used to declare.
ALTER TABLE pending_commits DROP COLUMN added;
ALTER TABLE pending_commits DROP COLUMN removed;
