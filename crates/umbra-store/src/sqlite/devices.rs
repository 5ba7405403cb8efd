//! Device logs in SQLite: one row per entry, keyed by account and position;
//! and each account's current devices, kept as entries are appended.

use std::sync::Arc;

use async_trait::async_trait;
use rusqlite::{Connection, params};
use umbra_proto::{AccountId, DeviceAddr, DeviceChange, DeviceEntry, DeviceId, IdentityKey};

use super::{SqliteStore, backend, lock};
use crate::{DeviceLogs, Result, StoreError, Timestamp};

/// `account`'s current devices, in order.
pub(super) fn current(connection: &Connection, account: &AccountId) -> Result<Vec<DeviceAddr>> {
    Ok(keys(connection, account)?
        .into_iter()
        .map(|(device, _)| DeviceAddr::new(account.clone(), device))
        .collect())
}

fn keys(connection: &Connection, account: &AccountId) -> Result<Vec<(DeviceId, IdentityKey)>> {
    let mut statement = connection
        .prepare_cached(
            "SELECT device, device_key FROM devices WHERE account_id = ?1 ORDER BY device",
        )
        .map_err(backend)?;
    let rows = statement
        .query_map([account.as_str()], |row| {
            Ok((row.get::<_, u32>(0)?, row.get::<_, Vec<u8>>(1)?))
        })
        .map_err(backend)?;
    rows.map(|row| {
        let (device, key) = row.map_err(backend)?;
        let key = IdentityKey::from_slice(&key)
            .map_err(|_| StoreError::Corrupt(format!("device {device}'s key")))?;
        Ok((DeviceId(device), key))
    })
    .collect()
}

/// Whether `device` is one of its account's current devices.
pub(super) fn is_current(connection: &Connection, device: &DeviceAddr) -> Result<bool> {
    connection
        .prepare_cached("SELECT 1 FROM devices WHERE account_id = ?1 AND device = ?2")
        .and_then(|mut s| s.exists(params![device.account.as_str(), device.device.0]))
        .map_err(backend)
}

/// Records `device` of `account` as current.
pub(super) fn add(
    connection: &Connection,
    account: &AccountId,
    device: DeviceId,
    key: &IdentityKey,
) -> Result<()> {
    connection
        .prepare_cached(
            "INSERT INTO devices (account_id, device, device_key) VALUES (?1, ?2, ?3)
             ON CONFLICT DO UPDATE SET device_key = excluded.device_key",
        )
        .and_then(|mut s| s.execute(params![account.as_str(), device.0, &key.as_bytes()[..]]))
        .map(drop)
        .map_err(backend)
}

/// Applies what a stored log entry changes to the account's devices: the
/// device it removes is no longer current and (with `delete_mail`) its
/// mailbox is deleted. Returns the device removed, if any.
fn apply(
    connection: &Connection,
    account: &AccountId,
    entry: &[u8],
    delete_mail: bool,
) -> Result<Option<DeviceId>> {
    let entry = DeviceEntry::decode(entry)
        .map_err(|e| StoreError::Corrupt(format!("a device log entry: {e}")))?;
    match entry.change {
        DeviceChange::Add { device, key, .. } => {
            add(connection, account, device, &key)?;
            Ok(None)
        }
        DeviceChange::Remove { device } => {
            let mut statements = vec!["DELETE FROM devices WHERE account_id = ?1 AND device = ?2"];
            if delete_mail {
                statements.push("DELETE FROM mailbox WHERE recipient = ?1 AND device = ?2");
            }
            for sql in statements {
                connection
                    .execute(sql, params![account.as_str(), device.0])
                    .map_err(backend)?;
            }
            Ok(Some(device))
        }
    }
}

/// Migration 11: the devices that logs written before it added and
/// removed (the migration itself recorded device 1 of every live line).
/// The mail the account's devices shared stays: it was labelled device
/// 1's, and an account whose device 1 was removed has it moved to its
/// lowest current device, so nothing stored is lost.
pub(super) fn fill_in_devices(connection: &Connection) -> Result<()> {
    let entries: Vec<(String, Vec<u8>)> = connection
        .prepare(
            "SELECT l.account_id, l.entry FROM device_log l
             JOIN accounts a ON a.account_id = l.account_id
             WHERE a.status != 'revoked' ORDER BY l.account_id, l.seq",
        )
        .and_then(|mut s| {
            s.query_map([], |row| Ok((row.get(0)?, row.get(1)?)))?
                .collect::<rusqlite::Result<_>>()
        })
        .map_err(backend)?;
    for (account, entry) in entries {
        let account = super::account_id(account)?;
        apply(connection, &account, &entry, false)?;
    }
    connection
        .execute(
            "UPDATE mailbox SET device = (SELECT MIN(d.device) FROM devices d
                                          WHERE d.account_id = mailbox.recipient)
             WHERE device = 1
               AND NOT EXISTS (SELECT 1 FROM devices d
                               WHERE d.account_id = mailbox.recipient AND d.device = 1)
               AND EXISTS (SELECT 1 FROM devices d WHERE d.account_id = mailbox.recipient)",
            [],
        )
        .map_err(backend)?;
    Ok(())
}

#[async_trait]
impl DeviceLogs for SqliteStore {
    async fn device_log(&self, account: &AccountId, from: u64, limit: u32) -> Result<Vec<Vec<u8>>> {
        let account = account.clone();
        self.run(move |connection| {
            connection
                .prepare_cached(
                    "SELECT entry FROM device_log WHERE account_id = ?1 AND seq >= ?2
                     ORDER BY seq LIMIT ?3",
                )
                .and_then(|mut s| {
                    s.query_map(params![account.as_str(), from, limit], |row| row.get(0))?
                        .collect::<rusqlite::Result<_>>()
                })
                .map_err(backend)
        })
        .await
    }

    async fn append_device_entry(
        &self,
        account: &AccountId,
        seq: u64,
        entry: &[u8],
        now: Timestamp,
        expires_at: Timestamp,
    ) -> Result<Option<Vec<DeviceAddr>>> {
        let (account, entry) = (account.clone(), entry.to_vec());
        let staging = Arc::clone(&self.staging);
        let removing = account.clone();
        self.write_then(move |tx| {
            let next: u64 = tx
                .query_row(
                    "SELECT COALESCE(MAX(seq) + 1, 0) FROM device_log WHERE account_id = ?1",
                    [account.as_str()],
                    |row| row.get(0),
                )
                .map_err(backend)?;
            if next != seq {
                return Ok((None, None));
            }
            tx.execute(
                "INSERT INTO device_log (account_id, seq, entry, appended_at) VALUES (?1, ?2, ?3, ?4)",
                params![account.as_str(), seq, entry, now],
            )
            .map_err(backend)?;
            let removed = apply(tx, &account, &entry, true)?;
            // Which leaves get copies follows the current devices.
            tx.checked().members.clear();
            let mut told = Vec::new();
            if let Some(device) = removed {
                let gone = DeviceAddr::new(account.clone(), device);
                // Its mailbox is gone.
                tx.mailboxes.borrow_mut().forget(&gone);
                // The members of its groups commit its leaf's removal on
                // the signed entry.
                let groups: Vec<Vec<u8>> = tx
                    .prepare_cached(
                        "SELECT group_id FROM group_members WHERE account_id = ?1 AND device = ?2",
                    )
                    .and_then(|mut s| {
                        s.query_map(params![account.as_str(), device.0], |row| row.get(0))?
                            .collect::<rusqlite::Result<_>>()
                    })
                    .map_err(backend)?;
                for group in groups {
                    let group = umbra_proto::GroupId::new(group)
                        .map_err(|e| StoreError::Corrupt(e.to_string()))?;
                    // It knows the epoch's delivery key: nobody sends
                    // anonymously with it until the members commit the
                    // device's removal (stating a new one).
                    tx.execute(
                        "UPDATE groups SET delivery_key = NULL WHERE group_id = ?1",
                        [group.as_bytes()],
                    )
                    .map_err(backend)?;
                    for member in super::routable(tx, &group)? {
                        super::enqueue(
                            tx,
                            &member,
                            Some(&account),
                            umbra_proto::DeliveryKind::DeviceRemoved,
                            Some(&group),
                            &entry,
                            now,
                            expires_at,
                        )?;
                        told.push(member);
                    }
                }
                told.sort();
                told.dedup();
            }
            Ok((Some(told), removed))
        }, move |(appended, removed)| {
            if removed.is_some() {
                lock(&staging).drop_recipient(&removing, removed);
            }
            appended
        })
        .await
    }

    async fn devices(&self, account: &AccountId) -> Result<Vec<(DeviceId, IdentityKey)>> {
        let account = account.clone();
        self.run(move |connection| keys(connection, &account)).await
    }

    async fn device_entries_since(&self, account: &AccountId, since: Timestamp) -> Result<u64> {
        let account = account.clone();
        self.run(move |connection| {
            connection
                .query_row(
                    "SELECT COUNT(*) FROM device_log WHERE account_id = ?1 AND appended_at >= ?2",
                    params![account.as_str(), since],
                    |row| row.get(0),
                )
                .map_err(backend)
        })
        .await
    }
}
