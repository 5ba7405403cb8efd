-- Version 3: delivery IDs are taken from the mailbox's AUTOINCREMENT
-- sequence before the row is written (a copy acknowledged within the ack
-- window is never written), so the sequence row must exist from the start.

INSERT INTO sqlite_sequence (name, seq)
SELECT 'mailbox', COALESCE((SELECT MAX(id) FROM mailbox), 0)
WHERE NOT EXISTS (SELECT 1 FROM sqlite_sequence WHERE name = 'mailbox');
