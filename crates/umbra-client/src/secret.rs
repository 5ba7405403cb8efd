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

/// What `kdf.json` holds.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct KdfFile {
    pub version: u32,
    pub salt: String,
    pub params: KdfParams,
}

pub(crate) const KDF_FILE: &str = "kdf.json";

impl KdfFile {
    pub fn new(params: KdfParams) -> Result<Self> {
        let mut salt = [0u8; 16];
        getrandom::getrandom(&mut salt).map_err(|e| ClientError::Store(e.to_string()))?;
        Ok(KdfFile {
            version: 1,
            salt: hex::encode(salt),
            params,
        })
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

    pub fn write(&self, home: &Path) -> Result<()> {
        let text =
            serde_json::to_vec_pretty(self).map_err(|e| ClientError::Store(e.to_string()))?;
        std::fs::write(home.join(KDF_FILE), text).map_err(|e| ClientError::Store(e.to_string()))
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
