//! Entries of an account's device log: the bytes, not the rules.
//!
//! An account's devices are listed by an append-only, hash-chained log of
//! signed entries, each adding or removing one device. The server keeps the
//! log; every device of the account and every contact verifies it (the rules
//! and the signatures are in `umbra_mls::DeviceLog`, which has the keys).
//! This module defines an entry, its wire form, the exact bytes its
//! signatures cover ([`DeviceEntry::signed_bytes`]) and its hash
//! ([`DeviceEntry::hash`]), which the next entry names.

use prost::Message as _;
use sha2::{Digest, Sha256};

use crate::ids::{AccountId, IdentityKey, Signature};
use crate::{DecodeError, wire};

/// Longest device name, in bytes of UTF-8.
pub const MAX_DEVICE_NAME_BYTES: usize = 64;

/// Most entries one `DeviceLog` answer carries; a shorter answer is the
/// log's end.
pub const DEVICE_LOG_PAGE: usize = 500;

/// Largest encoded entry a decoder accepts (an add with the longest name is
/// about 300 bytes).
pub const MAX_DEVICE_ENTRY_BYTES: usize = 1024;

/// A device's number within its account: 1 for the first, then chosen by
/// the device that adds one (never reused within the account).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
pub struct DeviceId(pub u32);

impl DeviceId {
    /// The account's first device, whose key is the account key.
    pub const FIRST: DeviceId = DeviceId(1);
}

impl std::fmt::Display for DeviceId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// One device of one account: what has a mailbox, a session and a leaf in
/// each of the account's groups. Shown as `ACCOUNT/DEVICE`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DeviceAddr {
    pub account: AccountId,
    pub device: DeviceId,
}

impl DeviceAddr {
    pub fn new(account: AccountId, device: DeviceId) -> Self {
        DeviceAddr { account, device }
    }

    /// The account's first device (the only one of an account that never
    /// added another).
    pub fn first(account: AccountId) -> Self {
        DeviceAddr::new(account, DeviceId::FIRST)
    }
}

impl std::fmt::Display for DeviceAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.account, self.device)
    }
}

/// What one entry changes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DeviceChange {
    /// `device` joins the account; `key` is its Ed25519 device key.
    Add {
        device: DeviceId,
        key: IdentityKey,
        name: String,
    },
    /// `device` leaves the account for good.
    Remove { device: DeviceId },
}

/// One signed entry of an account's device log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceEntry {
    /// Position in the log, from 0.
    pub seq: u64,
    /// [`DeviceEntry::hash`] of the entry before; all zero for the first.
    pub prev_hash: [u8; 32],
    /// When the device made it, Unix seconds by its clock (shown, not
    /// trusted for anything).
    pub created_at: u64,
    /// The current device that made the change (for the first entry, the
    /// device it adds).
    pub by_device: DeviceId,
    pub change: DeviceChange,
    /// By the account key over [`DeviceEntry::signed_bytes`].
    pub account_signature: Signature,
    /// By `by_device`'s key over the same bytes.
    pub device_signature: Signature,
    /// For an add: by the added device's key over the same bytes (it holds
    /// the key it is listed with). Absent for a remove.
    pub added_signature: Option<Signature>,
}

const SIGNED_CONTEXT: &[u8] = b"umbra-device-entry-v1";
const HASH_CONTEXT: &[u8] = b"umbra-device-hash-v1";
const ADD: u8 = 1;
const REMOVE: u8 = 2;

impl DeviceEntry {
    /// The bytes every signature of this entry covers:
    ///
    /// ```text
    /// "umbra-device-entry-v1" || account_id (8 ASCII capitals)
    ///   || seq (u64 BE) || prev_hash (32) || created_at (u64 BE) || by_device (u32 BE)
    ///   || 1 || device (u32 BE) || key (32) || u8 len(name) || name (UTF-8)     for an add
    ///   || 2 || device (u32 BE)                                                 for a remove
    /// ```
    pub fn signed_bytes(&self, account: &AccountId) -> Vec<u8> {
        let id = account.as_str().as_bytes();
        let mut out = Vec::with_capacity(SIGNED_CONTEXT.len() + id.len() + 160);
        out.extend_from_slice(SIGNED_CONTEXT);
        out.extend_from_slice(id); // always AccountId::LEN bytes
        out.extend_from_slice(&self.seq.to_be_bytes());
        out.extend_from_slice(&self.prev_hash);
        out.extend_from_slice(&self.created_at.to_be_bytes());
        out.extend_from_slice(&self.by_device.0.to_be_bytes());
        match &self.change {
            DeviceChange::Add { device, key, name } => {
                out.push(ADD);
                out.extend_from_slice(&device.0.to_be_bytes());
                out.extend_from_slice(key.as_bytes());
                // Names are at most MAX_DEVICE_NAME_BYTES (checked on decode
                // and by the builders).
                out.push(u8::try_from(name.len()).unwrap_or(u8::MAX));
                out.extend_from_slice(name.as_bytes());
            }
            DeviceChange::Remove { device } => {
                out.push(REMOVE);
                out.extend_from_slice(&device.0.to_be_bytes());
            }
        }
        out
    }

    /// SHA-256("umbra-device-hash-v1" || signed_bytes || account_signature
    /// || device_signature || added_signature if any): what the next entry's
    /// `prev_hash` must be, and the log's head when this entry is the last.
    pub fn hash(&self, account: &AccountId) -> [u8; 32] {
        let mut hash = Sha256::new()
            .chain_update(HASH_CONTEXT)
            .chain_update(self.signed_bytes(account))
            .chain_update(self.account_signature.as_bytes())
            .chain_update(self.device_signature.as_bytes());
        if let Some(signature) = &self.added_signature {
            hash.update(signature.as_bytes());
        }
        hash.finalize().into()
    }

    /// The device this entry adds or removes.
    pub fn device(&self) -> DeviceId {
        match &self.change {
            DeviceChange::Add { device, .. } | DeviceChange::Remove { device } => *device,
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        let (add, remove) = match &self.change {
            DeviceChange::Add { device, key, name } => (
                Some(wire::AddDevice {
                    device: device.0,
                    key: key.as_bytes().to_vec(),
                    name: name.clone(),
                }),
                None,
            ),
            DeviceChange::Remove { device } => {
                (None, Some(wire::RemoveDevice { device: device.0 }))
            }
        };
        wire::DeviceEntry {
            seq: self.seq,
            prev_hash: self.prev_hash.to_vec(),
            created_at: self.created_at,
            by_device: self.by_device.0,
            add,
            remove,
            account_signature: self.account_signature.as_bytes().to_vec(),
            device_signature: self.device_signature.as_bytes().to_vec(),
            added_signature: self
                .added_signature
                .map(|s| s.as_bytes().to_vec())
                .unwrap_or_default(),
        }
        .encode_to_vec()
    }

    /// Parses an entry's form, not its meaning: the chain and the
    /// signatures are `umbra_mls::DeviceLog`'s job.
    pub fn decode(bytes: &[u8]) -> Result<DeviceEntry, DecodeError> {
        if bytes.len() > MAX_DEVICE_ENTRY_BYTES {
            return Err(DecodeError::TooLarge {
                len: bytes.len(),
                max: MAX_DEVICE_ENTRY_BYTES,
            });
        }
        let raw =
            wire::DeviceEntry::decode(bytes).map_err(|e| DecodeError::Protobuf(e.to_string()))?;
        let prev_hash: [u8; 32] =
            raw.prev_hash
                .as_slice()
                .try_into()
                .map_err(|_| DecodeError::Invalid {
                    field: "prev_hash",
                    reason: format!("{} bytes, expected 32", raw.prev_hash.len()),
                })?;
        let change = match (raw.add, raw.remove) {
            (Some(add), None) => {
                if add.name.len() > MAX_DEVICE_NAME_BYTES {
                    return Err(DecodeError::Invalid {
                        field: "name",
                        reason: format!(
                            "{} bytes, at most {MAX_DEVICE_NAME_BYTES}",
                            add.name.len()
                        ),
                    });
                }
                DeviceChange::Add {
                    device: DeviceId(add.device),
                    key: IdentityKey::from_slice(&add.key)?,
                    name: add.name,
                }
            }
            (None, Some(remove)) => DeviceChange::Remove {
                device: DeviceId(remove.device),
            },
            _ => {
                return Err(DecodeError::Invalid {
                    field: "change",
                    reason: "exactly one of `add` and `remove` must be set".into(),
                });
            }
        };
        let added_signature = match (&change, raw.added_signature.is_empty()) {
            (DeviceChange::Add { .. }, false) => Some(Signature::from_slice(&raw.added_signature)?),
            (DeviceChange::Add { .. }, true) => {
                return Err(DecodeError::Missing("added_signature"));
            }
            (DeviceChange::Remove { .. }, true) => None,
            (DeviceChange::Remove { .. }, false) => {
                return Err(DecodeError::Invalid {
                    field: "added_signature",
                    reason: "a remove carries no added_signature".into(),
                });
            }
        };
        Ok(DeviceEntry {
            seq: raw.seq,
            prev_hash,
            created_at: raw.created_at,
            by_device: DeviceId(raw.by_device),
            change,
            account_signature: Signature::from_slice(&raw.account_signature)?,
            device_signature: Signature::from_slice(&raw.device_signature)?,
            added_signature,
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn entry(change: DeviceChange, added: Option<Signature>) -> DeviceEntry {
        DeviceEntry {
            seq: 3,
            prev_hash: [7; 32],
            created_at: 1_700_000_000,
            by_device: DeviceId(2),
            change,
            account_signature: Signature::from_bytes([1; 64]),
            device_signature: Signature::from_bytes([2; 64]),
            added_signature: added,
        }
    }

    fn add() -> DeviceEntry {
        entry(
            DeviceChange::Add {
                device: DeviceId(4),
                key: IdentityKey::from_bytes([9; 32]),
                name: "laptop".into(),
            },
            Some(Signature::from_bytes([3; 64])),
        )
    }

    #[test]
    fn entries_survive_the_wire() {
        let remove = entry(
            DeviceChange::Remove {
                device: DeviceId(1),
            },
            None,
        );
        for e in [add(), remove] {
            assert_eq!(DeviceEntry::decode(&e.encode()).unwrap(), e);
        }
    }

    #[test]
    fn every_field_is_covered_by_the_signed_bytes_and_the_hash() {
        let account = AccountId::parse("K7QD9XPM").unwrap();
        let base = add();
        let mut changed = Vec::new();
        let mut e = base.clone();
        e.seq += 1;
        changed.push(e);
        let mut e = base.clone();
        e.prev_hash[0] ^= 1;
        changed.push(e);
        let mut e = base.clone();
        e.created_at += 1;
        changed.push(e);
        let mut e = base.clone();
        e.by_device = DeviceId(3);
        changed.push(e);
        let mut e = base.clone();
        if let DeviceChange::Add { name, .. } = &mut e.change {
            name.push('!');
        }
        changed.push(e);
        let mut e = base.clone();
        if let DeviceChange::Add { key, .. } = &mut e.change {
            *key = IdentityKey::from_bytes([8; 32]);
        }
        changed.push(e);
        for e in &changed {
            assert_ne!(e.signed_bytes(&account), base.signed_bytes(&account));
            assert_ne!(e.hash(&account), base.hash(&account));
        }
        let other = AccountId::parse("K7QD9XPN").unwrap();
        assert_ne!(base.signed_bytes(&other), base.signed_bytes(&account));
        // Signatures are not signed, but the hash covers them.
        let mut e = base.clone();
        e.added_signature = Some(Signature::from_bytes([4; 64]));
        assert_eq!(e.signed_bytes(&account), base.signed_bytes(&account));
        assert_ne!(e.hash(&account), base.hash(&account));
    }

    #[test]
    fn malformed_entries_are_refused() {
        let mut no_added = add();
        no_added.added_signature = None;
        assert_eq!(
            DeviceEntry::decode(&no_added.encode()),
            Err(DecodeError::Missing("added_signature"))
        );
        let mut long = add();
        long.change = DeviceChange::Add {
            device: DeviceId(4),
            key: IdentityKey::from_bytes([9; 32]),
            name: "x".repeat(MAX_DEVICE_NAME_BYTES + 1),
        };
        assert!(DeviceEntry::decode(&long.encode()).is_err());
        assert!(DeviceEntry::decode(&[0xff; 2000]).is_err());
        assert!(DeviceEntry::decode(b"").is_err()); // neither add nor remove
    }
}
