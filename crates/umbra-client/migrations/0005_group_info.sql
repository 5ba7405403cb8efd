-- Version 5: a commit is submitted with the group's GroupInfo for the epoch
-- it starts (kept by the server for members who must rejoin); a pending
-- commit keeps it for resubmission.
ALTER TABLE pending_commits ADD COLUMN group_info BLOB NOT NULL DEFAULT x'';
