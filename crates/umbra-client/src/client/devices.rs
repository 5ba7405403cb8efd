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
use umbra_proto::{AccountId, DeviceEntry, IdentityKey, Reply, Request};

use crate::error::{ClientError, Result};
use crate::types::Device;

use super::{Client, pinned_key};

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
            let first = log.first_entry(&self.inner.signer, "", self.now());
            self.request(Request::AppendDeviceEntry {
                entry: first.clone(),
            })
            .await?;
            log.append(first.clone(), None)
                .map_err(|error| self.log_error(&account, error))?;
            self.keep_device_entries(&account, 0, &[first])?;
        }
        Ok(self.listed(&log))
    }

    /// A contact's devices, from their device log, verified against the
    /// key pinned for them (the one their safety number stands for).
    pub async fn contact_devices(&self, account: &AccountId) -> Result<Vec<Device>> {
        let key = match pinned_key(&self.db(), account)? {
            Some(key) => IdentityKey::from_slice(&key)?,
            None => return Err(ClientError::NotAccepted(account.clone())),
        };
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
    /// the server and verified again.
    async fn verified_device_log(
        &self,
        account: &AccountId,
        key: IdentityKey,
    ) -> Result<DeviceLog> {
        let kept = self.kept_device_entries(account)?;
        let mut log = DeviceLog::replay(account.clone(), key, kept)
            .map_err(|e| ClientError::Store(format!("kept device log of {account}: {e}")))?;
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
            if entries.is_empty() {
                break;
            }
            from += entries.len() as u64;
            fresh.extend(entries);
        }
        let mut fresh = fresh.into_iter();
        if pinned > 0 {
            let last = log.entries().last().map(|e| e.hash(account));
            match fresh.next() {
                None => {
                    return Err(self.log_error(account, DeviceLogError::RolledBack { pinned }));
                }
                Some(entry) if Some(entry.hash(account)) != last || entry.seq != pinned - 1 => {
                    return Err(self.log_error(account, DeviceLogError::Forked { seq: pinned - 1 }));
                }
                Some(_) => {}
            }
        }
        let fresh: Vec<DeviceEntry> = fresh.collect();
        for entry in &fresh {
            log.append(entry.clone(), None)
                .map_err(|error| self.log_error(account, error))?;
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
                "INSERT INTO device_log (account_id, seq, entry) VALUES (?1, ?2, ?3)",
                params![account.as_str(), from + n as u64, entry.encode()],
            )?;
        }
        tx.commit()?;
        Ok(())
    }

    fn listed(&self, log: &DeviceLog) -> Vec<Device> {
        let me = self.identity_key();
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
                this_device: mine && d.key == me,
            })
            .collect()
    }
}
