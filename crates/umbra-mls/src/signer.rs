//! The device's Ed25519 identity key, used both to authenticate to the server
//! and as its MLS signature key.

use std::fmt;

use ed25519_dalek::{Signer as _, SigningKey};
use openmls_traits::signatures::{Signer, SignerError};
use openmls_traits::types::SignatureScheme;
use umbra_proto::{IdentityKey, Signature};
use zeroize::Zeroizing;

/// A device's private identity key. Zeroised on drop (ed25519-dalek's
/// `zeroize` feature); its `Debug` shows only the public half.
pub struct DeviceSigner {
    key: SigningKey,
}

impl DeviceSigner {
    /// Creates a signer from 32 secret bytes (from the OS random generator,
    /// or read back from the device's encrypted store).
    pub fn from_secret(secret: &[u8; 32]) -> Self {
        DeviceSigner {
            key: SigningKey::from_bytes(secret),
        }
    }

    /// The key a remote-wipe code stands for: Ed25519 from
    /// SHA-256("umbra-wipe-key-v1" || seed). The device keeps only its
    /// public half; the seed is what the user writes down.
    pub fn from_wipe_seed(seed: &[u8; 16]) -> Self {
        use sha2::{Digest, Sha256};
        let secret: Zeroizing<[u8; 32]> = Zeroizing::new(
            Sha256::new()
                .chain_update(b"umbra-wipe-key-v1")
                .chain_update(seed)
                .finalize()
                .into(),
        );
        DeviceSigner::from_secret(&secret)
    }

    /// The secret bytes, for the device's encrypted store only.
    pub fn secret_bytes(&self) -> Zeroizing<[u8; 32]> {
        Zeroizing::new(self.key.to_bytes())
    }

    pub fn identity_key(&self) -> IdentityKey {
        IdentityKey::from_bytes(self.key.verifying_key().to_bytes())
    }

    /// Signs an Umbra protocol payload (not MLS: openmls calls [`Signer`]).
    pub fn sign_payload(&self, payload: &[u8]) -> Signature {
        Signature::from_bytes(self.key.sign(payload).to_bytes())
    }
}

/// Checks an Ed25519 signature made by [`DeviceSigner::sign_payload`].
pub fn verify(identity_key: &IdentityKey, payload: &[u8], signature: &Signature) -> bool {
    let Ok(key) = ed25519_dalek::VerifyingKey::from_bytes(identity_key.as_bytes()) else {
        return false;
    };
    key.verify_strict(
        payload,
        &ed25519_dalek::Signature::from_bytes(signature.as_bytes()),
    )
    .is_ok()
}

impl Signer for DeviceSigner {
    fn sign(&self, payload: &[u8]) -> Result<Vec<u8>, SignerError> {
        Ok(self.key.sign(payload).to_bytes().to_vec())
    }

    fn signature_scheme(&self) -> SignatureScheme {
        SignatureScheme::ED25519
    }
}

impl fmt::Debug for DeviceSigner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DeviceSigner")
            .field("public", &self.identity_key())
            .finish_non_exhaustive()
    }
}
