//! What two devices of one account say to each other while linking, and
//! how it is sealed.
//!
//! They meet at a rendezvous at the server (`umbra_proto::rendezvous`),
//! whose slots anyone who knows its ID can read. Every payload is sealed
//! with ChaCha20-Poly1305 under a key derived by HKDF-SHA256 from the link
//! string's 32-byte secret (salt: the rendezvous ID), with a random nonce,
//! and bound to its slot by the associated data, so the server (which
//! never sees the secret) can neither read a payload nor move it to
//! another slot. Each slot is written by one side only:
//!
//! | slot | from | what |
//! |---|---|---|
//! | 0 | new device | [`Offer`]: its device key, name and store version |
//! | 1 | existing device | [`Answer`]: the add entry, signed by the account key and the existing device, or a refusal |
//! | 2 | new device | its signature of the entry |
//! | 3 | existing device | [`Manifest`]: how many chunks the bundle has and its digest, or a refusal |
//! | 4.. | existing device | the [`Bundle`]'s chunks |
//! | 61 | new device | done: it read slot 62 (the existing device then closes the rendezvous) |
//! | 62 | existing device | [`Joined`]: the conversations it added the new device to, and the messages that came meanwhile |
//! | 63 | new device | ready: logged in, KeyPackages uploaded |

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{ChaCha20Poly1305, Key, Nonce};
use sha2::{Digest, Sha256};
use umbra_proto::RendezvousId;
use umbra_proto::rendezvous::{RENDEZVOUS_BYTES, RENDEZVOUS_SLOT_BYTES};
use zeroize::Zeroizing;

use crate::error::{ClientError, Result};

pub(crate) const OFFER: u32 = 0;
pub(crate) const ANSWER: u32 = 1;
pub(crate) const SIGNATURE: u32 = 2;
pub(crate) const MANIFEST: u32 = 3;
pub(crate) const FIRST_CHUNK: u32 = 4;
pub(crate) const DONE: u32 = 61;
pub(crate) const JOINED: u32 = 62;
pub(crate) const READY: u32 = 63;
/// Bundle chunks: as many whole slots as a rendezvous holds, less one for
/// the small payloads (and no more than the slots between the manifest
/// and `DONE`).
pub(crate) const MAX_CHUNKS: u32 = {
    let by_bytes = (RENDEZVOUS_BYTES / RENDEZVOUS_SLOT_BYTES) as u32 - 1;
    let by_slots = DONE - FIRST_CHUNK;
    if by_bytes < by_slots {
        by_bytes
    } else {
        by_slots
    }
};
/// Plaintext per chunk: a slot less the nonce and tag.
pub(crate) const CHUNK_BYTES: usize = RENDEZVOUS_SLOT_BYTES - 64;

const CONTEXT: &[u8] = b"umbra-link-v1";
const NONCE_BYTES: usize = 12;

/// The key both devices derive from the link's secret.
pub(crate) struct Sealer {
    cipher: ChaCha20Poly1305,
    rendezvous: RendezvousId,
}

impl Sealer {
    pub(crate) fn new(secret: &[u8; 32], rendezvous: RendezvousId) -> Sealer {
        let mut key = Zeroizing::new([0u8; 32]);
        hkdf::Hkdf::<Sha256>::new(Some(&rendezvous.0), secret)
            .expand(CONTEXT, key.as_mut())
            // 32 bytes is far below HKDF-SHA256's limit.
            .unwrap_or_else(|_| unreachable!("HKDF output length"));
        Sealer {
            cipher: ChaCha20Poly1305::new(Key::from_slice(key.as_ref())),
            rendezvous,
        }
    }

    fn aad(&self, slot: u32) -> Vec<u8> {
        let mut aad = CONTEXT.to_vec();
        aad.extend_from_slice(&self.rendezvous.0);
        aad.extend_from_slice(&slot.to_be_bytes());
        aad
    }

    /// `plaintext` sealed for `slot`: nonce || ciphertext and tag.
    pub(crate) fn seal(&self, slot: u32, plaintext: &[u8]) -> Result<Vec<u8>> {
        let mut nonce = [0u8; NONCE_BYTES];
        getrandom::getrandom(&mut nonce).map_err(|e| ClientError::Store(e.to_string()))?;
        let sealed = self
            .cipher
            .encrypt(
                Nonce::from_slice(&nonce),
                Payload {
                    msg: plaintext,
                    aad: &self.aad(slot),
                },
            )
            .map_err(|_| ClientError::Invalid("sealing a link payload failed".into()))?;
        let mut out = nonce.to_vec();
        out.extend_from_slice(&sealed);
        Ok(out)
    }

    /// Opens what was sealed for `slot`; anything else (another slot's,
    /// another link's, altered) is refused.
    pub(crate) fn open(&self, slot: u32, sealed: &[u8]) -> Result<Zeroizing<Vec<u8>>> {
        let refused = || {
            ClientError::LinkFailed(
                "a payload at the rendezvous is not sealed under this link's secret".into(),
            )
        };
        let (nonce, body) = sealed.split_at_checked(NONCE_BYTES).ok_or_else(refused)?;
        self.cipher
            .decrypt(
                Nonce::from_slice(nonce),
                Payload {
                    msg: body,
                    aad: &self.aad(slot),
                },
            )
            .map(Zeroizing::new)
            .map_err(|_| refused())
    }
}

/// Slot 0: the new device introduces itself.
#[derive(serde::Serialize, serde::Deserialize)]
pub(crate) struct Offer {
    /// Its Ed25519 device key, hex.
    pub device_key: String,
    pub name: String,
    /// Its store's version: the bundle's rows must fit it.
    pub store_version: u32,
}

/// Slot 1: the add entry for the new device (its own signature blank), or
/// why not.
#[derive(serde::Serialize, serde::Deserialize)]
pub(crate) enum Answer {
    /// The account's ID and the encoded entry (hex), its
    /// `added_signature` 64 zero bytes.
    Entry {
        account: String,
        entry: String,
    },
    Refused(String),
}

/// Slot 3: how to put the bundle together, or why there is none.
#[derive(serde::Serialize, serde::Deserialize)]
pub(crate) enum Manifest {
    Bundle { chunks: u32, sha256: String },
    Refused(String),
}

/// Slot 62: what the existing device did once the new one was ready.
#[derive(serde::Serialize, serde::Deserialize)]
pub(crate) struct Joined {
    pub conversations: usize,
    pub failed: usize,
    /// Messages that reached the existing device after it took the
    /// history, before the new device was in the conversations.
    #[serde(default)]
    pub messages: Option<Table>,
    /// The files of those messages (the same rows as a bundle's
    /// `message_files`).
    #[serde(default)]
    pub message_files: Option<Table>,
}

/// One column's value in a copied row (SQLite's types).
#[derive(serde::Serialize, serde::Deserialize)]
pub(crate) enum Value {
    Null,
    Integer(i64),
    Real(f64),
    Text(String),
    Blob(String),
}

/// Rows of one table of the device store, as copied.
#[derive(serde::Serialize, serde::Deserialize)]
pub(crate) struct Table {
    pub name: String,
    pub columns: Vec<String>,
    pub rows: Vec<Vec<Value>>,
}

/// What the existing device hands the new one: the account's keys and
/// what its store holds that the new device should too.
#[derive(serde::Serialize, serde::Deserialize)]
pub(crate) struct Bundle {
    /// The store version the rows were copied at (the new device must be
    /// at the same one).
    pub store_version: u32,
    pub account: String,
    pub device: u32,
    /// The account key's secret, hex.
    pub account_secret: String,
    pub wipe_public_key: Option<String>,
    pub subscription_expires_at: u64,
    pub tables: Vec<Table>,
}

impl Drop for Bundle {
    fn drop(&mut self) {
        zeroize::Zeroize::zeroize(&mut self.account_secret);
    }
}

/// `bytes` cut into chunks of at most [`CHUNK_BYTES`], with its digest.
pub(crate) fn chunks(bytes: &[u8]) -> Result<(Vec<&[u8]>, [u8; 32])> {
    let chunks: Vec<&[u8]> = bytes.chunks(CHUNK_BYTES).collect();
    if chunks.len() > MAX_CHUNKS as usize {
        return Err(ClientError::LinkFailed(format!(
            "this device's history is {} MiB, more than a link carries ({} MiB); \
             let older messages expire or delete conversations, then link again",
            bytes.len() >> 20,
            (MAX_CHUNKS as usize * CHUNK_BYTES) >> 20
        )));
    }
    Ok((chunks, Sha256::digest(bytes).into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_payload_opens_only_in_its_own_slot_and_link() {
        let sealer = Sealer::new(&[7; 32], RendezvousId([1; 16]));
        let sealed = sealer
            .seal(OFFER, b"hello")
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            sealer.open(OFFER, &sealed).ok().map(|p| p.to_vec()),
            Some(b"hello".to_vec())
        );
        assert!(sealer.open(ANSWER, &sealed).is_err());
        let other_secret = Sealer::new(&[8; 32], RendezvousId([1; 16]));
        assert!(other_secret.open(OFFER, &sealed).is_err());
        let other_rendezvous = Sealer::new(&[7; 32], RendezvousId([2; 16]));
        assert!(other_rendezvous.open(OFFER, &sealed).is_err());
        let mut altered = sealed.clone();
        let last = altered.len() - 1;
        altered[last] ^= 1;
        assert!(sealer.open(OFFER, &altered).is_err());
        assert!(sealer.open(OFFER, &sealed[..5]).is_err());
    }
}
