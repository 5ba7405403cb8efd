-- Version 3: each mailbox's `MailboxFull` notice (kind 10), found without
-- reading the mailbox it counts for: a full mailbox holds as many copies
-- as its cap allows, and a message to its device's groups looks its
-- notice up. Only notices are in the index, so storing a copy costs it
-- nothing.
CREATE INDEX mailbox_full_notices ON mailbox (account_id, device) WHERE kind = 10;
