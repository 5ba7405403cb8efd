-- Version 3: each mailbox's `MailboxFull` notice (kind 10), found without
-- reading the mailbox it counts for: a full mailbox holds as many copies
-- as its cap allows, and a message to its device's groups looks its
-- notice up. Only notices are in the index, so storing a copy costs it
-- nothing. Built CONCURRENTLY, outside a transaction (ALONE in
-- postgres/mod.rs), so the old nodes' writes go on meanwhile. An attempt
-- that died before recording the version left the index finished (kept
-- here) or invalid (dropped by the runner before this runs again). No
-- semicolon may stand in a comment here: the statements are split at them.
CREATE INDEX CONCURRENTLY IF NOT EXISTS mailbox_full_notices
    ON mailbox (account_id, device) WHERE kind = 10;
