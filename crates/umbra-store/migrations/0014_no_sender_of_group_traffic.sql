-- Version 14: the server keeps no sender for what members send a group
-- (application messages 1, commits 2, Welcomes 3, proposals 4): MLS
-- authenticates it to the recipients, and the server has no use for it
-- once the copy is stored. Copies waiting from before lose it here; from now
-- on the column holds the empty string for them.
UPDATE mailbox SET sender = '' WHERE kind IN (1, 2, 3, 4);
