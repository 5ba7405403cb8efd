-- Version 13: a device keeps KeyPackages per MLS ciphersuite (devices offer
-- the post-quantum suite beside the classical one): one-time packages carry
-- their suite, and each device has a last-resort package per suite. What was
-- stored before is suite 3, MLS_128_DHKEMX25519_CHACHA20POLY1305_SHA256_Ed25519,
-- the only one devices uploaded.
ALTER TABLE key_packages ADD COLUMN suite INTEGER NOT NULL DEFAULT 3;
-- A package of another suite (a library user could choose 0x0001) is read
-- from its bytes: an MLSMessage (version, wire format) wrapping a
-- KeyPackage (version, cipher_suite), so the suite is bytes 7 and 8.
UPDATE key_packages SET suite = 1 WHERE substr(key_package, 7, 2) = x'0001';
DROP INDEX key_packages_by_device;
CREATE INDEX key_packages_by_suite ON key_packages(account_id, device, suite, id);

CREATE TABLE last_resort_key_packages_v13 (
    account_id  TEXT NOT NULL REFERENCES accounts(account_id) ON DELETE CASCADE,
    device      INTEGER NOT NULL,
    suite       INTEGER NOT NULL,
    key_package BLOB NOT NULL,
    PRIMARY KEY (account_id, device, suite)
) WITHOUT ROWID;
INSERT INTO last_resort_key_packages_v13 (account_id, device, suite, key_package)
    SELECT account_id, device,
           CASE WHEN substr(key_package, 7, 2) = x'0001' THEN 1 ELSE 3 END,
           key_package
    FROM last_resort_key_packages;
DROP TABLE last_resort_key_packages;
ALTER TABLE last_resort_key_packages_v13 RENAME TO last_resort_key_packages;
