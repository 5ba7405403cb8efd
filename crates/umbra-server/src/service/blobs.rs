//! Attachments' blobs (`docs/protocol.md`, "Attachments"): created by a
//! member of the conversation's group on an active line, within the
//! configured limits; uploaded in order by that device alone; read by the
//! uploader and the group's current member devices; deleted once every
//! recipient device said it fetched it, or at its expiry. The server never
//! learns more than the blob's padded size, its group and who fetched it.

use umbra_proto::blobs::SEALED_SEGMENT;
use umbra_proto::frame::{ErrorReply, Reply};
use umbra_proto::spent::Budget;
use umbra_proto::{BlobId, DeviceAddr, ErrorCode, GroupId};
use umbra_store::{BlobCreation, BlobQuota, BlobRead, BlobWrite, NewBlob};

use super::{Outcome, Services, internal, not_a_member, refuse, unknown_group};

fn unknown_blob() -> ErrorReply {
    refuse(
        ErrorCode::UnknownBlob,
        "no such blob for you: never issued, expired, already deleted, or not yours to read",
    )
}

fn mib(bytes: u64) -> u64 {
    bytes / (1024 * 1024)
}

impl Services {
    /// When a blob created now for a conversation whose timer is
    /// `ttl_seconds` (0: none) expires: its timer, but at least a day and
    /// at most the server's `blob_ttl`.
    fn blob_expiry(&self, now: u64, ttl_seconds: u32) -> u64 {
        let most = self.limits.config.blob_ttl.as_secs();
        let ttl = match ttl_seconds {
            0 => most,
            ttl => u64::from(ttl)
                .max(umbra_proto::blobs::MIN_BLOB_TTL_SECS)
                .min(most),
        };
        now.saturating_add(ttl)
    }

    pub(super) async fn create_blob(
        &self,
        me: &DeviceAddr,
        group: GroupId,
        size: u64,
        ttl_seconds: u32,
    ) -> Outcome {
        self.require_active(&me.account).await?;
        let config = &self.limits.config;
        // The limit is on files; a blob is a file sealed and padded
        // (`docs/protocol.md`), so the largest blob is the largest file's.
        if size > umbra_proto::blobs::sealed_len(config.max_file_bytes) {
            return Err(refuse(
                ErrorCode::BlobTooLarge,
                format!(
                    "a blob of {size} bytes holds a file larger than this server's largest, {} MiB",
                    mib(config.max_file_bytes)
                ),
            ));
        }
        // Only a sealed file's size: no blob is smaller than the smallest
        // bucket (64 KiB), so a line's quota bounds how many it holds.
        if !umbra_proto::blobs::is_sealed_len(size) {
            return Err(refuse(
                ErrorCode::InvalidRequest,
                format!(
                    "{size} bytes is not the size of a sealed file (docs/protocol.md, \"Attachments\")"
                ),
            ));
        }
        let quota = BlobQuota {
            in_flight: config.blob_bytes_in_flight_per_line,
            stored: config.blob_bytes_per_line,
        };
        let now = self.now();
        let expires_at = self.blob_expiry(now, ttl_seconds);
        // An ID taken is a 2^-128 event; a second draw settles it.
        for _ in 0..2 {
            let mut id = [0u8; 16];
            getrandom::getrandom(&mut id)
                .map_err(|_| refuse(ErrorCode::Internal, "no randomness available"))?;
            let blob = NewBlob {
                id: BlobId(id),
                owner: me.clone(),
                group: group.clone(),
                size,
                now,
                expires_at,
            };
            match self
                .store
                .create_blob(blob, quota)
                .await
                .map_err(internal)?
            {
                BlobCreation::Created => {
                    return Ok(Reply::BlobCreated {
                        blob_id: BlobId(id),
                        expires_at,
                    });
                }
                BlobCreation::IdTaken => continue,
                BlobCreation::UnknownGroup => return Err(unknown_group(&group)),
                BlobCreation::NotAMember => return Err(not_a_member()),
                BlobCreation::InFlightQuota { used } => {
                    return Err(refuse(
                        ErrorCode::QuotaExceeded,
                        format!(
                            "this line has {} MiB of uploads unfinished; at most {} MiB may be \
                             (finish or abandon one first)",
                            mib(used),
                            mib(quota.in_flight)
                        ),
                    ));
                }
                BlobCreation::StoredQuota { used } => {
                    return Err(refuse(
                        ErrorCode::QuotaExceeded,
                        format!(
                            "this line's files take {} MiB at the server, at most {} MiB may; \
                             they are deleted as recipients fetch them",
                            mib(used),
                            mib(quota.stored)
                        ),
                    ));
                }
            }
        }
        Err(refuse(ErrorCode::Internal, "no free blob ID was drawn"))
    }

    pub(super) async fn put_blob(
        &self,
        me: &DeviceAddr,
        blob: BlobId,
        offset: u64,
        data: bytes::Bytes,
    ) -> Outcome {
        self.require_active(&me.account).await?;
        // Chunks are whole sealed segments but for a blob's last, so a blob
        // is never stored, nor read back, in a million slivers.
        if !data.len().is_multiple_of(SEALED_SEGMENT) {
            let ends_the_blob = match self
                .store
                .blob(&blob, me, self.now())
                .await
                .map_err(internal)?
            {
                Some(info) => offset.checked_add(data.len() as u64) == Some(info.size),
                None => return Err(unknown_blob()),
            };
            if !ends_the_blob {
                return Err(refuse(
                    ErrorCode::InvalidRequest,
                    format!(
                        "a chunk holds whole sealed segments ({SEALED_SEGMENT} bytes each) \
                         unless it ends the blob; this one has {} bytes",
                        data.len()
                    ),
                ));
            }
        }
        // Uploads have an hourly budget of their own (messages have
        // theirs): a line cannot churn the store without end.
        let payer = self.payers.account(Budget::Uploads, &me.account);
        self.blob_upload_budget
            .check(&payer, tokio::time::Instant::now())
            .map_err(|wait| {
                refuse(
                    ErrorCode::QuotaExceeded,
                    format!(
                        "this line uploaded more than {} MiB of files this hour; try again in {} s",
                        mib(self.limits.config.blob_upload_bytes_per_hour),
                        wait.as_secs().max(1)
                    ),
                )
            })?;
        let length = data.len() as u64;
        let outcome = self
            .store
            .put_blob(&blob, me, offset, data, self.now())
            .await
            .map_err(internal)?;
        match outcome {
            BlobWrite::Stored(info) => {
                self.metrics.blob_bytes_written.inc_by(length);
                self.blob_upload_budget
                    .charge(&payer, length, tokio::time::Instant::now());
                Ok(Reply::BlobState {
                    size: info.size,
                    stored: info.stored,
                    expires_at: info.expires_at,
                })
            }
            BlobWrite::Unknown => Err(unknown_blob()),
            BlobWrite::Offset { stored } => Err(refuse(
                ErrorCode::BlobOffset,
                format!("the blob's stored bytes end at {stored}, not at {offset}"),
            )),
            BlobWrite::PastEnd { size } => Err(refuse(
                ErrorCode::InvalidRequest,
                format!("these bytes run past the blob's size, {size}"),
            )),
        }
    }

    pub(super) async fn blob_status(&self, me: &DeviceAddr, blob: BlobId) -> Outcome {
        match self
            .store
            .blob(&blob, me, self.now())
            .await
            .map_err(internal)?
        {
            Some(info) => Ok(Reply::BlobState {
                size: info.size,
                stored: info.stored,
                expires_at: info.expires_at,
            }),
            None => Err(unknown_blob()),
        }
    }

    pub(super) async fn get_blob(
        &self,
        me: &DeviceAddr,
        blob: BlobId,
        offset: u64,
        length: u32,
    ) -> Outcome {
        let now = tokio::time::Instant::now();
        let payer = self.payers.account(Budget::Downloads, &me.account);
        self.blob_read_budget.check(&payer, now).map_err(|wait| {
            refuse(
                ErrorCode::QuotaExceeded,
                format!(
                    "this line downloaded more than {} MiB of files this hour; try again in {} s",
                    mib(self.limits.config.blob_read_bytes_per_hour),
                    wait.as_secs().max(1)
                ),
            )
        })?;
        match self
            .store
            .read_blob(&blob, me, offset, length, self.now())
            .await
            .map_err(internal)?
        {
            BlobRead::Data { data, size } => {
                self.metrics.blob_bytes_read.inc_by(data.len() as u64);
                // A read costs at least a segment's worth: slivers read
                // one by one cost the store as much as whole chunks.
                let charged = data.len().max(SEALED_SEGMENT) as u64;
                self.blob_read_budget.charge(&payer, charged, now);
                Ok(Reply::BlobData {
                    data: data.into(),
                    size,
                })
            }
            BlobRead::Unknown => Err(unknown_blob()),
            BlobRead::Incomplete => Err(refuse(
                ErrorCode::BlobIncomplete,
                "this blob's upload has not ended",
            )),
        }
    }

    /// Answered at once, the blob crossed off meanwhile: a device's next
    /// download does not wait for the store's write, and a crossing-off
    /// lost to a crash only keeps the blob until it expires. At most
    /// [`super::BLOB_FETCHED_IN_FLIGHT`] run so; past that one is done
    /// before its answer (the connection waits, as it did for all).
    pub(super) async fn blob_fetched(&self, me: &DeviceAddr, blob: BlobId) -> Outcome {
        let (store, deleted, me) = (
            std::sync::Arc::clone(&self.store),
            self.metrics.blobs_deleted.clone(),
            me.clone(),
        );
        let cross_off = async move {
            match store.blob_fetched(&blob, &me).await {
                Ok(true) => {
                    deleted.inc();
                }
                Ok(false) => {}
                Err(error) => tracing::warn!(%error, "crossing off a fetched blob failed"),
            }
        };
        match std::sync::Arc::clone(&self.blob_fetched_in_flight).try_acquire_owned() {
            Ok(turn) => {
                tokio::spawn(async move {
                    cross_off.await;
                    drop(turn);
                });
            }
            Err(_) => cross_off.await,
        }
        Ok(Reply::Done)
    }
}
