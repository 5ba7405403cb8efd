-- Version 12: a line that ended itself keeps its own revocation (the
-- account key's signature over the revocation payload), so that each of its
-- devices, logging in later, can be shown proof that the account, not the
-- server, ended the line (and erase itself). NULL for lines ended by their
-- distributor or by lapsing, and for live lines.
ALTER TABLE accounts ADD COLUMN revocation BLOB;
