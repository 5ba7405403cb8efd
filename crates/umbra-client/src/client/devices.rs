//! Device lists: this account's and its contacts', as their signed device
//! logs say, verified on this device.
//!
//! The server keeps each account's log; this device trusts none of it until
//! it has checked every entry against the account key it knows (its own, or
//! the one pinned for the contact) and the head it verified before. What it
//! verified is kept in its store, so a later fetch only needs what came
//! after, and a server that drops, replaces or reorders an entry it already
//! showed is caught.

use rusqlite::params;
use umbra_mls::{DeviceLog, DeviceLogError};
use umbra_proto::{AccountId, DeviceEntry, DeviceId, ErrorCode, IdentityKey, Reply, Request};

use umbra_proto::devices::DEVICE_LOG_PAGE;

use crate::error::{ClientError, Result};
use crate::types::Device;

use super::{Client, pinned_key};

/// Longest device log a device accepts (at the server's default budget of
/// 20 changes a day, years of changes): a server that sends more is
/// refused instead of filling memory.
const MAX_DEVICE_LOG_ENTRIES: u64 = 20_000;

impl Client {
    /// This account's devices, from its device log, verified. A device
    /// whose account has no log yet (activated before there were logs, or
    /// whose first entry was lost) writes the first entry: itself, as
    /// device 1.
    pub async fn devices(&self) -> Result<Vec<Device>> {
        let account = self.inner.account.clone();
        let mut log = self
            .verified_device_log(&account, self.identity_key())
            .await?;
        if log.is_empty() {
            if self.inner.device != DeviceId::FIRST {
                // A linked device was added by an entry: its log cannot be
                // empty unless the server dropped it.
                return Err(self.log_error(&account, DeviceLogError::RolledBack { pinned: 0 }));
            }
            let first = log.first_entry(&self.inner.signer, "", self.now());
            match self
                .request(Request::AppendDeviceEntry {
                    entry: first.clone(),
                })
                .await
            {
                Ok(_) => {
                    log.append(first.clone(), None)
                        .map_err(|error| self.log_error(&account, error))?;
                    self.keep_device_entries(&account, 0, &[first])?;
                }
                // Another look of this device (the one each connection
                // starts) wrote it first: read it back, verified.
                Err(error) if error.server_code() == Some(ErrorCode::StaleDeviceLog) => {
                    log = self
                        .verified_device_log(&account, self.identity_key())
                        .await?;
                }
                Err(error) => return Err(error),
            }
        }
        Ok(self.listed(&log))
    }

    /// Removes `device` from this account, at once: the account's signed
    /// log says so, the server withdraws its KeyPackages and mailbox and
    /// ends its sessions, and the members of its conversations (this
    /// device first) commit its leaves out, so it reads nothing sent
    /// afterwards. Any device may remove any other; not itself (wipe it,
    /// or remove it from another device).
    pub async fn remove_device(&self, device: DeviceId) -> Result<()> {
        if device == self.inner.device {
            return Err(ClientError::Invalid(
                "a device does not remove itself: remove it from another device of the account, \
                 or wipe it"
                    .into(),
            ));
        }
        let account = self.inner.account.clone();
        let log = self
            .verified_device_log(&account, self.identity_key())
            .await?;
        if log.current(device).is_none() {
            return Err(ClientError::Invalid(format!(
                "device {device} is not a current device of this account (see `umbra devices list`)"
            )));
        }
        let entry = log.remove_entry(
            self.account_signer(),
            (self.inner.device, &self.inner.signer),
            device,
            self.now(),
        );
        self.request(Request::AppendDeviceEntry { entry }).await?;
        self.verified_device_log(&account, self.identity_key())
            .await?;
        let removed = [umbra_proto::DeviceAddr::new(account, device)];
        for group_id in self.active_groups()? {
            // Another member may commit it first: then there is nothing
            // left to remove here.
            if let Err(error) = self.remove_devices_from_group(&group_id, &removed).await {
                tracing::warn!(%error, "committing a removed device out of a conversation");
            }
        }
        Ok(())
    }

    /// The entry by which this device removes itself from its account, if
    /// the account's log as this device last verified it (no network)
    /// lists other current devices; `None` for an account's only device.
    pub(crate) fn farewell_entry(&self) -> Option<DeviceEntry> {
        let account = self.inner.account.clone();
        let kept = self.kept_device_entries(&account).ok()?;
        let log = DeviceLog::replay(account, self.identity_key(), kept).ok()?;
        let others = log
            .current_devices()
            .any(|device| device.id != self.inner.device);
        others.then(|| {
            log.remove_entry(
                self.account_signer(),
                (self.inner.device, &self.inner.signer),
                self.inner.device,
                self.now(),
            )
        })
    }

    /// A contact's devices, from their device log, verified against the
    /// key pinned for them (the one their safety number stands for).
    pub async fn contact_devices(&self, account: &AccountId) -> Result<Vec<Device>> {
        let key = match pinned_key(&self.db(), account)? {
            Some(key) => IdentityKey::from_slice(&key)?,
            None => return Err(ClientError::NotAccepted(account.clone())),
        };
        // Not under a key the user has not confirmed (their safety number
        // changed and was not compared or accepted yet).
        let unconfirmed: bool = self.db().query_row(
            "SELECT key_unconfirmed FROM contacts WHERE account_id = ?1",
            [account.as_str()],
            |row| row.get(0),
        )?;
        if unconfirmed {
            return Err(ClientError::KeyUnconfirmed(account.clone()));
        }
        let log = self.verified_device_log(account, key).await?;
        Ok(self.listed(&log))
    }

    /// Writes this device's first log entry if its account has none; run
    /// once per device, on its first connection (later, [`Client::devices`]
    /// keeps the log current).
    pub(super) async fn ensure_device_log(&self) -> Result<()> {
        let known: u64 = self.db().query_row(
            "SELECT COUNT(*) FROM device_log WHERE account_id = ?1",
            [self.inner.account.as_str()],
            |row| row.get(0),
        )?;
        if known == 0 {
            self.devices().await?;
        }
        Ok(())
    }

    /// The log this device verified for `account`, brought up to date from
    /// the server and verified again, page by page as it arrives.
    pub(super) async fn verified_device_log(
        &self,
        account: &AccountId,
        key: IdentityKey,
    ) -> Result<DeviceLog> {
        let kept = self.kept_device_entries(account)?;
        let mut log = match DeviceLog::replay(account.clone(), key, kept) {
            Ok(log) => log,
            // What was kept was verified under another key: the contact's
            // key changed since, and the user confirmed the new one (see
            // `contact_devices`). Their list starts again under it.
            Err(DeviceLogError::First { .. }) => {
                self.db().execute(
                    "DELETE FROM device_log WHERE account_id = ?1",
                    [account.as_str()],
                )?;
                DeviceLog::new(account.clone(), key)
            }
            Err(e) => {
                return Err(ClientError::Store(format!(
                    "kept device log of {account}: {e}"
                )));
            }
        };
        // Ask from the last entry already verified: the server must still
        // show it, unchanged, before anything new counts.
        let pinned = log.len();
        let mut from = pinned.saturating_sub(1);
        let mut fresh = Vec::new();
        loop {
            let Reply::DeviceLog { entries } = self
                .request(Request::FetchDeviceLog {
                    account_id: account.clone(),
                    from,
                })
                .await?
            else {
                return Err(ClientError::Invalid(
                    "unexpected reply to FetchDeviceLog".into(),
                ));
            };
            let short = entries.len() < DEVICE_LOG_PAGE;
            let mut page = entries.into_iter();
            if from + 1 == pinned {
                let last = log.entries().last().map(|e| e.hash(account));
                match page.next() {
                    None => {
                        return Err(self.log_error(account, DeviceLogError::RolledBack { pinned }));
                    }
                    Some(entry) if Some(entry.hash(account)) != last || entry.seq != from => {
                        return Err(self.log_error(account, DeviceLogError::Forked { seq: from }));
                    }
                    Some(_) => from += 1,
                }
            }
            for entry in page {
                if log.len() >= MAX_DEVICE_LOG_ENTRIES {
                    return Err(self.log_error(
                        account,
                        DeviceLogError::Malformed {
                            seq: log.len(),
                            reason: format!(
                                "longer than the {MAX_DEVICE_LOG_ENTRIES} entries a device accepts"
                            ),
                        },
                    ));
                }
                log.append(entry.clone(), None)
                    .map_err(|error| self.log_error(account, error))?;
                fresh.push(entry);
                from += 1;
            }
            if short {
                break;
            }
        }
        self.keep_device_entries(account, pinned, &fresh)?;
        Ok(log)
    }

    fn log_error(&self, account: &AccountId, error: DeviceLogError) -> ClientError {
        ClientError::DeviceLog {
            account: account.clone(),
            error,
        }
    }

    fn kept_device_entries(&self, account: &AccountId) -> Result<Vec<DeviceEntry>> {
        let db = self.db();
        let mut statement =
            db.prepare("SELECT entry FROM device_log WHERE account_id = ?1 ORDER BY seq")?;
        let rows = statement
            .query_map([account.as_str()], |row| row.get::<_, Vec<u8>>(0))?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        rows.iter()
            .map(|bytes| Ok(DeviceEntry::decode(bytes)?))
            .collect()
    }

    fn keep_device_entries(
        &self,
        account: &AccountId,
        from: u64,
        entries: &[DeviceEntry],
    ) -> Result<()> {
        let mut db = self.db();
        let tx = db.transaction()?;
        for (n, entry) in entries.iter().enumerate() {
            tx.execute(
                // Another look at the same log may have kept these entries
                // first: they are the same verified entries.
                "INSERT OR IGNORE INTO device_log (account_id, seq, entry) VALUES (?1, ?2, ?3)",
                params![account.as_str(), from + n as u64, entry.encode()],
            )?;
        }
        tx.commit()?;
        Ok(())
    }

    fn listed(&self, log: &DeviceLog) -> Vec<Device> {
        let me = self.inner.device;
        let mine = log.account() == &self.inner.account;
        log.all_devices()
            .map(|d| Device {
                id: d.id,
                key: hex::encode(d.key.as_bytes()),
                name: d.name.clone(),
                added_at: d.added_at,
                added_by: d.added_by,
                removed_at: d.removed.map(|(at, _)| at),
                removed_by: d.removed.map(|(_, by)| by),
                this_device: mine && d.id == me,
            })
            .collect()
    }
}
