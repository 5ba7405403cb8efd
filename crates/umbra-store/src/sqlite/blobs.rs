//! Blobs in the embedded store: a row per blob in SQLite (whose, how much
//! is stored, which devices have yet to fetch it) and its bytes in a file
//! of its own beside the database, `blobs/<id>`, written and fsynced
//! before a chunk is acknowledged. The row is the truth: a file holds
//! bytes past the row's `stored` only after a crash between the two, and
//! the next write at the row's offset cuts them off; a file without a row
//! (its blob deleted while a write was under way, or before a crash) is
//! removed by the next expiry sweep.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use async_trait::async_trait;
use rusqlite::{OptionalExtension, params};
use umbra_proto::{AccountId, BlobId, DeviceAddr, DeviceId, GroupId};

use super::{SqliteStore, backend, lock};
use crate::{
    BlobCreation, BlobInfo, BlobQuota, BlobRead, BlobWrite, Blobs, NewBlob, Result, StoreError,
    Timestamp,
};

/// Where the bytes are, and which blobs are being written now.
pub(super) struct BlobFiles {
    place: Place,
    writing: Mutex<HashSet<BlobId>>,
    /// File work under way at once (see [`BLOB_IO_AT_ONCE`]).
    io: std::sync::Arc<tokio::sync::Semaphore>,
}

/// Blob file reads and writes run on blocking threads, this many at once:
/// the disk goes no faster with more, and each thread keeps memory of its
/// own, so a hundred transfers at once on as many threads cost a hundred
/// threads' worth of retained chunk buffers.
const BLOB_IO_AT_ONCE: usize = 4;

enum Place {
    Dir(PathBuf),
    Memory(Mutex<HashMap<BlobId, Vec<u8>>>),
}

fn io(error: std::io::Error) -> StoreError {
    if error.raw_os_error() == Some(28) {
        // ENOSPC: as for the database, the disk is full.
        return StoreError::Full;
    }
    StoreError::Backend(format!("blob file: {error}"))
}

fn failed(error: &dyn std::fmt::Display) -> StoreError {
    StoreError::Backend(format!("blob task failed: {error}"))
}

/// One blob being written: others are refused until it is dropped.
struct Writing<'a> {
    files: &'a BlobFiles,
    id: BlobId,
}

impl Drop for Writing<'_> {
    fn drop(&mut self) {
        lock(&self.files.writing).remove(&self.id);
    }
}

impl BlobFiles {
    /// The `blobs` directory beside the database at `database`, created
    /// readable by its owner only.
    pub(super) fn beside(database: &Path) -> Result<Self> {
        let dir = database
            .parent()
            .map_or_else(|| PathBuf::from("blobs"), |parent| parent.join("blobs"));
        let mut builder = std::fs::DirBuilder::new();
        builder.recursive(true);
        #[cfg(unix)]
        std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
        builder.create(&dir).map_err(io)?;
        Ok(BlobFiles {
            place: Place::Dir(dir),
            writing: Mutex::default(),
            io: std::sync::Arc::new(tokio::sync::Semaphore::new(BLOB_IO_AT_ONCE)),
        })
    }

    pub(super) fn in_memory() -> Self {
        BlobFiles {
            place: Place::Memory(Mutex::default()),
            writing: Mutex::default(),
            io: std::sync::Arc::new(tokio::sync::Semaphore::new(BLOB_IO_AT_ONCE)),
        }
    }

    fn start_writing(&self, id: BlobId) -> Option<Writing<'_>> {
        lock(&self.writing)
            .insert(id)
            .then_some(Writing { files: self, id })
    }

    fn path(dir: &Path, id: &BlobId) -> PathBuf {
        dir.join(id.to_hex())
    }

    /// Writes `data` at `offset`, cutting off anything stored past it, and
    /// makes it durable; false (nothing written) if the bytes before
    /// `offset` are not there (the data directory was restored without
    /// them).
    fn write_at(&self, id: &BlobId, offset: u64, data: &[u8]) -> Result<bool> {
        match &self.place {
            Place::Dir(dir) => {
                use std::os::unix::fs::{FileExt, OpenOptionsExt};
                let file = std::fs::OpenOptions::new()
                    .write(true)
                    .create(true)
                    .truncate(false)
                    .mode(0o600)
                    .open(Self::path(dir, id))
                    .map_err(io)?;
                // Never filled with zeros: a file shorter than the row says
                // lost bytes (a restore without it), and the blob is gone.
                if file.metadata().map_err(io)?.len() < offset {
                    return Ok(false);
                }
                file.set_len(offset).map_err(io)?;
                file.write_all_at(data, offset).map_err(io)?;
                file.sync_data().map_err(io)?;
                if offset == 0 {
                    // The file's name is durable too.
                    std::fs::File::open(dir)
                        .and_then(|d| d.sync_all())
                        .map_err(io)?;
                }
                Ok(true)
            }
            Place::Memory(blobs) => {
                let mut blobs = lock(blobs);
                let bytes = blobs.entry(*id).or_default();
                bytes.truncate(usize::try_from(offset).unwrap_or(usize::MAX));
                if bytes.len() as u64 != offset {
                    return Ok(false);
                }
                bytes.extend_from_slice(data);
                Ok(true)
            }
        }
    }

    /// The bytes, or `None` if the file is gone (deleted since its row
    /// was read).
    fn read_at(&self, id: &BlobId, offset: u64, length: usize) -> Result<Option<Vec<u8>>> {
        match &self.place {
            Place::Dir(dir) => {
                use std::io::{Read, Seek, SeekFrom};
                let mut file = match std::fs::File::open(Self::path(dir, id)) {
                    Ok(file) => file,
                    Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(None),
                    Err(error) => return Err(io(error)),
                };
                file.seek(SeekFrom::Start(offset)).map_err(io)?;
                // Read into the spare capacity: not zeroed first (that
                // cost as much as a copy of every byte sent).
                let mut data = Vec::with_capacity(length);
                file.take(length as u64)
                    .read_to_end(&mut data)
                    .map_err(io)?;
                if data.len() < length {
                    return Err(StoreError::Corrupt(format!(
                        "a blob's file is shorter than stored: {} of {length} bytes at {offset}",
                        data.len()
                    )));
                }
                Ok(Some(data))
            }
            Place::Memory(blobs) => {
                let blobs = lock(blobs);
                let Some(bytes) = blobs.get(id) else {
                    return Ok(None);
                };
                let start = usize::try_from(offset).unwrap_or(usize::MAX);
                bytes
                    .get(start..start.saturating_add(length))
                    .map(|b| Some(b.to_vec()))
                    .ok_or_else(|| StoreError::Corrupt("a blob's bytes are missing".into()))
            }
        }
    }

    fn remove(&self, id: &BlobId) -> Result<()> {
        match &self.place {
            Place::Dir(dir) => match std::fs::remove_file(Self::path(dir, id)) {
                Err(error) if error.kind() != std::io::ErrorKind::NotFound => Err(io(error)),
                _ => Ok(()),
            },
            Place::Memory(blobs) => {
                lock(blobs).remove(id);
                Ok(())
            }
        }
    }

    /// Every blob that has bytes here, and is not being written.
    fn listed(&self) -> Result<Vec<BlobId>> {
        let mut ids = match &self.place {
            Place::Dir(dir) => {
                let mut ids = Vec::new();
                for entry in std::fs::read_dir(dir).map_err(io)? {
                    let name = entry.map_err(io)?.file_name();
                    if let Some(id) = name.to_str().and_then(|n| BlobId::from_hex(n).ok()) {
                        ids.push(id);
                    }
                }
                ids
            }
            Place::Memory(blobs) => lock(blobs).keys().copied().collect(),
        };
        let writing = lock(&self.writing);
        ids.retain(|id| !writing.contains(id));
        Ok(ids)
    }
}

/// A blob's row.
struct Row {
    owner: DeviceAddr,
    group: GroupId,
    size: u64,
    stored: u64,
    expires_at: Timestamp,
}

impl Row {
    fn info(self) -> BlobInfo {
        BlobInfo {
            owner: self.owner,
            group: self.group,
            size: self.size,
            stored: self.stored,
            expires_at: self.expires_at,
        }
    }
}

fn read_row(connection: &rusqlite::Connection, id: &BlobId) -> Result<Option<Row>> {
    let row: Option<(String, u32, Vec<u8>, u64, u64, u64)> = connection
        .prepare_cached(
            "SELECT owner_account, owner_device, group_id, size, stored, expires_at
             FROM blobs WHERE blob_id = ?1",
        )
        .and_then(|mut s| {
            s.query_row([&id.0[..]], |r| {
                Ok((
                    r.get(0)?,
                    r.get(1)?,
                    r.get(2)?,
                    r.get(3)?,
                    r.get(4)?,
                    r.get(5)?,
                ))
            })
            .optional()
        })
        .map_err(backend)?;
    let Some((account, device, group, size, stored, expires_at)) = row else {
        return Ok(None);
    };
    let corrupt = |_| StoreError::Corrupt("a blob's row".into());
    Ok(Some(Row {
        owner: DeviceAddr::new(
            AccountId::parse(&account).map_err(corrupt)?,
            DeviceId(device),
        ),
        group: GroupId::new(group).map_err(corrupt)?,
        size,
        stored,
        expires_at,
    }))
}

impl SqliteStore {
    async fn blocking<T, F>(&self, work: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&BlobFiles) -> Result<T> + Send + 'static,
    {
        let files = std::sync::Arc::clone(&self.blobs);
        // Held by the work itself: a caller that gives up does not free
        // the turn while the work still runs.
        let turn = std::sync::Arc::clone(&self.blobs.io)
            .acquire_owned()
            .await
            .map_err(|_| StoreError::Backend("the blob store is closing".into()))?;
        tokio::task::spawn_blocking(move || {
            let result = work(&files);
            drop(turn);
            result
        })
        .await
        .map_err(|e| failed(&e))?
    }

    /// Removes the files of `ids`, whose rows are gone.
    async fn remove_files(&self, ids: Vec<BlobId>) -> Result<()> {
        self.blocking(move |files| ids.iter().try_for_each(|id| files.remove(id)))
            .await
    }
}

#[async_trait]
impl Blobs for SqliteStore {
    async fn create_blob(&self, blob: NewBlob, quota: BlobQuota) -> Result<BlobCreation> {
        self.write(move |tx| {
            let group = blob.group.as_bytes();
            let (account, device) = (blob.owner.account.as_str(), blob.owner.device.0);
            let exists: bool = tx
                .prepare_cached("SELECT EXISTS (SELECT 1 FROM groups WHERE group_id = ?1)")
                .and_then(|mut s| s.query_row([group], |r| r.get(0)))
                .map_err(backend)?;
            if !exists {
                return Ok(BlobCreation::UnknownGroup);
            }
            let member: bool = tx
                .prepare_cached(
                    "SELECT EXISTS (SELECT 1 FROM group_members
                     WHERE group_id = ?1 AND account_id = ?2 AND device = ?3)",
                )
                .and_then(|mut s| s.query_row(params![group, account, device], |r| r.get(0)))
                .map_err(backend)?;
            if !member {
                return Ok(BlobCreation::NotAMember);
            }
            let (stored, in_flight): (u64, u64) = tx
                .prepare_cached(
                    "SELECT COALESCE(SUM(size), 0),
                            COALESCE(SUM(CASE WHEN stored < size THEN size END), 0)
                     FROM blobs WHERE owner_account = ?1 AND expires_at > ?2",
                )
                .and_then(|mut s| {
                    s.query_row(params![account, blob.now], |r| Ok((r.get(0)?, r.get(1)?)))
                })
                .map_err(backend)?;
            if let Some(refusal) = quota.refusal(blob.size, in_flight, stored) {
                return Ok(refusal);
            }
            let inserted = tx
                .prepare_cached(
                    "INSERT INTO blobs (blob_id, owner_account, owner_device, group_id, size,
                                        touched_at, lifetime, expires_at)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?8, ?7) ON CONFLICT DO NOTHING",
                )
                .and_then(|mut s| {
                    s.execute(params![
                        &blob.id.0[..],
                        account,
                        device,
                        group,
                        blob.size,
                        blob.now,
                        blob.expires_at,
                        blob.expires_at.saturating_sub(blob.now)
                    ])
                })
                .map_err(backend)?;
            if inserted == 0 {
                return Ok(BlobCreation::IdTaken);
            }
            Ok(BlobCreation::Created)
        })
        .await
    }

    async fn blob(
        &self,
        id: &BlobId,
        owner: &DeviceAddr,
        now: Timestamp,
    ) -> Result<Option<BlobInfo>> {
        let (id, owner) = (*id, owner.clone());
        self.run(move |connection| {
            Ok(read_row(connection, &id)?
                .filter(|row| row.owner == owner && row.expires_at > now)
                .map(Row::info))
        })
        .await
    }

    async fn put_blob(
        &self,
        id: &BlobId,
        owner: &DeviceAddr,
        offset: u64,
        data: bytes::Bytes,
        now: Timestamp,
    ) -> Result<BlobWrite> {
        if self.blob(id, owner, now).await?.is_none() {
            return Ok(BlobWrite::Unknown);
        }
        let Some(_writing) = self.blobs.start_writing(*id) else {
            // Another write to it is under way: this one cannot know where
            // the stored bytes will end.
            let stored = self.blob(id, owner, now).await?.map_or(0, |b| b.stored);
            return Ok(BlobWrite::Offset { stored });
        };
        // Read again under the guard: a write that just ended moved it.
        let Some(info) = self.blob(id, owner, now).await? else {
            return Ok(BlobWrite::Unknown);
        };
        if offset != info.stored {
            return Ok(BlobWrite::Offset {
                stored: info.stored,
            });
        }
        let end = offset.saturating_add(data.len() as u64);
        if end > info.size {
            return Ok(BlobWrite::PastEnd { size: info.size });
        }
        let (file_id, bytes) = (*id, data);
        let written = self
            .blocking(move |files| files.write_at(&file_id, offset, &bytes))
            .await?;
        if !written {
            // Its stored bytes are lost: so is the blob.
            let row_id = *id;
            self.write(move |tx| {
                tx.execute("DELETE FROM blobs WHERE blob_id = ?1", [&row_id.0[..]])
                    .map_err(backend)
            })
            .await?;
            self.remove_files(vec![*id]).await?;
            return Ok(BlobWrite::Unknown);
        }
        let row_id = *id;
        let complete = end == info.size;
        let (group, owner) = (info.group.clone(), owner.clone());
        let expires_at = self
            .write(move |tx| {
                let expires_at: Option<u64> = tx
                    .prepare_cached(
                        "UPDATE blobs SET stored = ?2, touched_at = ?3,
                             expires_at = CASE WHEN ?5 THEN ?3 + lifetime ELSE expires_at END
                         WHERE blob_id = ?1 AND stored = ?4 RETURNING expires_at",
                    )
                    .and_then(|mut s| {
                        s.query_row(params![&row_id.0[..], end, now, offset, complete], |r| {
                            r.get(0)
                        })
                        .optional()
                    })
                    .map_err(backend)?;
                if complete && expires_at.is_some() {
                    // Who is in the group as its message goes out.
                    tx.prepare_cached(
                        "INSERT INTO blob_recipients (blob_id, account_id, device)
                         SELECT ?1, m.account_id, m.device FROM group_members m
                         JOIN devices d ON d.account_id = m.account_id AND d.device = m.device
                         WHERE m.group_id = ?2 AND NOT (m.account_id = ?3 AND m.device = ?4)",
                    )
                    .and_then(|mut s| {
                        s.execute(params![
                            &row_id.0[..],
                            group.as_bytes(),
                            owner.account.as_str(),
                            owner.device.0
                        ])
                    })
                    .map_err(backend)?;
                }
                Ok(expires_at)
            })
            .await?;
        let Some(expires_at) = expires_at else {
            // Deleted meanwhile (expired, or swept as idle).
            return Ok(BlobWrite::Unknown);
        };
        Ok(BlobWrite::Stored(BlobInfo {
            stored: end,
            expires_at,
            ..info
        }))
    }

    async fn read_blob(
        &self,
        id: &BlobId,
        reader: &DeviceAddr,
        offset: u64,
        length: u32,
        now: Timestamp,
    ) -> Result<BlobRead> {
        let (blob_id, reader) = (*id, reader.clone());
        let row = self
            .run(move |connection| {
                let Some(row) = read_row(connection, &blob_id)? else {
                    return Ok(None);
                };
                if row.expires_at <= now {
                    return Ok(None);
                }
                if row.owner == reader {
                    return Ok(Some(row));
                }
                let member: bool = connection
                    .prepare_cached(
                        "SELECT EXISTS (SELECT 1 FROM group_members
                         WHERE group_id = ?1 AND account_id = ?2 AND device = ?3)",
                    )
                    .and_then(|mut s| {
                        s.query_row(
                            params![
                                row.group.as_bytes(),
                                reader.account.as_str(),
                                reader.device.0
                            ],
                            |r| r.get(0),
                        )
                    })
                    .map_err(backend)?;
                Ok(member.then_some(row))
            })
            .await?;
        let Some(row) = row else {
            return Ok(BlobRead::Unknown);
        };
        if row.stored < row.size {
            return Ok(BlobRead::Incomplete);
        }
        let length = u64::from(length).min(row.size.saturating_sub(offset));
        let size = row.size;
        let file_id = *id;
        let data = if length == 0 {
            Some(Vec::new())
        } else {
            self.blocking(move |files| {
                files.read_at(&file_id, offset, usize::try_from(length).unwrap_or(0))
            })
            .await?
        };
        // Its file went after its row was read: deleted meanwhile.
        Ok(data.map_or(BlobRead::Unknown, |data| BlobRead::Data { data, size }))
    }

    async fn blob_fetched(&self, id: &BlobId, device: &DeviceAddr) -> Result<bool> {
        let (blob_id, device) = (*id, device.clone());
        let deleted = self
            .write(move |tx| {
                let removed = tx
                    .prepare_cached(
                        "DELETE FROM blob_recipients
                         WHERE blob_id = ?1 AND account_id = ?2 AND device = ?3",
                    )
                    .and_then(|mut s| {
                        s.execute(params![
                            &blob_id.0[..],
                            device.account.as_str(),
                            device.device.0
                        ])
                    })
                    .map_err(backend)?;
                if removed == 0 {
                    return Ok(false);
                }
                let deleted = tx
                    .prepare_cached(
                        "DELETE FROM blobs WHERE blob_id = ?1 AND stored = size
                         AND NOT EXISTS (SELECT 1 FROM blob_recipients WHERE blob_id = ?1)",
                    )
                    .and_then(|mut s| s.execute([&blob_id.0[..]]))
                    .map_err(backend)?;
                Ok(deleted > 0)
            })
            .await?;
        if deleted {
            self.remove_files(vec![*id]).await?;
        }
        Ok(deleted)
    }

    async fn expire_blobs(&self, now: Timestamp, idle_before: Timestamp) -> Result<u64> {
        // In chunks of the blobs in key order, each its own write: every
        // live blob is looked at, and a whole pass at once held the writer
        // (so every send) for about 320 ms with 100,000 blobs waiting. A
        // chunk's files go as soon as its rows have: a chunk that fails
        // later leaves none behind.
        let mut count = 0;
        let mut after: Vec<u8> = Vec::new();
        let swept = async {
            loop {
                let from = after.clone();
                let (ids, last) = self
                    .write(move |tx| expire_chunk(tx, &from, now, idle_before))
                    .await?;
                count += ids.len() as u64;
                let ids = ids
                    .iter()
                    .filter_map(|id| BlobId::from_slice(id).ok())
                    .collect();
                self.remove_files(ids).await?;
                match last {
                    Some(last) => after = last,
                    None => return Ok::<_, StoreError>(()),
                }
            }
        }
        .await;
        // Whatever happened to the sweep.
        let orphans = self.remove_orphan_files().await;
        swept?;
        orphans?;
        Ok(count)
    }
}

impl SqliteStore {
    /// Deletes the files whose rows are gone without them (listed before
    /// the rows are read, so a blob created meanwhile is among the rows).
    async fn remove_orphan_files(&self) -> Result<()> {
        let listed = self.blocking(BlobFiles::listed).await?;
        if listed.is_empty() {
            return Ok(());
        }
        let orphans = self
            .run(move |connection| {
                let mut statement = connection
                    .prepare_cached("SELECT EXISTS (SELECT 1 FROM blobs WHERE blob_id = ?1)")
                    .map_err(backend)?;
                let mut orphans = Vec::new();
                for id in listed {
                    let known: bool = statement
                        .query_row([&id.0[..]], |r| r.get(0))
                        .map_err(backend)?;
                    if !known {
                        orphans.push(id);
                    }
                }
                Ok(orphans)
            })
            .await?;
        self.remove_files(orphans).await
    }
}

/// A blob's key as the table holds it.
type RawId = Vec<u8>;

/// Blobs the expiry sweep looks at per write.
const EXPIRY_CHUNK: i64 = 500;

/// One chunk of the expiry sweep: the blobs after `after` in key order.
/// Crosses off the recipients that cannot fetch their blob any more (out
/// of its group, or no longer a current device), then deletes the blobs
/// that expired, whose upload went idle, or that are complete with no
/// recipient left. Returns the deleted IDs and the chunk's last key
/// (`None`: no blob was left after `after`).
fn expire_chunk(
    tx: &rusqlite::Connection,
    after: &[u8],
    now: Timestamp,
    idle_before: Timestamp,
) -> Result<(Vec<RawId>, Option<RawId>)> {
    let last: Option<Vec<u8>> = tx
        .prepare_cached(
            "SELECT MAX(blob_id) FROM (SELECT blob_id FROM blobs WHERE blob_id > ?1
             ORDER BY blob_id LIMIT ?2)",
        )
        .and_then(|mut s| s.query_row(params![after, EXPIRY_CHUNK], |r| r.get(0)))
        .map_err(backend)?;
    let Some(last) = last else {
        return Ok((Vec::new(), None));
    };
    tx.prepare_cached(
        "DELETE FROM blob_recipients AS r
         WHERE r.blob_id > ?1 AND r.blob_id <= ?2 AND NOT EXISTS (
             SELECT 1 FROM blobs b
             JOIN group_members m ON m.group_id = b.group_id
             JOIN devices d ON d.account_id = m.account_id AND d.device = m.device
             WHERE b.blob_id = r.blob_id
               AND m.account_id = r.account_id AND m.device = r.device)",
    )
    .and_then(|mut s| s.execute(params![after, &last]))
    .map_err(backend)?;
    let ids = tx
        .prepare_cached(
            "DELETE FROM blobs
             WHERE blob_id > ?1 AND blob_id <= ?2
               AND (expires_at <= ?3 OR (stored < size AND touched_at < ?4)
                    OR (stored = size AND NOT EXISTS (
                        SELECT 1 FROM blob_recipients r WHERE r.blob_id = blobs.blob_id)))
             RETURNING blob_id",
        )
        .and_then(|mut s| {
            s.query_map(params![after, &last, now, idle_before], |r| r.get(0))?
                .collect::<rusqlite::Result<_>>()
        })
        .map_err(backend)?;
    Ok((ids, Some(last)))
}
