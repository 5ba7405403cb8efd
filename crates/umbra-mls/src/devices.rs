//! An account's device log: the rules every entry must follow, checked the
//! same way by the server (before it stores an entry) and by devices (the
//! account's own and its contacts', before they believe a device list).
//!
//! The log starts with device 1, whose key is the account key itself, added
//! by itself. Every later entry is signed three ways: by the account key
//! (it is this account's change), by a device that is current when the entry
//! is made (which device did it; a removed device, even one that kept the
//! account key, can change nothing), and for an add by the added device's
//! key (it holds the key it is listed with). Entries are chained by hash, so
//! a server can neither insert, drop nor reorder one without every verifier
//! noticing; a device pins the head it verified and refuses a log that does
//! not extend it.

use std::collections::BTreeMap;

use umbra_proto::devices::MAX_DEVICE_NAME_BYTES;
use umbra_proto::{AccountId, DeviceChange, DeviceEntry, DeviceId, IdentityKey, Signature};

use crate::signer::{DeviceSigner, verify};

/// The first device's number.
pub const FIRST_DEVICE: DeviceId = DeviceId::FIRST;

/// Why an entry or a log was refused. Each names the entry.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DeviceLogError {
    #[error("entry {seq}: expected position {expected}")]
    Position { seq: u64, expected: u64 },
    #[error("entry {seq} does not follow the entry before it (hash chain broken)")]
    Chain { seq: u64 },
    #[error("entry {seq}: the first entry must add device 1 with the account key, by itself")]
    First { seq: u64 },
    #[error("entry {seq} is not signed by the account key")]
    AccountSignature { seq: u64 },
    #[error("entry {seq} is not signed by device {device}, which it names as its author")]
    DeviceSignature { seq: u64, device: DeviceId },
    #[error("entry {seq} is not signed by the key of device {device}, which it adds")]
    AddedSignature { seq: u64, device: DeviceId },
    #[error("entry {seq}: device {device} made it, but is not a current device")]
    NotCurrent { seq: u64, device: DeviceId },
    #[error("entry {seq}: a new device gets number {expected}, not {device}")]
    Number {
        seq: u64,
        device: DeviceId,
        expected: DeviceId,
    },
    #[error(
        "entry {seq}: a device name is at most {MAX_DEVICE_NAME_BYTES} bytes, without control or direction characters"
    )]
    Name { seq: u64 },
    #[error("entry {seq}: that key already belongs to a device of this account")]
    KeyReused { seq: u64 },
    #[error("entry {seq}: device {device} is not a current device")]
    UnknownDevice { seq: u64, device: DeviceId },
    #[error("entry {seq} would remove the account's last device")]
    LastDevice { seq: u64 },
    #[error("entry {seq} would make more than {max} devices")]
    TooManyDevices { seq: u64, max: usize },
    #[error("entry {seq} could not be read: {reason}")]
    Malformed { seq: u64, reason: String },
    #[error(
        "the server's device log is shorter than the {pinned} entries this device already verified"
    )]
    RolledBack { pinned: u64 },
    #[error("the server's entry {seq} differs from the one this device already verified")]
    Forked { seq: u64 },
}

/// One device of an account, as the log lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceRecord {
    pub id: DeviceId,
    pub key: IdentityKey,
    pub name: String,
    /// Unix seconds, by the adding device's clock.
    pub added_at: u64,
    /// The device that added it (itself, for device 1).
    pub added_by: DeviceId,
    /// When and by which device it was removed, if it was.
    pub removed: Option<(u64, DeviceId)>,
}

/// A verified device log: its entries and the device list they make.
#[derive(Debug, Clone)]
pub struct DeviceLog {
    account: AccountId,
    account_key: IdentityKey,
    entries: Vec<DeviceEntry>,
    devices: BTreeMap<DeviceId, DeviceRecord>,
    head: [u8; 32],
}

impl DeviceLog {
    /// An empty log for `account`, whose entries must be signed by
    /// `account_key`.
    pub fn new(account: AccountId, account_key: IdentityKey) -> Self {
        DeviceLog {
            account,
            account_key,
            entries: Vec::new(),
            devices: BTreeMap::new(),
            head: [0; 32],
        }
    }

    /// Verifies `entries` from the first, as a device does with a log it
    /// has not seen before.
    pub fn verify(
        account: AccountId,
        account_key: IdentityKey,
        entries: impl IntoIterator<Item = DeviceEntry>,
        max_devices: Option<usize>,
    ) -> Result<DeviceLog, DeviceLogError> {
        let mut log = DeviceLog::new(account, account_key);
        for entry in entries {
            log.append(entry, max_devices)?;
        }
        Ok(log)
    }

    /// Rebuilds a log from entries this side verified before (its own
    /// store): the chain and the rules are checked again, the signatures
    /// are not (they were, when the entries arrived).
    pub fn replay(
        account: AccountId,
        account_key: IdentityKey,
        entries: impl IntoIterator<Item = DeviceEntry>,
    ) -> Result<DeviceLog, DeviceLogError> {
        let mut log = DeviceLog::new(account, account_key);
        for entry in entries {
            log.check(&entry, None, false)?;
            log.push(entry);
        }
        Ok(log)
    }

    /// Checks `entry` against every rule (signatures included) and appends
    /// it. `max_devices` is the server's cap (devices do not enforce it on
    /// others: the server's setting is not theirs to know).
    pub fn append(
        &mut self,
        entry: DeviceEntry,
        max_devices: Option<usize>,
    ) -> Result<(), DeviceLogError> {
        self.check(&entry, max_devices, true)?;
        self.push(entry);
        Ok(())
    }

    /// Checks that `entry` may come next, without appending it.
    pub fn check(
        &self,
        entry: &DeviceEntry,
        max_devices: Option<usize>,
        signatures: bool,
    ) -> Result<(), DeviceLogError> {
        let seq = entry.seq;
        let expected = self.entries.len() as u64;
        if seq != expected {
            return Err(DeviceLogError::Position { seq, expected });
        }
        if entry.prev_hash != self.head {
            return Err(DeviceLogError::Chain { seq });
        }
        let signed = entry.signed_bytes(&self.account);
        if signatures && !verify(&self.account_key, &signed, &entry.account_signature) {
            return Err(DeviceLogError::AccountSignature { seq });
        }
        if seq == 0 {
            let first = matches!(&entry.change, DeviceChange::Add { device, key, .. }
                if *device == FIRST_DEVICE && *key == self.account_key)
                && entry.by_device == FIRST_DEVICE;
            if !first {
                return Err(DeviceLogError::First { seq });
            }
        } else {
            let author = self
                .current(entry.by_device)
                .ok_or(DeviceLogError::NotCurrent {
                    seq,
                    device: entry.by_device,
                })?;
            if signatures && !verify(&author.key, &signed, &entry.device_signature) {
                return Err(DeviceLogError::DeviceSignature {
                    seq,
                    device: entry.by_device,
                });
            }
        }
        match &entry.change {
            DeviceChange::Add { device, key, name } => {
                let expected = self.next_device();
                if *device != expected {
                    return Err(DeviceLogError::Number {
                        seq,
                        device: *device,
                        expected,
                    });
                }
                if !name_allowed(name) {
                    return Err(DeviceLogError::Name { seq });
                }
                if self.devices.values().any(|d| d.key == *key) {
                    return Err(DeviceLogError::KeyReused { seq });
                }
                if let Some(max) = max_devices
                    && self.current_devices().count() >= max
                {
                    return Err(DeviceLogError::TooManyDevices { seq, max });
                }
                let added = entry.added_signature.as_ref();
                if signatures && !added.is_some_and(|s| verify(key, &signed, s)) {
                    return Err(DeviceLogError::AddedSignature {
                        seq,
                        device: *device,
                    });
                }
                if seq == 0 && signatures && !verify(key, &signed, &entry.device_signature) {
                    return Err(DeviceLogError::DeviceSignature {
                        seq,
                        device: *device,
                    });
                }
            }
            DeviceChange::Remove { device } => {
                if self.current(*device).is_none() {
                    return Err(DeviceLogError::UnknownDevice {
                        seq,
                        device: *device,
                    });
                }
                if self.current_devices().count() <= 1 {
                    return Err(DeviceLogError::LastDevice { seq });
                }
            }
        }
        Ok(())
    }

    fn push(&mut self, entry: DeviceEntry) {
        match &entry.change {
            DeviceChange::Add { device, key, name } => {
                self.devices.insert(
                    *device,
                    DeviceRecord {
                        id: *device,
                        key: *key,
                        name: name.clone(),
                        added_at: entry.created_at,
                        added_by: entry.by_device,
                        removed: None,
                    },
                );
            }
            DeviceChange::Remove { device } => {
                if let Some(record) = self.devices.get_mut(device) {
                    record.removed = Some((entry.created_at, entry.by_device));
                }
            }
        }
        self.head = entry.hash(&self.account);
        self.entries.push(entry);
    }

    /// A device that is listed and not removed.
    pub fn current(&self, device: DeviceId) -> Option<&DeviceRecord> {
        self.devices.get(&device).filter(|d| d.removed.is_none())
    }

    /// The current devices, by number.
    pub fn current_devices(&self) -> impl Iterator<Item = &DeviceRecord> {
        self.devices.values().filter(|d| d.removed.is_none())
    }

    /// Every device ever listed, removed ones included, by number.
    pub fn all_devices(&self) -> impl Iterator<Item = &DeviceRecord> {
        self.devices.values()
    }

    pub fn entries(&self) -> &[DeviceEntry] {
        &self.entries
    }

    pub fn len(&self) -> u64 {
        self.entries.len() as u64
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The last entry's hash (all zero while empty).
    pub fn head(&self) -> [u8; 32] {
        self.head
    }

    pub fn account(&self) -> &AccountId {
        &self.account
    }

    /// The number an added device gets: one past the highest ever used
    /// (numbers are given in order, so they never run out before the log's
    /// daily budget would let them).
    pub fn next_device(&self) -> DeviceId {
        DeviceId(
            self.devices
                .keys()
                .last()
                .map_or(FIRST_DEVICE.0, |d| d.0.saturating_add(1)),
        )
    }

    /// The first entry: device 1 (this device, whose key is the account
    /// key) added by itself.
    pub fn first_entry(&self, account: &DeviceSigner, name: &str, now: u64) -> DeviceEntry {
        let mut entry = self.unsigned(
            FIRST_DEVICE,
            DeviceChange::Add {
                device: FIRST_DEVICE,
                key: account.identity_key(),
                name: name.to_owned(),
            },
            now,
        );
        let signature = account.sign_payload(&entry.signed_bytes(&self.account));
        entry.account_signature = signature;
        entry.device_signature = signature;
        entry.added_signature = Some(signature);
        entry
    }

    /// An entry adding the device that holds `added`, made by device `by`.
    pub fn add_entry(
        &self,
        account: &DeviceSigner,
        by: (DeviceId, &DeviceSigner),
        added: &DeviceSigner,
        name: &str,
        now: u64,
    ) -> DeviceEntry {
        let mut entry = self.add_entry_for(account, by, added.identity_key(), name, now);
        entry.added_signature = Some(added.sign_payload(&entry.signed_bytes(&self.account)));
        entry
    }

    /// An entry adding the device whose key is `key`, made by device `by`
    /// and signed by the account key and `by`. The added device, which
    /// holds its key elsewhere (linking), signs it itself before it is
    /// appended: its `added_signature` is left blank (64 zero bytes).
    pub fn add_entry_for(
        &self,
        account: &DeviceSigner,
        by: (DeviceId, &DeviceSigner),
        key: IdentityKey,
        name: &str,
        now: u64,
    ) -> DeviceEntry {
        let change = DeviceChange::Add {
            device: self.next_device(),
            key,
            name: name.to_owned(),
        };
        let mut entry = self.unsigned(by.0, change, now);
        let signed = entry.signed_bytes(&self.account);
        entry.account_signature = account.sign_payload(&signed);
        entry.device_signature = by.1.sign_payload(&signed);
        entry.added_signature = Some(Signature::from_bytes([0; 64]));
        entry
    }

    /// An entry removing `device`, made by device `by`.
    pub fn remove_entry(
        &self,
        account: &DeviceSigner,
        by: (DeviceId, &DeviceSigner),
        device: DeviceId,
        now: u64,
    ) -> DeviceEntry {
        let mut entry = self.unsigned(by.0, DeviceChange::Remove { device }, now);
        let signed = entry.signed_bytes(&self.account);
        entry.account_signature = account.sign_payload(&signed);
        entry.device_signature = by.1.sign_payload(&signed);
        entry
    }

    fn unsigned(&self, by: DeviceId, change: DeviceChange, now: u64) -> DeviceEntry {
        let unsigned = Signature::from_bytes([0; 64]);
        DeviceEntry {
            seq: self.len(),
            prev_hash: self.head,
            created_at: now,
            by_device: by,
            change,
            account_signature: unsigned,
            device_signature: unsigned,
            added_signature: None,
        }
    }
}

/// Whether `name` may name a device: short, and nothing that would move or
/// hide text where it is shown (control and bidirectional-formatting
/// characters).
pub fn name_allowed(name: &str) -> bool {
    name.len() <= MAX_DEVICE_NAME_BYTES
        && !name.chars().any(|c| {
            c.is_control()
                || matches!(c, '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
        })
}

/// What a device's MLS leaf carries to show it belongs to its account (for
/// every device but device 1, whose key is the account key): the account
/// key and the log's add entry for the device. Encoded as the 32-byte
/// account key followed by the entry's encoding.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceCertificate {
    pub account_key: IdentityKey,
    pub entry: DeviceEntry,
}

impl DeviceCertificate {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = self.account_key.as_bytes().to_vec();
        out.extend_from_slice(&self.entry.encode());
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<DeviceCertificate, umbra_proto::DecodeError> {
        let (key, entry) = bytes
            .split_at_checked(32)
            .ok_or(umbra_proto::DecodeError::Invalid {
                field: "device certificate",
                reason: "shorter than a key".into(),
            })?;
        Ok(DeviceCertificate {
            account_key: IdentityKey::from_slice(key)?,
            entry: DeviceEntry::decode(entry)?,
        })
    }

    /// Whether it binds `key` to `account` under its account key (which
    /// the one checking must still compare with the key it knows for the
    /// account).
    pub fn certifies(&self, account: &AccountId, key: &IdentityKey) -> bool {
        certifies(&self.entry, account, &self.account_key, key)
    }
}

/// Whether `entry` certifies `key` as a device of `account` whose account
/// key is `account_key`: it adds exactly this key, and is signed by the
/// account key and by the added key, over bytes that name the account. A
/// device's MLS leaf carries the entry that added it, so a member can check
/// the leaf when it arrives, offline, against the account key it pinned; a
/// server, which holds no account key, cannot make one. The entry's place in
/// the log is not checked here: a removed device's entry still certifies
/// its key, and removal is what takes its leaf out of the groups.
fn certifies(
    entry: &DeviceEntry,
    account: &AccountId,
    account_key: &IdentityKey,
    key: &IdentityKey,
) -> bool {
    let DeviceChange::Add { key: added, .. } = &entry.change else {
        return false;
    };
    if added != key {
        return false;
    }
    let signed = entry.signed_bytes(account);
    verify(account_key, &signed, &entry.account_signature)
        && entry
            .added_signature
            .as_ref()
            .is_some_and(|signature| verify(key, &signed, signature))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;

    fn signer(n: u8) -> DeviceSigner {
        DeviceSigner::from_secret(&[n; 32])
    }

    fn account() -> AccountId {
        AccountId::parse("K7QD9XPM").unwrap()
    }

    /// A log with devices 1 (the account key), 2 and 3.
    fn three() -> (DeviceLog, DeviceSigner, DeviceSigner, DeviceSigner) {
        let (a, d2, d3) = (signer(1), signer(2), signer(3));
        let mut log = DeviceLog::new(account(), a.identity_key());
        log.append(log.first_entry(&a, "phone", 1), Some(5))
            .unwrap();
        log.append(
            log.add_entry(&a, (FIRST_DEVICE, &a), &d2, "laptop", 2),
            Some(5),
        )
        .unwrap();
        log.append(
            log.add_entry(&a, (DeviceId(2), &d2), &d3, "tablet", 3),
            Some(5),
        )
        .unwrap();
        (log, a, d2, d3)
    }

    #[test]
    fn an_add_entry_certifies_its_key_for_its_account_only() {
        let (log, a, d2, d3) = three();
        let add2 = log.entries()[1].clone();
        let key = d2.identity_key();
        assert!(certifies(&add2, &account(), &a.identity_key(), &key));
        // Another key, another account, another account key: no.
        assert!(!certifies(
            &add2,
            &account(),
            &a.identity_key(),
            &d3.identity_key()
        ));
        let other = AccountId::parse("K7QD9XPN").unwrap();
        assert!(!certifies(&add2, &other, &a.identity_key(), &key));
        assert!(!certifies(&add2, &account(), &d3.identity_key(), &key));
        // An entry whose account signature is not the account key's (a
        // server's own, signed with a key it holds) certifies nothing.
        let mut forged = add2.clone();
        forged.account_signature = d3.sign_payload(&forged.signed_bytes(&account()));
        assert!(!certifies(&forged, &account(), &a.identity_key(), &key));
        // Nor does one the added key did not sign.
        let mut unaccepted = add2.clone();
        unaccepted.added_signature = Some(d3.sign_payload(&add2.signed_bytes(&account())));
        assert!(!certifies(&unaccepted, &account(), &a.identity_key(), &key));
        // A remove entry certifies no key.
        let remove = log.remove_entry(&a, (FIRST_DEVICE, &a), DeviceId(2), 4);
        assert!(!certifies(&remove, &account(), &a.identity_key(), &key));
    }

    #[test]
    fn devices_are_added_and_removed_by_any_current_device() {
        let (mut log, a, d2, d3) = three();
        assert_eq!(
            log.current_devices().map(|d| d.id.0).collect::<Vec<_>>(),
            [1, 2, 3]
        );
        // Device 3 removes device 1 (the one whose key is the account key).
        log.append(
            log.remove_entry(&a, (DeviceId(3), &d3), FIRST_DEVICE, 4),
            Some(5),
        )
        .unwrap();
        assert_eq!(
            log.current_devices().map(|d| d.id.0).collect::<Vec<_>>(),
            [2, 3]
        );
        assert_eq!(log.next_device(), DeviceId(4));
        // A verifier that sees the whole log from scratch agrees.
        let again =
            DeviceLog::verify(account(), a.identity_key(), log.entries().to_vec(), None).unwrap();
        assert_eq!(again.head(), log.head());
        // So does one that replays its own verified copy.
        let replayed =
            DeviceLog::replay(account(), a.identity_key(), log.entries().to_vec()).unwrap();
        assert_eq!(replayed.head(), log.head());
        let _ = d2;
    }

    #[test]
    fn a_removed_device_changes_nothing_even_with_the_account_key() {
        let (mut log, a, d2, d3) = three();
        log.append(
            log.remove_entry(&a, (DeviceId(2), &d2), DeviceId(3), 4),
            None,
        )
        .unwrap();
        // Device 3 was removed but kept the account key: it tries to add a
        // device of its own, and to remove device 2.
        let thief = signer(9);
        let add = log.add_entry(&a, (DeviceId(3), &d3), &thief, "mine", 5);
        assert_eq!(
            log.append(add, None),
            Err(DeviceLogError::NotCurrent {
                seq: 4,
                device: DeviceId(3)
            })
        );
        let remove = log.remove_entry(&a, (DeviceId(3), &d3), DeviceId(2), 5);
        assert!(matches!(
            log.append(remove, None),
            Err(DeviceLogError::NotCurrent { .. })
        ));
        // Claiming to be device 2 without its key fails too.
        let forged = log.add_entry(&a, (DeviceId(2), &d3), &thief, "mine", 5);
        assert_eq!(
            log.append(forged, None),
            Err(DeviceLogError::DeviceSignature {
                seq: 4,
                device: DeviceId(2)
            })
        );
    }

    #[test]
    fn entries_not_signed_by_the_account_key_are_refused() {
        let (mut log, _, d2, _) = three();
        let other_account = signer(7);
        let new = signer(8);
        let entry = log.add_entry(&other_account, (DeviceId(2), &d2), &new, "x", 4);
        assert_eq!(
            log.append(entry, None),
            Err(DeviceLogError::AccountSignature { seq: 3 })
        );
    }

    #[test]
    fn an_added_device_must_hold_its_key() {
        let (mut log, a, d2, _) = three();
        let mut entry = log.add_entry(&a, (DeviceId(2), &d2), &signer(8), "x", 4);
        // Listed with someone else's key (it could not sign with it).
        if let DeviceChange::Add { key, .. } = &mut entry.change {
            *key = signer(10).identity_key();
        }
        let signed = entry.signed_bytes(&account());
        entry.account_signature = a.sign_payload(&signed);
        entry.device_signature = d2.sign_payload(&signed);
        assert!(matches!(
            log.append(entry, None),
            Err(DeviceLogError::AddedSignature { .. })
        ));
    }

    #[test]
    fn the_chain_and_positions_are_checked() {
        let (log, a, d2, _) = three();
        let entries = log.entries().to_vec();
        // Dropping, reordering or replacing an entry breaks verification.
        let mut dropped = entries.clone();
        dropped.remove(1);
        assert!(DeviceLog::verify(account(), a.identity_key(), dropped, None).is_err());
        let mut swapped = entries.clone();
        swapped.swap(1, 2);
        assert!(DeviceLog::verify(account(), a.identity_key(), swapped, None).is_err());
        // A differently made entry 2 (a fork) does not chain to entry 3.
        let mut fork =
            DeviceLog::verify(account(), a.identity_key(), entries[..2].to_vec(), None).unwrap();
        fork.append(
            fork.add_entry(&a, (DeviceId(2), &d2), &signer(11), "other", 3),
            None,
        )
        .unwrap();
        let mut forked = fork.entries().to_vec();
        forked.push(entries[2].clone());
        assert!(matches!(
            DeviceLog::verify(account(), a.identity_key(), forked, None),
            Err(DeviceLogError::Position { .. } | DeviceLogError::Chain { .. })
        ));
        // The right position with the wrong previous hash is refused too.
        let mut unchained = log.add_entry(&a, (DeviceId(2), &d2), &signer(12), "x", 4);
        unchained.prev_hash = entries[1].hash(&account());
        let signed = unchained.signed_bytes(&account());
        unchained.account_signature = a.sign_payload(&signed);
        unchained.device_signature = d2.sign_payload(&signed);
        unchained.added_signature = Some(signer(12).sign_payload(&signed));
        let mut again = log.clone();
        assert_eq!(
            again.append(unchained, None),
            Err(DeviceLogError::Chain { seq: 3 })
        );
        // Another account's log does not verify as this one's.
        let other = AccountId::parse("K7QD9XPN").unwrap();
        assert!(DeviceLog::verify(other, a.identity_key(), entries, None).is_err());
    }

    fn resign(
        mut e: DeviceEntry,
        a: &DeviceSigner,
        by: &DeviceSigner,
        added: &DeviceSigner,
    ) -> DeviceEntry {
        let signed = e.signed_bytes(&account());
        e.account_signature = a.sign_payload(&signed);
        e.device_signature = by.sign_payload(&signed);
        e.added_signature = Some(added.sign_payload(&signed));
        e
    }

    #[test]
    fn numbers_come_in_order_and_names_cannot_hide_text() {
        let (mut log, a, d2, _) = three();
        let new = signer(8);
        let mut far = log.add_entry(&a, (DeviceId(2), &d2), &new, "x", 4);
        if let DeviceChange::Add { device, .. } = &mut far.change {
            *device = DeviceId(u32::MAX);
        }
        assert_eq!(
            log.append(resign(far, &a, &d2, &new), None),
            Err(DeviceLogError::Number {
                seq: 3,
                device: DeviceId(u32::MAX),
                expected: DeviceId(4)
            })
        );
        for name in ["a\nb", "\u{202e}evil", "x".repeat(65).as_str()] {
            let entry = log.add_entry(&a, (DeviceId(2), &d2), &new, name, 4);
            assert_eq!(
                log.append(entry, None),
                Err(DeviceLogError::Name { seq: 3 }),
                "{name:?}"
            );
        }
        log.append(
            log.add_entry(&a, (DeviceId(2), &d2), &new, "Ünïcode ok", 4),
            None,
        )
        .unwrap();
    }

    #[test]
    fn the_first_entry_is_device_one_with_the_account_key() {
        let a = signer(1);
        let log = DeviceLog::new(account(), a.identity_key());
        // A first entry for some other key, signed by the account key.
        let stranger = signer(5);
        let mut entry = log.first_entry(&stranger, "x", 1);
        let signed = entry.signed_bytes(&account());
        entry.account_signature = a.sign_payload(&signed);
        assert_eq!(
            DeviceLog::verify(account(), a.identity_key(), [entry], None).unwrap_err(),
            DeviceLogError::First { seq: 0 }
        );
    }

    #[test]
    fn the_cap_counts_current_devices_and_the_last_one_stays() {
        let (mut log, a, d2, d3) = three();
        let d4 = signer(4);
        assert_eq!(
            log.append(log.add_entry(&a, (DeviceId(2), &d2), &d4, "x", 4), Some(3)),
            Err(DeviceLogError::TooManyDevices { seq: 3, max: 3 })
        );
        // Removing one makes room: the cap is on devices, not on a lifetime count.
        log.append(
            log.remove_entry(&a, (DeviceId(2), &d2), DeviceId(3), 4),
            Some(3),
        )
        .unwrap();
        log.append(log.add_entry(&a, (DeviceId(2), &d2), &d4, "x", 5), Some(3))
            .unwrap();
        assert_eq!(log.current(DeviceId(4)).unwrap().key, d4.identity_key());
        // Numbers and keys are never reused.
        let again = log.add_entry(&a, (DeviceId(2), &d2), &d3, "back", 6);
        assert_eq!(
            log.append(again, None),
            Err(DeviceLogError::KeyReused { seq: 5 })
        );
        log.append(
            log.remove_entry(&a, (DeviceId(2), &d2), DeviceId(4), 6),
            None,
        )
        .unwrap();
        log.append(
            log.remove_entry(&a, (DeviceId(2), &d2), FIRST_DEVICE, 7),
            None,
        )
        .unwrap();
        assert_eq!(
            log.append(
                log.remove_entry(&a, (DeviceId(2), &d2), DeviceId(2), 8),
                None
            ),
            Err(DeviceLogError::LastDevice { seq: 7 })
        );
    }
}
