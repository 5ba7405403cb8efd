-- Version 10: when each commit hash was kept, so that hashes are deleted
-- once no device can still be resubmitting that commit (COMMIT_HASH_LIFETIME
-- in umbra-store, longer than any delivery lives). Hashes kept before have
-- no time (0) and go at the first sweep.
ALTER TABLE group_commits ADD COLUMN committed_at INTEGER NOT NULL DEFAULT 0;
