//! Public delivery IDs: what a device sees of a delivery's ID.
//!
//! Inside the server, delivery IDs are one global sequence on the embedded
//! store (they order every mailbox), and each mailbox's own on PostgreSQL. Shown as they are, two IDs a device receives would tell
//! it how many deliveries the server handled for everyone else in between:
//! the server's traffic volume. So a device sees instead a keyed
//! pseudo-random function of the ID (AES-128 under a key only the server
//! holds, truncated to 63 bits so it fits a signed 64-bit column on any
//! client): the same for every push of that delivery, unrelated to any
//! other. The function is not inverted: a device acknowledges deliveries
//! pushed on its connection, and the connection remembers which internal
//! ID each public one stands for.

use std::io::Write;
use std::path::Path;

use aes::Aes128;
use aes::cipher::{BlockEncrypt, KeyInit};

/// File in the data directory holding the key (16 random bytes).
pub const KEY_FILE: &str = "delivery-ids.key";

/// The key in `data_dir` ([`KEY_FILE`]), made (readable by the owner
/// only) the first time. Every node of a cluster holds the same (a copy of
/// the first node's data directory); besides public delivery IDs, it keys
/// the names the nodes share budgets under (`crate::spending`).
pub fn load_or_create_key(data_dir: &Path) -> std::io::Result<[u8; 16]> {
    let path = data_dir.join(KEY_FILE);
    match std::fs::read(&path) {
        Ok(bytes) => bytes.as_slice().try_into().map_err(|_| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("{} must hold exactly 16 bytes", path.display()),
            )
        }),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
            let mut key = [0u8; 16];
            getrandom::getrandom(&mut key).map_err(std::io::Error::other)?;
            let mut options = std::fs::OpenOptions::new();
            options.write(true).create_new(true);
            #[cfg(unix)]
            std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
            let mut file = options.open(&path)?;
            file.write_all(&key)?;
            file.sync_all()?;
            Ok(key)
        }
        Err(error) => Err(error),
    }
}

/// HMAC-SHA-256 under a key HKDF-SHA-256 derives from the cluster's key
/// (this file's) for one purpose: what the nodes of a cluster name things
/// and tag what they say to each other with. Its `Debug` shows nothing.
pub struct ClusterMac {
    mac: hmac::Hmac<sha2::Sha256>,
}

impl std::fmt::Debug for ClusterMac {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClusterMac")
    }
}

impl ClusterMac {
    /// The derived key is wiped once HMAC has taken it (HMAC's own state
    /// is not).
    pub fn new(cluster_key: &[u8; 16], purpose: &[u8]) -> ClusterMac {
        let mut key = zeroize::Zeroizing::new([0u8; 32]);
        hkdf::Hkdf::<sha2::Sha256>::new(None, cluster_key)
            .expand(purpose, key.as_mut())
            .unwrap_or_else(|_| unreachable!("32 bytes is a valid HKDF-SHA-256 length"));
        let mac = <hmac::Hmac<sha2::Sha256> as hmac::Mac>::new_from_slice(key.as_ref())
            .unwrap_or_else(|_| unreachable!("HMAC takes a key of any length"));
        ClusterMac { mac }
    }

    /// HMAC of `parts`, each preceded by its length.
    fn of(&self, parts: &[&[u8]]) -> hmac::Hmac<sha2::Sha256> {
        use hmac::Mac;
        let mut mac = self.mac.clone();
        for part in parts {
            mac.update(&(part.len() as u64).to_be_bytes());
            mac.update(part);
        }
        mac
    }

    /// The tag of `parts`.
    pub fn tag(&self, parts: &[&[u8]]) -> [u8; 32] {
        use hmac::Mac;
        self.of(parts).finalize().into_bytes().into()
    }

    /// Whether `tag` is the tag of `parts` (compared in constant time).
    pub fn check(&self, parts: &[&[u8]], tag: &[u8]) -> bool {
        use hmac::Mac;
        self.of(parts).verify_slice(tag).is_ok()
    }
}

/// The keyed function from internal to public delivery IDs.
pub struct PublicIds {
    cipher: Aes128,
}

impl std::fmt::Debug for PublicIds {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PublicIds")
    }
}

impl PublicIds {
    pub fn new(key: [u8; 16]) -> PublicIds {
        PublicIds {
            cipher: Aes128::new(&key.into()),
        }
    }

    /// Reads the key from `data_dir`, making one (readable by the owner
    /// only) the first time.
    pub fn load_or_create(data_dir: &Path) -> std::io::Result<PublicIds> {
        load_or_create_key(data_dir).map(PublicIds::new)
    }

    /// The public ID of internal delivery ID `id`: non-zero, below 2^63.
    pub fn public(&self, id: u64) -> u64 {
        let input = (u128::from(id) << 64).to_be_bytes();
        let mut block = input.into();
        self.cipher.encrypt_block(&mut block);
        let output = u128::from_be_bytes(block.into());
        // The top 63 bits of the block.
        ((output >> 65) as u64).max(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn public_ids_are_stable_distinct_and_unordered() {
        let ids = PublicIds::new([7; 16]);
        let public: Vec<u64> = (1..=1000).map(|id| ids.public(id)).collect();
        assert_eq!(
            public,
            (1..=1000).map(|id| ids.public(id)).collect::<Vec<_>>()
        );
        let mut sorted = public.clone();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted.len(), public.len(), "no two alike");
        assert!(public.iter().all(|&p| p > 0 && p < 1 << 63));
        // Consecutive internal IDs land far apart, in no order.
        let close = public
            .windows(2)
            .filter(|pair| matches!(pair, [a, b] if a.abs_diff(*b) < 1 << 40))
            .count();
        assert_eq!(close, 0);
        assert!(
            public
                .windows(2)
                .any(|pair| matches!(pair, [a, b] if a > b))
        );
        assert!(
            public
                .windows(2)
                .any(|pair| matches!(pair, [a, b] if a < b))
        );
        // Another key, other IDs.
        assert_ne!(Some(&PublicIds::new([8; 16]).public(1)), public.first());
    }

    #[test]
    fn the_key_is_made_once_and_kept() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let first = PublicIds::load_or_create(dir.path()).unwrap_or_else(|e| panic!("{e}"));
        let again = PublicIds::load_or_create(dir.path()).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(first.public(42), again.public(42));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(dir.path().join(KEY_FILE))
                .map(|m| m.permissions().mode() & 0o777)
                .unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(mode, 0o600);
        }
    }
}
