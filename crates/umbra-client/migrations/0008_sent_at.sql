-- Version 8: when a received message was sent, by its sender's clock
-- (never later than it arrived). `timestamp` stays when this device
-- received it; history shows the first and, when they differ by a minute
-- or more, both.
ALTER TABLE messages ADD COLUMN sent_at INTEGER;
