//! Blobs in PostgreSQL: rows as in the embedded store, and the bytes in
//! `blob_chunks`, one row per uploaded chunk, so every node reads what any
//! node stored. A write locks the blob's row (`FOR UPDATE`) from its check
//! of the offset to its chunk, so two writes to one blob never interleave.

use async_trait::async_trait;
use umbra_proto::blobs::MAX_BLOB_CHUNK;
use umbra_proto::{BlobId, DeviceAddr};

use super::{Failure, PgStore, big, device_addr, group_id, transaction, unsigned};
use crate::{
    BlobCreation, BlobInfo, BlobQuota, BlobRead, BlobWrite, Blobs, NewBlob, Result, Timestamp,
};

type Tx<'a> = deadpool_postgres::Transaction<'a>;

const ROW: &str = "SELECT owner_account, owner_device, group_id, size, stored, expires_at
                   FROM blobs WHERE blob_id = $1";

fn info(row: &tokio_postgres::Row) -> Result<BlobInfo> {
    Ok(BlobInfo {
        owner: device_addr(row.get(0), row.get(1))?,
        group: group_id(row.get(2))?,
        size: unsigned(row.get(3))?,
        stored: unsigned(row.get(4))?,
        expires_at: unsigned(row.get(5))?,
    })
}

async fn is_member(
    tx: &Tx<'_>,
    group: &[u8],
    device: &DeviceAddr,
) -> std::result::Result<bool, super::Failure> {
    Ok(tx
        .query_opt(
            "SELECT 1 FROM group_members WHERE group_id = $1 AND account_id = $2 AND device = $3",
            &[
                &group,
                &device.account.as_str(),
                &i64::from(device.device.0),
            ],
        )
        .await?
        .is_some())
}

#[async_trait]
impl Blobs for PgStore {
    async fn create_blob(&self, blob: NewBlob, quota: BlobQuota) -> Result<BlobCreation> {
        let group = blob.group.as_bytes();
        let (account, device) = (blob.owner.account.as_str(), i64::from(blob.owner.device.0));
        transaction!(self, tx => {
            // The line's row orders its creations, so two racing ones see
            // each other's blob in the quota (lines before groups, as in
            // every transaction).
            tx.execute(
                "SELECT 1 FROM accounts WHERE account_id = $1 FOR NO KEY UPDATE",
                &[&account],
            )
                .await?;
            if tx
                .query_opt(&**super::groups::GROUP_SHARED, &[&group])
                .await?
                .is_none()
            {
                return Ok(BlobCreation::UnknownGroup);
            }
            if !is_member(&tx, group, &blob.owner).await? {
                return Ok(BlobCreation::NotAMember);
            }
            let usage = tx
                .query_one(
                    "SELECT COALESCE(SUM(size), 0)::BIGINT,
                            COALESCE(SUM(size) FILTER (WHERE stored < size), 0)::BIGINT
                     FROM blobs WHERE owner_account = $1 AND expires_at > $2",
                    &[&account, &big(blob.now)],
                )
                .await?;
            let (stored, in_flight) = (unsigned(usage.get(0))?, unsigned(usage.get(1))?);
            if let Some(refusal) = quota.refusal(blob.size, in_flight, stored) {
                return Ok(refusal);
            }
            let inserted = tx
                .execute(
                    "INSERT INTO blobs (blob_id, owner_account, owner_device, group_id, size,
                                        touched_at, expires_at, lifetime)
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT DO NOTHING",
                    &[
                        &&blob.id.0[..],
                        &account,
                        &device,
                        &group,
                        &big(blob.size),
                        &big(blob.now),
                        &big(blob.expires_at),
                        &big(blob.expires_at.saturating_sub(blob.now)),
                    ],
                )
                .await?;
            if inserted == 0 {
                return Ok(BlobCreation::IdTaken);
            }
            Ok::<_, Failure>(BlobCreation::Created)
        })
    }

    async fn blob(
        &self,
        id: &BlobId,
        owner: &DeviceAddr,
        now: Timestamp,
    ) -> Result<Option<BlobInfo>> {
        let row = transaction!(read self, tx => {
            Ok::<_, Failure>(tx.query_opt(ROW, &[&&id.0[..]]).await?)
        })?;
        Ok(row
            .map(|row| info(&row))
            .transpose()?
            .filter(|blob| blob.owner == *owner && blob.expires_at > now))
    }

    async fn put_blob(
        &self,
        id: &BlobId,
        owner: &DeviceAddr,
        offset: u64,
        data: bytes::Bytes,
        now: Timestamp,
    ) -> Result<BlobWrite> {
        transaction!(self, tx => {
            let Some(row) = tx
                .query_opt(&format!("{ROW} FOR UPDATE"), &[&&id.0[..]])
                .await?
            else {
                return Ok(BlobWrite::Unknown);
            };
            let blob = info(&row)?;
            if blob.owner != *owner || blob.expires_at <= now {
                return Ok(BlobWrite::Unknown);
            }
            if offset != blob.stored {
                return Ok(BlobWrite::Offset { stored: blob.stored });
            }
            let end = offset.saturating_add(data.len() as u64);
            if end > blob.size {
                return Ok(BlobWrite::PastEnd { size: blob.size });
            }
            tx.execute(
                "INSERT INTO blob_chunks (blob_id, \"offset\", data) VALUES ($1, $2, $3)",
                &[&&id.0[..], &big(offset), &&data[..]],
            )
            .await?;
            let complete = end == blob.size;
            let expires_at: i64 = tx
                .query_one(
                    "UPDATE blobs SET stored = $2, touched_at = $3,
                         expires_at = CASE WHEN $4 THEN $3 + lifetime ELSE expires_at END
                     WHERE blob_id = $1 RETURNING expires_at",
                    &[&&id.0[..], &big(end), &big(now), &complete],
                )
                .await?
                .get(0);
            if complete {
                // Who is in the group as its message goes out.
                tx.execute(
                    "INSERT INTO blob_recipients (blob_id, account_id, device)
                     SELECT $1, m.account_id, m.device FROM group_members m
                     JOIN devices d ON d.account_id = m.account_id AND d.device = m.device
                     WHERE m.group_id = $2 AND NOT (m.account_id = $3 AND m.device = $4)",
                    &[
                        &&id.0[..],
                        &blob.group.as_bytes(),
                        &owner.account.as_str(),
                        &i64::from(owner.device.0),
                    ],
                )
                .await?;
            }
            Ok::<_, Failure>(BlobWrite::Stored(BlobInfo {
                stored: end,
                expires_at: unsigned(expires_at)?,
                ..blob
            }))
        })
    }

    async fn read_blob(
        &self,
        id: &BlobId,
        reader: &DeviceAddr,
        offset: u64,
        length: u32,
        now: Timestamp,
    ) -> Result<BlobRead> {
        transaction!(read self, tx => {
            let Some(row) = tx.query_opt(ROW, &[&&id.0[..]]).await? else {
                return Ok(BlobRead::Unknown);
            };
            let blob = info(&row)?;
            if blob.expires_at <= now
                || (blob.owner != *reader && !is_member(&tx, blob.group.as_bytes(), reader).await?)
            {
                return Ok(BlobRead::Unknown);
            }
            if !blob.complete() {
                return Ok(BlobRead::Incomplete);
            }
            let end = offset.saturating_add(u64::from(length)).min(blob.size);
            let mut data = Vec::with_capacity(usize::try_from(end.saturating_sub(offset)).unwrap_or(0));
            if offset < end {
                // The chunks that overlap [offset, end), in order. None is
                // longer than MAX_BLOB_CHUNK, so none that starts that far
                // before `offset` can: the index range stays short however
                // many chunks the blob has.
                let chunks = tx
                    .query(
                        "SELECT \"offset\", data FROM blob_chunks
                         WHERE blob_id = $1 AND \"offset\" < $3
                           AND \"offset\" > $4
                           AND \"offset\" + length(data) > $2
                         ORDER BY \"offset\"",
                        &[
                            &&id.0[..],
                            &big(offset),
                            &big(end),
                            &big(offset).saturating_sub(MAX_BLOB_CHUNK as i64),
                        ],
                    )
                    .await?;
                for chunk in chunks {
                    let start = unsigned(chunk.get(0))?;
                    let bytes: &[u8] = chunk.get(1);
                    let from = usize::try_from(offset.max(start) - start).unwrap_or(usize::MAX);
                    let to = usize::try_from(end.min(start + bytes.len() as u64) - start)
                        .unwrap_or(usize::MAX);
                    data.extend_from_slice(bytes.get(from..to).unwrap_or_default());
                }
                if data.len() as u64 != end - offset {
                    return Err(crate::StoreError::Corrupt("a blob's chunks are missing".into()).into());
                }
            }
            Ok::<_, Failure>(BlobRead::Data { data, size: blob.size })
        })
    }

    async fn blob_fetched(&self, id: &BlobId, device: &DeviceAddr) -> Result<bool> {
        transaction!(self, tx => {
            let removed = tx
                .execute(
                    "DELETE FROM blob_recipients
                     WHERE blob_id = $1 AND account_id = $2 AND device = $3",
                    &[&&id.0[..], &device.account.as_str(), &i64::from(device.device.0)],
                )
                .await?;
            if removed == 0 {
                return Ok(false);
            }
            // The blob's row first, so two last recipients racing do not
            // both miss each other's deletion.
            tx.execute("SELECT 1 FROM blobs WHERE blob_id = $1 FOR UPDATE", &[&&id.0[..]])
                .await?;
            let deleted = tx
                .execute(
                    "DELETE FROM blobs WHERE blob_id = $1 AND stored = size
                     AND NOT EXISTS (SELECT 1 FROM blob_recipients WHERE blob_id = $1)",
                    &[&&id.0[..]],
                )
                .await?;
            Ok::<_, Failure>(deleted > 0)
        })
    }

    async fn expire_blobs(&self, now: Timestamp, idle_before: Timestamp) -> Result<u64> {
        transaction!(self, tx => {
            // Recipients that cannot fetch it any more: out of its group,
            // or no longer a current device.
            tx.execute(
                "DELETE FROM blob_recipients r WHERE NOT EXISTS (
                     SELECT 1 FROM blobs b
                     JOIN group_members m ON m.group_id = b.group_id
                     JOIN devices d ON d.account_id = m.account_id AND d.device = m.device
                     WHERE b.blob_id = r.blob_id
                       AND m.account_id = r.account_id AND m.device = r.device)",
                &[],
            )
            .await?;
            Ok::<_, Failure>(())
        })?;
        // A few blobs a transaction (each may take a hundred MiB of chunks
        // with it), so a backlog never outlasts a transaction's bound; and
        // a bounded number of them a sweep, so a backlog never holds up the
        // sweeper's other work (what is left goes at the next sweep:
        // expired blobs are unreadable and off every quota meanwhile).
        let mut deleted = 0;
        for _ in 0..EXPIRY_BATCHES_PER_SWEEP {
            let batch = transaction!(self, tx => {
                Ok::<_, Failure>(tx
                    .execute(
                        "DELETE FROM blobs WHERE blob_id IN (
                             SELECT blob_id FROM blobs
                             WHERE expires_at <= $1 OR (stored < size AND touched_at < $2)
                                OR (stored = size AND NOT EXISTS (
                                    SELECT 1 FROM blob_recipients r
                                    WHERE r.blob_id = blobs.blob_id))
                             LIMIT $3)",
                        &[&big(now), &big(idle_before), &big(EXPIRY_BATCH)],
                    )
                    .await?)
            })?;
            deleted += batch;
            if batch < EXPIRY_BATCH {
                break;
            }
        }
        Ok(deleted)
    }
}

/// Blobs deleted per transaction by the expiry sweep.
const EXPIRY_BATCH: u64 = 16;
/// Transactions of the expiry sweep at most, each time it runs.
const EXPIRY_BATCHES_PER_SWEEP: usize = 256;
