//! Attachments' blobs: ciphertext uploaded in chunks, read back by the
//! conversation's devices, deleted once each recipient device fetched it
//! or when it expires. The trait speaks of blobs, never of files or rows:
//! the embedded backend keeps the bytes in files beside its database, the
//! clustered one in PostgreSQL.

use async_trait::async_trait;
use umbra_proto::{BlobId, DeviceAddr, GroupId};

use crate::{Result, Timestamp};

/// A blob about to be created. Its recipients are not declared: when its
/// upload ends, the store takes them from the group's members (every
/// current member device but `owner`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewBlob {
    pub id: BlobId,
    /// The device that uploads it.
    pub owner: DeviceAddr,
    pub group: GroupId,
    /// Its exact size in bytes, at least 1.
    pub size: u64,
    pub now: Timestamp,
    /// When it expires if its upload ended at once: its lifetime
    /// (`expires_at - now`) counts from the end of its upload.
    pub expires_at: Timestamp,
}

/// What one line (all devices of one account) may hold in blobs, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlobQuota {
    /// Blobs not yet complete.
    pub in_flight: u64,
    /// Every blob, complete or not.
    pub stored: u64,
}

impl BlobQuota {
    /// The refusal of a new blob of `size` for a line whose blobs take
    /// `stored` bytes, `in_flight` of them unfinished; `None` if it fits.
    /// The one rule every backend applies.
    pub fn refusal(&self, size: u64, in_flight: u64, stored: u64) -> Option<BlobCreation> {
        if in_flight.saturating_add(size) > self.in_flight {
            return Some(BlobCreation::InFlightQuota { used: in_flight });
        }
        if stored.saturating_add(size) > self.stored {
            return Some(BlobCreation::StoredQuota { used: stored });
        }
        None
    }
}

/// How a [`Blobs::create_blob`] ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlobCreation {
    Created,
    /// No such group.
    UnknownGroup,
    /// The owner device has no leaf in the group.
    NotAMember,
    /// The line's incomplete blobs would exceed its quota; `used` bytes are.
    InFlightQuota {
        used: u64,
    },
    /// The line's blobs would exceed its quota; `used` bytes are.
    StoredQuota {
        used: u64,
    },
    /// The ID is taken (the caller draws it at random: draw again).
    IdTaken,
}

/// A blob as its uploader sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlobInfo {
    pub owner: DeviceAddr,
    pub group: GroupId,
    pub size: u64,
    /// Bytes stored, from the start; complete when equal to `size`.
    pub stored: u64,
    pub expires_at: Timestamp,
}

impl BlobInfo {
    pub fn complete(&self) -> bool {
        self.stored == self.size
    }
}

/// How a [`Blobs::put_blob`] ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BlobWrite {
    /// Durable; the blob now stands as shown.
    Stored(BlobInfo),
    /// No live blob of that ID uploaded by this device.
    Unknown,
    /// The offset is not where the stored bytes end (`stored`), or another
    /// write to the blob is under way.
    Offset { stored: u64 },
    /// The bytes would run past the blob's size.
    PastEnd { size: u64 },
}

/// How a [`Blobs::read_blob`] ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BlobRead {
    /// The bytes at the offset asked (fewer at the end; none past it),
    /// and the blob's size.
    Data { data: Vec<u8>, size: u64 },
    /// No live blob of that ID this device may read.
    Unknown,
    /// Its upload is not complete.
    Incomplete,
}

/// Blobs. Every method sees an expired blob (`expires_at <= now`) as gone,
/// whether or not [`Blobs::expire_blobs`] deleted it yet.
#[async_trait]
pub trait Blobs: Send + Sync {
    /// Creates an empty blob, if its owner device is a member of the group
    /// and the owner's line stays within `quota`, checked and recorded in
    /// one step (two uploads racing cannot both pass a quota only one
    /// fits).
    async fn create_blob(&self, blob: NewBlob, quota: BlobQuota) -> Result<BlobCreation>;

    /// The blob, if it lives and `owner` uploads it.
    async fn blob(
        &self,
        id: &BlobId,
        owner: &DeviceAddr,
        now: Timestamp,
    ) -> Result<Option<BlobInfo>>;

    /// Appends `data` at `offset`, which must be where the stored bytes
    /// end; durable when it returns `Stored`. Two writes to one blob at
    /// once: one of them is refused (`Offset`), never interleaved. The
    /// write that completes it starts its lifetime and makes the group's
    /// other current member devices its recipients.
    /// (`data` is taken, not borrowed: a chunk, a slice of the frame it
    /// came in, is not copied again on its way to the disk.)
    async fn put_blob(
        &self,
        id: &BlobId,
        owner: &DeviceAddr,
        offset: u64,
        data: bytes::Bytes,
        now: Timestamp,
    ) -> Result<BlobWrite>;

    /// Up to `length` bytes at `offset` of a complete blob, for its owner
    /// or a device that is a member of its group now.
    async fn read_blob(
        &self,
        id: &BlobId,
        reader: &DeviceAddr,
        offset: u64,
        length: u32,
        now: Timestamp,
    ) -> Result<BlobRead>;

    /// `device` has the blob: it is no longer waited for, and the blob is
    /// deleted once no recipient is. Returns whether this deleted it.
    async fn blob_fetched(&self, id: &BlobId, device: &DeviceAddr) -> Result<bool>;

    /// Deletes every blob expired at `now`, every incomplete one last
    /// written (or created) before `idle_before`, and every complete one
    /// no device is waiting for any more (recipients that left the group
    /// or are no longer current devices are not). Returns how many.
    async fn expire_blobs(&self, now: Timestamp, idle_before: Timestamp) -> Result<u64>;
}
