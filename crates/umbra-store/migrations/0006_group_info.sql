-- Version 6: each group's GroupInfo for its current epoch, signed by the
-- member whose commit started it (or its creator), with the ratchet tree
-- and the external public key: what a member who fell behind fetches to
-- rejoin by external commit. Empty for groups from before this version.
ALTER TABLE groups ADD COLUMN group_info BLOB NOT NULL DEFAULT x'';
