-- The PostgreSQL store's schema: the embedded store's tables as of its
-- migration 16, in PostgreSQL's types, plus one head row per mailbox.
-- Every integer the protocol calls unsigned is kept in a BIGINT (the store
-- refuses values past its range where a client could send them).

CREATE TABLE accounts (
    account_id              TEXT PRIMARY KEY,
    identity_key            BYTEA NOT NULL UNIQUE,
    created_at              BIGINT NOT NULL,
    subscription_expires_at BIGINT NOT NULL,
    wipe_key                BYTEA,
    status                  TEXT NOT NULL DEFAULT 'active',
    distributor_id          BIGINT,
    last_seen_day           BIGINT,
    last_wipe_issued_at     BIGINT,
    last_wipe_command       BYTEA
);
CREATE INDEX accounts_by_distributor ON accounts (distributor_id);
CREATE INDEX accounts_by_expiry ON accounts (subscription_expires_at) WHERE status <> 'revoked';

CREATE TABLE activation_codes (
    code_hash      BYTEA PRIMARY KEY,            -- SHA-256 of the canonical code
    days           BIGINT NOT NULL,
    issued_at      BIGINT NOT NULL,
    used_by        TEXT,
    used_at        BIGINT,
    kind           TEXT NOT NULL DEFAULT 'activation',
    distributor_id BIGINT
);

CREATE TABLE devices (
    account_id TEXT NOT NULL REFERENCES accounts (account_id) ON DELETE CASCADE,
    device     BIGINT NOT NULL,
    device_key BYTEA NOT NULL,
    PRIMARY KEY (account_id, device)
);

CREATE TABLE device_log (
    account_id  TEXT NOT NULL,
    seq         BIGINT NOT NULL,
    entry       BYTEA NOT NULL,
    appended_at BIGINT NOT NULL,
    PRIMARY KEY (account_id, seq)
);

CREATE TABLE key_packages (
    id          BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    account_id  TEXT NOT NULL REFERENCES accounts (account_id) ON DELETE CASCADE,
    device      BIGINT NOT NULL,
    suite       INTEGER NOT NULL,
    key_package BYTEA NOT NULL
);
CREATE INDEX key_packages_by_suite ON key_packages (account_id, device, suite, id);

CREATE TABLE last_resort_key_packages (
    account_id  TEXT NOT NULL REFERENCES accounts (account_id) ON DELETE CASCADE,
    device      BIGINT NOT NULL,
    suite       INTEGER NOT NULL,
    key_package BYTEA NOT NULL,
    PRIMARY KEY (account_id, device, suite)
);

CREATE TABLE contacts (
    requester  TEXT NOT NULL REFERENCES accounts (account_id) ON DELETE CASCADE,
    addressee  TEXT NOT NULL REFERENCES accounts (account_id) ON DELETE CASCADE,
    accepted   BOOLEAN NOT NULL DEFAULT FALSE,
    declined   BOOLEAN NOT NULL DEFAULT FALSE,
    created_at BIGINT NOT NULL,
    PRIMARY KEY (requester, addressee)
);
CREATE INDEX contacts_by_addressee ON contacts (addressee);
CREATE INDEX contacts_by_requester ON contacts (requester, created_at);
CREATE INDEX contacts_by_age ON contacts (accepted, created_at);

CREATE TABLE groups (
    group_id     BYTEA PRIMARY KEY,
    epoch        BIGINT NOT NULL,
    created_at   BIGINT NOT NULL,
    public_state BYTEA,
    group_info   BYTEA NOT NULL DEFAULT '\x',
    created_by   TEXT,
    delivery_key BYTEA
);
CREATE INDEX groups_by_creator ON groups (created_by);

CREATE TABLE group_members (
    group_id   BYTEA NOT NULL REFERENCES groups (group_id) ON DELETE CASCADE,
    account_id TEXT NOT NULL,
    device     BIGINT NOT NULL,
    PRIMARY KEY (group_id, account_id, device)
);
CREATE INDEX group_members_by_account ON group_members (account_id, device);

CREATE TABLE group_commits (
    group_id     BYTEA NOT NULL REFERENCES groups (group_id) ON DELETE CASCADE,
    epoch        BIGINT NOT NULL,               -- the epoch the commit was made in
    hash         BYTEA NOT NULL,
    committed_at BIGINT NOT NULL,
    PRIMARY KEY (group_id, epoch)
);
CREATE INDEX group_commits_by_age ON group_commits (committed_at);

CREATE TABLE group_proposals (
    group_id BYTEA NOT NULL REFERENCES groups (group_id) ON DELETE CASCADE,
    seq      BIGINT NOT NULL,
    epoch    BIGINT NOT NULL,
    message  BYTEA NOT NULL,
    PRIMARY KEY (group_id, seq)
);

-- One row per mailbox (device): the next delivery ID and the payload bytes
-- held. A transaction storing a copy locks the row (in sorted order), so a
-- mailbox's IDs are dense, increase in commit order and are never reused,
-- whichever node stores them. A removed device's or revoked line's row is
-- closed (in the transaction that removes it): nothing is stored for it
-- after, even by a transaction that read the device as current before.
CREATE TABLE mailbox_heads (
    account_id TEXT NOT NULL,
    device     BIGINT NOT NULL,
    next_id    BIGINT NOT NULL,
    bytes      BIGINT NOT NULL DEFAULT 0,
    closed     BOOLEAN NOT NULL DEFAULT FALSE,
    PRIMARY KEY (account_id, device)
);

CREATE TABLE mailbox (
    account_id TEXT NOT NULL,
    device     BIGINT NOT NULL,
    id         BIGINT NOT NULL,
    sender     TEXT,                            -- NULL for what members send a group
    kind       INTEGER NOT NULL,
    group_id   BYTEA,
    payload    BYTEA NOT NULL,
    sent_at    BIGINT NOT NULL,
    expires_at BIGINT NOT NULL,
    PRIMARY KEY (account_id, device, id)
);
CREATE INDEX mailbox_by_expiry ON mailbox (expires_at);

CREATE TABLE distributors (
    id         BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name       TEXT NOT NULL UNIQUE,
    public_key BYTEA NOT NULL UNIQUE,
    quota      BIGINT NOT NULL,
    created_at BIGINT NOT NULL
);

CREATE TABLE token_keys (
    key_id     BYTEA PRIMARY KEY,
    secret     BYTEA NOT NULL,
    created_at BIGINT NOT NULL
);

CREATE TABLE spent_tokens (
    key_id BYTEA NOT NULL REFERENCES token_keys (key_id) ON DELETE CASCADE,
    nonce  BYTEA NOT NULL,
    PRIMARY KEY (key_id, nonce)
);

CREATE TABLE token_allowance (
    account_id TEXT NOT NULL,
    day        BIGINT NOT NULL,
    issued     BIGINT NOT NULL,
    PRIMARY KEY (account_id, day)
);
