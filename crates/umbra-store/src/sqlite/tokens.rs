//! Anonymous sending's tokens in SQLite: the signing keys, each line's
//! allowance for the day, and the tokens spent under each key.

use async_trait::async_trait;
use rusqlite::params;
use umbra_proto::AccountId;

use super::{SqliteStore, backend};
use crate::{Result, StoreError, Timestamp, TokenKey, Tokens};

#[async_trait]
impl Tokens for SqliteStore {
    async fn token_keys(&self) -> Result<Vec<TokenKey>> {
        self.run(|connection| {
            let mut statement = connection
                .prepare_cached(
                    "SELECT key_id, secret, created_at FROM token_keys
                     ORDER BY created_at DESC, key_id",
                )
                .map_err(backend)?;
            let rows = statement
                .query_map([], |row| {
                    Ok((
                        row.get::<_, Vec<u8>>(0)?,
                        row.get::<_, Vec<u8>>(1)?,
                        row.get::<_, u64>(2)?,
                    ))
                })
                .map_err(backend)?;
            rows.map(|row| {
                let (id, secret, created_at) = row.map_err(backend)?;
                let id = id
                    .try_into()
                    .map_err(|_| StoreError::Corrupt("a token key's ID".into()))?;
                Ok(TokenKey {
                    id,
                    secret,
                    created_at,
                })
            })
            .collect()
        })
        .await
    }

    async fn add_token_key(&self, key: &TokenKey, fresh_since: Timestamp) -> Result<bool> {
        let key = key.clone();
        self.write(move |tx| {
            let inserted = tx
                .execute(
                    "INSERT INTO token_keys (key_id, secret, created_at)
                     SELECT ?1, ?2, ?3
                     WHERE NOT EXISTS (SELECT 1 FROM token_keys WHERE created_at > ?4)
                     ON CONFLICT DO NOTHING",
                    params![&key.id[..], key.secret, key.created_at, fresh_since],
                )
                .map_err(backend)?;
            Ok(inserted > 0)
        })
        .await
    }

    async fn retire_token_keys(&self, cutoff: Timestamp) -> Result<u64> {
        self.write(move |tx| {
            tx.execute(
                "DELETE FROM spent_tokens WHERE key_id IN
                 (SELECT key_id FROM token_keys WHERE created_at <= ?1)",
                [cutoff],
            )
            .map_err(backend)?;
            let removed = tx
                .execute("DELETE FROM token_keys WHERE created_at <= ?1", [cutoff])
                .map_err(backend)?;
            Ok(removed as u64)
        })
        .await
    }

    async fn grant_tokens(
        &self,
        account: &AccountId,
        day: u64,
        wanted: u32,
        per_day: u32,
    ) -> Result<u32> {
        let account = account.clone();
        self.write(move |tx| {
            let issued: u32 = tx
                .query_row(
                    "SELECT issued FROM token_allowance WHERE account_id = ?1 AND day = ?2",
                    params![account.as_str(), day],
                    |row| row.get(0),
                )
                .or_else(|e| match e {
                    rusqlite::Error::QueryReturnedNoRows => Ok(0),
                    e => Err(e),
                })
                .map_err(backend)?;
            let granted = wanted.min(per_day.saturating_sub(issued));
            if granted > 0 {
                tx.execute(
                    "INSERT INTO token_allowance (account_id, day, issued) VALUES (?1, ?2, ?3)
                     ON CONFLICT (account_id, day) DO UPDATE SET issued = issued + ?3",
                    params![account.as_str(), day, granted],
                )
                .map_err(backend)?;
            }
            Ok(granted)
        })
        .await
    }

    async fn spend_token(&self, key_id: &[u8; 32], nonce: &[u8; 32]) -> Result<bool> {
        let (key_id, nonce) = (*key_id, *nonce);
        self.write(move |tx| {
            let inserted = tx
                .execute(
                    "INSERT INTO spent_tokens (key_id, nonce)
                     SELECT ?1, ?2 WHERE EXISTS (SELECT 1 FROM token_keys WHERE key_id = ?1)
                     ON CONFLICT DO NOTHING",
                    params![&key_id[..], &nonce[..]],
                )
                .map_err(backend)?;
            Ok(inserted > 0)
        })
        .await
    }
}
