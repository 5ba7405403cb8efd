-- Version 13: anonymous sending. Tokens the server signed blindly, each
-- paying for one message sent on a connection that does not log in; a
-- token is deleted in the transaction that spends it (and put back if the
-- server refused the message before spending it).
CREATE TABLE send_tokens (
    nonce BLOB PRIMARY KEY NOT NULL,
    key_id BLOB NOT NULL,
    authenticator BLOB NOT NULL
) WITHOUT ROWID;
