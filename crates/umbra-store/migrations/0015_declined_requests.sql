-- Version 15: a declined contact request is kept, marked, until it would
-- have been forgotten unanswered (30 days after it was made), so that its
-- requester cannot send it again at once, get back the rate limit it
-- counted against, or tell from either that it was declined; then it goes
-- with the unanswered ones.
ALTER TABLE contacts ADD COLUMN declined INTEGER NOT NULL DEFAULT 0;
-- The sweep that forgets requests after 30 days reads them by age.
CREATE INDEX contacts_by_age ON contacts(accepted, created_at);
