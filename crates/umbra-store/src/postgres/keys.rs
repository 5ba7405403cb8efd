//! KeyPackages and anonymous sending's tokens in PostgreSQL.

use async_trait::async_trait;
use deadpool_postgres::Transaction;
use umbra_proto::{AccountId, DeviceId};

use super::{Failure, PgStore, big, lock_key, transaction, unsigned};
use crate::{KeyPackageStock, KeyPackages, Result, StoreError, Timestamp, TokenKey, Tokens};

type Tx<'a> = Transaction<'a>;

async fn stock(
    tx: &Tx<'_>,
    account: &AccountId,
    device: DeviceId,
    suite: u16,
) -> std::result::Result<KeyPackageStock, Failure> {
    let params: [&(dyn tokio_postgres::types::ToSql + Sync); 3] =
        [&account.as_str(), &i64::from(device.0), &i32::from(suite)];
    let one_time: i64 = tx
        .query_one(
            "SELECT COUNT(*) FROM key_packages
             WHERE account_id = $1 AND device = $2 AND suite = $3",
            &params,
        )
        .await?
        .get(0);
    let has_last_resort = tx
        .query_opt(
            "SELECT 1 FROM last_resort_key_packages
             WHERE account_id = $1 AND device = $2 AND suite = $3",
            &params,
        )
        .await?
        .is_some();
    Ok(KeyPackageStock {
        one_time: u32::try_from(one_time).unwrap_or(u32::MAX),
        has_last_resort,
    })
}

#[async_trait]
impl KeyPackages for PgStore {
    async fn add_key_packages(
        &self,
        account: &AccountId,
        device: DeviceId,
        suite: u16,
        one_time: Vec<Vec<u8>>,
        last_resort: Option<Vec<u8>>,
    ) -> Result<KeyPackageStock> {
        transaction!(self, tx => {
            // In the order given: they are handed out oldest first.
            tx.execute(
                "INSERT INTO key_packages (account_id, device, suite, key_package)
                 SELECT $1, $2, $3, p FROM unnest($4::bytea[]) WITH ORDINALITY AS t(p, n)
                 ORDER BY n",
                &[&account.as_str(), &i64::from(device.0), &i32::from(suite), &one_time],
            )
            .await?;
            if let Some(key_package) = &last_resort {
                tx.execute(
                    "INSERT INTO last_resort_key_packages (account_id, device, suite, key_package)
                     VALUES ($1, $2, $3, $4)
                     ON CONFLICT (account_id, device, suite)
                     DO UPDATE SET key_package = excluded.key_package",
                    &[&account.as_str(), &i64::from(device.0), &i32::from(suite), key_package],
                )
                .await?;
            }
            stock(&tx, account, device, suite).await
        })
    }

    async fn take_key_package(
        &self,
        account: &AccountId,
        device: DeviceId,
        suite: u16,
    ) -> Result<Option<(Vec<u8>, bool)>> {
        transaction!(self, tx => {
            let params: [&(dyn tokio_postgres::types::ToSql + Sync); 3] =
                [&account.as_str(), &i64::from(device.0), &i32::from(suite)];
            // SKIP LOCKED: two nodes handing out this device's packages at
            // once take different ones; each is deleted as it goes, so
            // none is handed out twice.
            let one_time = tx
                .query_opt(
                    "DELETE FROM key_packages WHERE id = (
                         SELECT id FROM key_packages
                         WHERE account_id = $1 AND device = $2 AND suite = $3
                         ORDER BY id LIMIT 1 FOR UPDATE SKIP LOCKED
                     ) RETURNING key_package",
                    &params,
                )
                .await?;
            if let Some(row) = one_time {
                return Ok(Some((row.get(0), false)));
            }
            let last_resort = tx
                .query_opt(
                    "SELECT key_package FROM last_resort_key_packages
                     WHERE account_id = $1 AND device = $2 AND suite = $3",
                    &params,
                )
                .await?;
            Ok::<_, Failure>(last_resort.map(|row| (row.get(0), true)))
        })
    }

    async fn key_package_stock(
        &self,
        account: &AccountId,
        device: DeviceId,
        suite: u16,
    ) -> Result<KeyPackageStock> {
        transaction!(read self, tx => stock(&tx, account, device, suite).await)
    }

    /// One transaction for every suite: a login asks for them all.
    async fn key_package_stocks(
        &self,
        account: &AccountId,
        device: DeviceId,
        suites: &[u16],
    ) -> Result<Vec<KeyPackageStock>> {
        transaction!(read self, tx => {
            let mut stocks = Vec::with_capacity(suites.len());
            for &suite in suites {
                stocks.push(stock(&tx, account, device, suite).await?);
            }
            Ok::<_, Failure>(stocks)
        })
    }

    async fn withdraw_key_packages(&self, account: &AccountId, device: DeviceId) -> Result<u64> {
        transaction!(self, tx => {
            let mut withdrawn = 0;
            for sql in [
                "DELETE FROM key_packages WHERE account_id = $1 AND device = $2",
                "DELETE FROM last_resort_key_packages WHERE account_id = $1 AND device = $2",
            ] {
                withdrawn += tx
                    .execute(sql, &[&account.as_str(), &i64::from(device.0)])
                    .await?;
            }
            Ok::<_, Failure>(withdrawn)
        })
    }
}

#[async_trait]
impl Tokens for PgStore {
    async fn token_keys(&self) -> Result<Vec<TokenKey>> {
        transaction!(read self, tx => {
            let rows = tx
                .query(
                    "SELECT key_id, secret, created_at FROM token_keys
                     ORDER BY created_at DESC, key_id",
                    &[],
                )
                .await?;
            let mut keys = Vec::with_capacity(rows.len());
            for row in rows {
                let id: Vec<u8> = row.get(0);
                keys.push(TokenKey {
                    id: id
                        .try_into()
                        .map_err(|_| StoreError::Corrupt("a token key's ID".into()))?,
                    secret: row.get(1),
                    created_at: unsigned(row.get(2))?,
                });
            }
            Ok::<_, Failure>(keys)
        })
    }

    async fn add_token_key(&self, key: &TokenKey, fresh_since: Timestamp) -> Result<bool> {
        transaction!(self, tx => {
            // One node at a time decides whether a fresh key exists.
            tx.execute("SELECT pg_advisory_xact_lock($1)", &[&lock_key(&[b"token keys"])])
                .await?;
            let inserted = tx
                .execute(
                    "INSERT INTO token_keys (key_id, secret, created_at)
                     SELECT $1, $2, $3
                     WHERE NOT EXISTS (SELECT 1 FROM token_keys WHERE created_at > $4)
                     ON CONFLICT DO NOTHING",
                    &[&&key.id[..], &key.secret, &big(key.created_at), &big(fresh_since)],
                )
                .await?;
            Ok::<_, Failure>(inserted > 0)
        })
    }

    async fn retire_token_keys(&self, cutoff: Timestamp) -> Result<u64> {
        transaction!(self, tx => {
            // Their spent tokens go with them (ON DELETE CASCADE).
            let removed = tx
                .execute("DELETE FROM token_keys WHERE created_at <= $1", &[&big(cutoff)])
                .await?;
            Ok::<_, Failure>(removed)
        })
    }

    async fn grant_tokens(
        &self,
        account: &AccountId,
        day: u64,
        wanted: u32,
        per_day: u32,
    ) -> Result<u32> {
        transaction!(self, tx => {
            tx.execute(
                "INSERT INTO token_allowance (account_id, day, issued) VALUES ($1, $2, 0)
                 ON CONFLICT DO NOTHING",
                &[&account.as_str(), &big(day)],
            )
            .await?;
            let issued: i64 = tx
                .query_one(
                    "SELECT issued FROM token_allowance WHERE account_id = $1 AND day = $2
                     FOR UPDATE",
                    &[&account.as_str(), &big(day)],
                )
                .await?
                .get(0);
            let left = i64::from(per_day).saturating_sub(issued).max(0);
            let granted = i64::from(wanted).min(left);
            if granted > 0 {
                tx.execute(
                    "UPDATE token_allowance SET issued = issued + $3
                     WHERE account_id = $1 AND day = $2",
                    &[&account.as_str(), &big(day), &granted],
                )
                .await?;
            }
            Ok::<_, Failure>(u32::try_from(granted).unwrap_or(0))
        })
    }

    async fn spend_token(&self, key_id: &[u8; 32], nonce: &[u8; 32]) -> Result<bool> {
        transaction!(self, tx => {
            let inserted = tx
                .execute(
                    "INSERT INTO spent_tokens (key_id, nonce)
                     SELECT $1, $2 WHERE EXISTS (SELECT 1 FROM token_keys WHERE key_id = $1)
                     ON CONFLICT DO NOTHING",
                    &[&&key_id[..], &&nonce[..]],
                )
                .await?;
            Ok::<_, Failure>(inserted > 0)
        })
    }
}
