//! Device logs in SQLite: one row per entry, keyed by account and position.

use async_trait::async_trait;
use rusqlite::params;
use umbra_proto::AccountId;

use super::{SqliteStore, backend};
use crate::{DeviceLogs, Result, Timestamp};

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
    ) -> Result<bool> {
        let (account, entry) = (account.clone(), entry.to_vec());
        self.write(move |tx| {
            let next: u64 = tx
                .query_row(
                    "SELECT COALESCE(MAX(seq) + 1, 0) FROM device_log WHERE account_id = ?1",
                    [account.as_str()],
                    |row| row.get(0),
                )
                .map_err(backend)?;
            if next != seq {
                return Ok(false);
            }
            tx.execute(
                "INSERT INTO device_log (account_id, seq, entry, appended_at) VALUES (?1, ?2, ?3, ?4)",
                params![account.as_str(), seq, entry, now],
            )
            .map_err(backend)?;
            Ok(true)
        })
        .await
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
