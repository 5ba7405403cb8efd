-- Version 10: when each commit hash was kept, so that hashes are deleted
-- once no device can still be resubmitting that commit (COMMIT_HASH_LIFETIME
-- in umbra-store, longer than any delivery lives). Hashes kept before count
-- from the upgrade, so a reply lost across the restart is still recognised.
ALTER TABLE group_commits ADD COLUMN committed_at INTEGER NOT NULL DEFAULT 0;
UPDATE group_commits SET committed_at = CAST(strftime('%s', 'now') AS INTEGER);
