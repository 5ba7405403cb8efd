//! Passphrases and the key that opens the device store.
//!
//! The store key is Argon2id(passphrase, salt) with parameters fixed when the
//! device was created; salt and parameters sit beside the store in
//! `kdf.json` (they are not secret). SQLCipher receives the 32-byte key raw,
//! so its own key derivation is not run a second time.

use std::fmt;
use std::path::Path;

use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::error::{ClientError, Result};

/// A passphrase as typed. Zeroised on drop; never printed.
#[derive(Clone)]
pub struct Passphrase(Zeroizing<String>);

impl Passphrase {
    pub fn new(text: impl Into<String>) -> Self {
        Passphrase(Zeroizing::new(text.into()))
    }

    fn as_bytes(&self) -> &[u8] {
        self.0.as_bytes()
    }
}

impl fmt::Debug for Passphrase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Passphrase(<redacted>)")
    }
}

/// Argon2id cost parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct KdfParams {
    /// Memory in KiB.
    pub memory_kib: u32,
    pub iterations: u32,
    pub parallelism: u32,
}

impl Default for KdfParams {
    /// 64 MiB, 3 passes, 1 lane: about half a second on a phone-class core,
    /// above OWASP's minimum for Argon2id (19 MiB, 2 passes).
    fn default() -> Self {
        KdfParams {
            memory_kib: 64 * 1024,
            iterations: 3,
            parallelism: 1,
        }
    }
}

impl KdfParams {
    /// Cheap parameters for tests only: they make brute force easy.
    pub fn insecure_for_tests() -> Self {
        KdfParams {
            memory_kib: 64,
            iterations: 1,
            parallelism: 1,
        }
    }
}

fn random_hex(len: usize) -> Result<String> {
    let mut bytes = vec![0u8; len];
    getrandom::getrandom(&mut bytes).map_err(|e| ClientError::Store(e.to_string()))?;
    Ok(hex::encode(bytes))
}

fn duress_check(key: &[u8; 32]) -> [u8; 32] {
    use sha2::{Digest, Sha256};
    Sha256::new()
        .chain_update(b"umbra-duress-v1")
        .chain_update(key)
        .finalize()
        .into()
}

fn seal_key(key: &[u8; 32]) -> Zeroizing<[u8; 32]> {
    use sha2::{Digest, Sha256};
    Zeroizing::new(
        Sha256::new()
            .chain_update(b"umbra-duress-seal-v1")
            .chain_update(key)
            .finalize()
            .into(),
    )
}

/// What `kdf.json` holds.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct KdfFile {
    pub version: u32,
    pub salt: String,
    pub params: KdfParams,
    /// SHA-256("umbra-duress-v1" || key) for the duress passphrase's key;
    /// random bytes while none is set, so the file does not tell.
    #[serde(default)]
    pub duress_check: String,
    /// A revocation of this line (with the wipe code's seed, when the
    /// duress passphrase is for every device), sealed (ChaCha20-Poly1305)
    /// under a key derived from the duress passphrase's key; random bytes
    /// while unset.
    #[serde(default)]
    pub duress_seal: String,
}

/// The unlock-attempt counter, in its own file so that `kdf.json` (and its
/// salt) is written once and never copied around by rewrites.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Attempts {
    /// Attempts begun since the last successful unlock.
    pub failed: u32,
    /// The device wipes itself when `failed` reaches this.
    pub max: u32,
}

pub(crate) const ATTEMPTS_FILE: &str = "attempts.json";

impl Attempts {
    pub fn read(home: &Path) -> Result<Attempts> {
        match std::fs::read(home.join(ATTEMPTS_FILE)) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map_err(|e| ClientError::Store(format!("{ATTEMPTS_FILE} is damaged: {e}"))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Attempts {
                failed: 0,
                max: DEFAULT_MAX_FAILED_UNLOCKS,
            }),
            Err(e) => Err(ClientError::Store(e.to_string())),
        }
    }

    pub fn write(&self, home: &Path) -> Result<()> {
        let text = serde_json::to_vec(self).map_err(|e| ClientError::Store(e.to_string()))?;
        write_durably(home, ATTEMPTS_FILE, &text)
    }
}

/// Writes a file durably and atomically (temporary file, fsync, rename), so
/// an update survives a crash or a pulled battery.
fn write_durably(home: &Path, name: &str, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let store = |e: std::io::Error| ClientError::Store(e.to_string());
    let temporary = home.join(format!("{name}.new"));
    let mut file = std::fs::File::create(&temporary).map_err(store)?;
    file.write_all(bytes).map_err(store)?;
    file.sync_all().map_err(store)?;
    // The file replaced keeps its bytes in a freed inode; for the
    // key-derivation file (its salt) they are overwritten through a handle
    // kept across the rename, once the new one is in place.
    let replaced = (name == KDF_FILE)
        .then(|| {
            std::fs::OpenOptions::new()
                .write(true)
                .open(home.join(name))
                .ok()
        })
        .flatten();
    std::fs::rename(&temporary, home.join(name)).map_err(store)?;
    if let Some(mut old) = replaced {
        let len = old.metadata().map_err(store)?.len();
        crate::store::fill_with_noise(&mut old, len).map_err(store)?;
    }
    Ok(())
}

/// Wrong passphrases in a row before the device wipes itself.
pub const DEFAULT_MAX_FAILED_UNLOCKS: u32 = 10;

/// Bytes of sealed revocation (nonce, JSON, tag), padded so that a real seal
/// and the random filler have the same length.
const SEAL_LEN: usize = 12 + 600 + 16;

pub(crate) const KDF_FILE: &str = "kdf.json";

impl KdfFile {
    pub fn new(params: KdfParams) -> Result<Self> {
        let mut salt = [0u8; 16];
        getrandom::getrandom(&mut salt).map_err(|e| ClientError::Store(e.to_string()))?;
        Ok(KdfFile {
            version: 1,
            salt: hex::encode(salt),
            params,
            duress_check: random_hex(32)?,
            duress_seal: random_hex(SEAL_LEN)?,
        })
    }

    /// Whether `key` is the duress passphrase's key (constant-time compare).
    pub fn is_duress(&self, key: &[u8; 32]) -> bool {
        let Ok(check) = hex::decode(&self.duress_check) else {
            return false;
        };
        let ours = duress_check(key);
        check.len() == ours.len()
            && check
                .iter()
                .zip(ours.iter())
                .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                == 0
    }

    /// Makes `key` the duress passphrase's key, sealing `revocation` under it.
    pub fn set_duress(&mut self, key: &[u8; 32], revocation: &[u8]) -> Result<()> {
        use chacha20poly1305::aead::{Aead, KeyInit};
        let mut padded = revocation.to_vec();
        if padded.len() > SEAL_LEN - 28 {
            return Err(ClientError::Store("revocation too long to seal".into()));
        }
        padded.resize(SEAL_LEN - 28, b' ');
        let mut nonce = [0u8; 12];
        getrandom::getrandom(&mut nonce).map_err(|e| ClientError::Store(e.to_string()))?;
        let cipher = chacha20poly1305::ChaCha20Poly1305::new((&*seal_key(key)).into());
        let sealed = cipher
            .encrypt((&nonce).into(), padded.as_slice())
            .map_err(|_| ClientError::Store("sealing the revocation failed".into()))?;
        self.duress_check = hex::encode(duress_check(key));
        self.duress_seal = hex::encode([&nonce[..], &sealed].concat());
        Ok(())
    }

    /// Opens the sealed revocation with the duress passphrase's key.
    pub fn unseal(&self, key: &[u8; 32]) -> Option<Vec<u8>> {
        use chacha20poly1305::aead::{Aead, KeyInit};
        let bytes = hex::decode(&self.duress_seal).ok()?;
        let (nonce, sealed) = bytes.split_first_chunk::<12>()?;
        let cipher = chacha20poly1305::ChaCha20Poly1305::new((&*seal_key(key)).into());
        let plain = cipher.decrypt(nonce.into(), sealed).ok()?;
        Some(plain.trim_ascii_end().to_vec())
    }

    pub fn read(home: &Path) -> Result<Option<Self>> {
        match std::fs::read(home.join(KDF_FILE)) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|e| ClientError::Store(format!("{KDF_FILE} is damaged: {e}"))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(ClientError::Store(e.to_string())),
        }
    }

    /// Writes the file durably and atomically.
    pub fn write(&self, home: &Path) -> Result<()> {
        let text =
            serde_json::to_vec_pretty(self).map_err(|e| ClientError::Store(e.to_string()))?;
        write_durably(home, KDF_FILE, &text)
    }

    /// Derives the 32-byte store key from `passphrase`.
    pub fn derive(&self, passphrase: &Passphrase) -> Result<Zeroizing<[u8; 32]>> {
        let salt = hex::decode(&self.salt)
            .map_err(|e| ClientError::Store(format!("{KDF_FILE} salt: {e}")))?;
        let params = argon2::Params::new(
            self.params.memory_kib,
            self.params.iterations,
            self.params.parallelism,
            Some(32),
        )
        .map_err(|e| ClientError::Store(format!("{KDF_FILE} parameters: {e}")))?;
        let argon =
            argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params);
        let mut key = Zeroizing::new([0u8; 32]);
        argon
            .hash_password_into(passphrase.as_bytes(), &salt, key.as_mut())
            .map_err(|e| ClientError::Store(format!("deriving the store key: {e}")))?;
        Ok(key)
    }
}
