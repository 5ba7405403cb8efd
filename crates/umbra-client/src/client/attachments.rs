//! Files in conversations: sealed on the device (`crate::seal`), uploaded
//! as a blob in chunks, announced in an MLS application message that
//! carries the blob's ID, key and digest; fetched by each recipient
//! device, checked segment by segment as it arrives, and kept sealed under
//! `files/` in the device directory with its key in the encrypted store.
//! A file goes with its message: when the message expires or its
//! conversation is deleted, the key row goes (cascade) and the sealed file
//! with it (`sweep_files`). Plaintext is written only where the user saves
//! a file to.

use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use futures_util::StreamExt;
use futures_util::stream::FuturesOrdered;
use rusqlite::{OptionalExtension, params};
use umbra_proto::blobs::MAX_BLOB_CHUNK;
use umbra_proto::content::{Attachment, Body, MAX_CAPTION_BYTES, MAX_FILE_NAME_BYTES};
use umbra_proto::{BlobId, ErrorCode, GroupId, Reply, Request};

use crate::error::{ClientError, Result};
use crate::metadata::Sniffed;
use crate::seal::{self, Checker, FileKey, SEALED_SEGMENT};
use crate::types::{
    AttachmentInfo, AttachmentState, ConversationId, DeliveryState, Event, Message,
};

use super::{Client, transit_ttl};

/// Bytes per upload or download request: four whole sealed segments
/// (256 KiB), so a request finishes within the link's 30 s on a link of
/// 9 KB/s, and a cut-off download loses little.
const CHUNK: usize = 4 * SEALED_SEGMENT;
const _: () = assert!(CHUNK <= MAX_BLOB_CHUNK && CHUNK.is_multiple_of(SEALED_SEGMENT));

/// Requests of one transfer in flight at once: a round trip per chunk
/// would bound a transfer to 256 KiB per round trip (2.6 MB/s at 100 ms).
const WINDOW: usize = 4;

/// How many times in a row an upload goes back to the server's offset
/// without getting further before it gives up (a server that keeps
/// answering "start again" would otherwise keep the device uploading).
const MAX_OFFSET_RESETS: u32 = 8;

/// Records `attachment` as message `message_id`'s file.
pub(super) fn record_attachment(
    tx: &rusqlite::Transaction<'_>,
    message_id: i64,
    attachment: &Attachment,
    state: AttachmentState,
) -> Result<()> {
    tx.execute(
        "INSERT INTO attachments (message_id, blob_id, file_key, digest, size, mime_type, name,
                                  duration_ms, state, thumbnail, waveform)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
        params![
            message_id,
            &attachment.blob_id.0[..],
            &attachment.key[..],
            &attachment.digest[..],
            attachment.size,
            attachment.mime_type,
            attachment.name,
            attachment.duration_ms,
            state.as_str(),
            (!attachment.thumbnail.is_empty()).then_some(&attachment.thumbnail),
            (!attachment.waveform.is_empty()).then_some(&attachment.waveform)
        ],
    )?;
    Ok(())
}

/// What front ends see of `attachment` in `state`.
pub(super) fn info_of(attachment: &Attachment, state: AttachmentState) -> AttachmentInfo {
    AttachmentInfo {
        name: attachment.name.clone(),
        size: attachment.size,
        mime_type: attachment.mime_type.clone(),
        state,
        duration_ms: attachment.duration_ms,
        has_thumbnail: !attachment.thumbnail.is_empty(),
        waveform: attachment.waveform.clone(),
    }
}

/// The largest photo stripped of its metadata (it is read whole).
const MAX_STRIPPED_BYTES: u64 = 128 << 20;

/// A MIME type from a file name's extension (the common ones; anything
/// else is `application/octet-stream`).
pub fn mime_type_of(name: &str) -> &'static str {
    let extension = name
        .rsplit_once('.')
        .map(|(_, e)| e.to_ascii_lowercase())
        .unwrap_or_default();
    match extension.as_str() {
        "jpg" | "jpeg" => "image/jpeg",
        "png" => "image/png",
        "gif" => "image/gif",
        "webp" => "image/webp",
        "heic" => "image/heic",
        "ogg" | "opus" => "audio/ogg",
        "m4a" => "audio/mp4",
        "mp3" => "audio/mpeg",
        "wav" => "audio/wav",
        "mp4" => "video/mp4",
        "pdf" => "application/pdf",
        "txt" => "text/plain",
        "zip" => "application/zip",
        _ => "application/octet-stream",
    }
}

/// A sender's file name made safe to save under: its last component, no
/// control or invisible formatting characters (bidirectional overrides,
/// zero-width characters), and no leading dot (a hidden file, such as a
/// shell's startup file, is never proposed); never empty.
pub fn safe_file_name(name: &str) -> String {
    let last = name.rsplit(['/', '\\']).next().unwrap_or_default();
    let cleaned: String = last
        .chars()
        .filter(|c| {
            !c.is_control()
                && !matches!(
                    c,
                    '\u{00ad}'
                        | '\u{061c}'
                        | '\u{180e}'
                        | '\u{200b}'..='\u{200f}'
                        | '\u{202a}'..='\u{202e}'
                        | '\u{2060}'..='\u{2064}'
                        | '\u{2066}'..='\u{2069}'
                        | '\u{feff}'
                )
        })
        .collect();
    match cleaned.trim().trim_start_matches('.').trim() {
        "" => "file".into(),
        name => name.to_owned(),
    }
}

/// How a file is sent.
#[derive(Debug, Clone, Default)]
pub struct FileOptions {
    /// Text shown with it.
    pub caption: Option<String>,
    /// Send a photo as it is, with what its camera wrote into it.
    pub keep_metadata: bool,
}

/// A file ready to be sealed and sent.
pub(super) struct Outgoing {
    pub name: String,
    pub mime_type: String,
    pub caption: String,
    /// The file's own size.
    pub size: u64,
    pub source: Source,
    pub thumbnail: Vec<u8>,
    pub duration_ms: u32,
    pub waveform: Vec<u8>,
    /// The voice note draft it was made from: deleted with the upload's
    /// record, in one transaction.
    pub draft: Option<i64>,
}

/// Where an outgoing file's bytes are read from.
pub(super) enum Source {
    /// Read whole already: a photo stripped of its metadata, a voice note
    /// (never written to disk in the clear).
    Bytes(Vec<u8>),
    /// Streamed while it is sealed.
    File(std::fs::File),
}

/// One attachment row, as a download or a save needs it.
struct Stored {
    blob_id: BlobId,
    key: FileKey,
    digest: [u8; 32],
    size: u64,
    name: String,
    state: AttachmentState,
}

/// An upload recorded before its first byte goes, so it can be resumed.
struct Upload {
    blob_id: BlobId,
    group_id: Vec<u8>,
    uid: [u8; 16],
    attachment: Attachment,
}

/// Why a fetch stopped: a failure to try again later, or a file that did
/// not check out (wrong size, segment or digest).
enum Fetch {
    Failed(ClientError),
    Refused(ClientError),
}

fn io(error: std::io::Error) -> ClientError {
    ClientError::Store(format!("file: {error}"))
}

fn unexpected(request: &str) -> ClientError {
    ClientError::Invalid(format!("unexpected reply to {request}"))
}

impl Client {
    /// Where sealed files are kept.
    fn files_dir(&self) -> Result<PathBuf> {
        let dir = self.inner.home.join("files");
        let mut builder = std::fs::DirBuilder::new();
        builder.recursive(true);
        #[cfg(unix)]
        std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
        builder.create(&dir).map_err(io)?;
        Ok(dir)
    }

    fn sealed_path(&self, blob: &BlobId) -> Result<PathBuf> {
        Ok(self.files_dir()?.join(blob.to_hex()))
    }

    /// Sends the file at `path` into `conversation`, with an optional
    /// caption. Returns the message once the server stored the file and
    /// the message for every recipient. If the connection drops during
    /// the upload, [`Client::resume_uploads`] finishes it later.
    pub async fn send_file(
        &self,
        conversation: &ConversationId,
        path: &Path,
        caption: Option<&str>,
    ) -> Result<Message> {
        let options = FileOptions {
            caption: caption.map(str::to_owned),
            keep_metadata: false,
        };
        self.send_file_with(conversation, path, options).await
    }

    /// [`Client::send_file`], with `options`: a photo's metadata (where
    /// and when it was taken, the camera) is removed first unless
    /// `keep_metadata` (`crate::metadata`).
    pub async fn send_file_with(
        &self,
        conversation: &ConversationId,
        path: &Path,
        options: FileOptions,
    ) -> Result<Message> {
        let caption = options.caption.unwrap_or_default();
        if caption.len() > MAX_CAPTION_BYTES {
            return Err(ClientError::Invalid(format!(
                "a caption holds at most {MAX_CAPTION_BYTES} bytes"
            )));
        }
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .map(safe_file_name)
            .ok_or_else(|| ClientError::Invalid("the path names no file".into()))?;
        if name.len() > MAX_FILE_NAME_BYTES {
            return Err(ClientError::Invalid(format!(
                "a file name holds at most {MAX_FILE_NAME_BYTES} bytes"
            )));
        }
        // An unknown conversation is refused before the file is read.
        self.group_id_of(conversation)?;
        let mut file = std::fs::File::open(path).map_err(io)?;
        let mut size = file.metadata().map_err(io)?.len();
        if size > umbra_proto::content::MAX_ATTACHMENT_SIZE {
            return Err(ClientError::Invalid("the file is too large".into()));
        }
        // The type is the bytes', not the name's: a photo named anything
        // is stripped, and one whose metadata cannot be is not sent
        // unless asked.
        let mut head = Vec::with_capacity(32);
        (&mut file).take(32).read_to_end(&mut head).map_err(io)?;
        file.seek(SeekFrom::Start(0)).map_err(io)?;
        let mime_type = match crate::metadata::sniff(&head) {
            Sniffed::Strippable(mime) => mime,
            Sniffed::Unstrippable(mime, _) if options.keep_metadata => mime,
            Sniffed::Unstrippable(_, what) => {
                return Err(ClientError::Invalid(format!(
                    "{what} files carry where and when they were taken and the camera, and \
                     Umbra cannot remove that from them: convert it to JPEG or PNG first, or \
                     send it as it is (umbra send-file --keep-metadata)"
                )));
            }
            Sniffed::Other => mime_type_of(&name),
        };
        if crate::metadata::strips(mime_type) && size > MAX_STRIPPED_BYTES {
            return Err(ClientError::Invalid(format!(
                "a photo is read whole to remove its metadata, and this one is larger than {} MiB",
                MAX_STRIPPED_BYTES >> 20
            )));
        }
        // A photo is read whole: without what its camera wrote about it
        // (its container rewritten, not streamed), and with a thumbnail.
        let (stripped, thumbnail) = if crate::metadata::strips(mime_type) {
            let mut bytes = Vec::new();
            file.read_to_end(&mut bytes).map_err(io)?;
            let keep = options.keep_metadata;
            let (bytes, thumbnail) = tokio::task::spawn_blocking(move || {
                let bytes = if keep {
                    bytes
                } else {
                    crate::metadata::strip(mime_type, bytes)?
                };
                let thumbnail = crate::thumbnail::make(&bytes).unwrap_or_default();
                Ok::<_, ClientError>((bytes, thumbnail))
            })
            .await
            .map_err(|e| ClientError::Store(e.to_string()))??;
            size = bytes.len() as u64;
            (Some(bytes), thumbnail)
        } else {
            (None, Vec::new())
        };
        let outgoing = Outgoing {
            name,
            mime_type: mime_type.to_owned(),
            caption,
            size,
            source: match stripped {
                Some(bytes) => Source::Bytes(bytes),
                None => Source::File(file),
            },
            thumbnail,
            duration_ms: 0,
            waveform: Vec::new(),
            draft: None,
        };
        self.send_outgoing(conversation, outgoing).await
    }

    /// Seals `outgoing`, uploads it and sends its message into
    /// `conversation`.
    pub(super) async fn send_outgoing(
        &self,
        conversation: &ConversationId,
        outgoing: Outgoing,
    ) -> Result<Message> {
        let Outgoing {
            name,
            mime_type,
            caption,
            size,
            source,
            thumbnail,
            duration_ms,
            waveform,
            draft: from_draft,
        } = outgoing;
        let group_id = self.group_id_of(conversation)?;
        let timer = self.conversation(conversation)?.disappear_after;
        // The blob's size follows from the file's: the server says now
        // whether it takes it, before anything is sealed.
        let blob_id = match self
            .request(Request::CreateBlob {
                group_id: GroupId::new(group_id.clone())?,
                size: seal::sealed_len(size),
                ttl_seconds: transit_ttl(timer),
            })
            .await?
        {
            Reply::BlobCreated { blob_id, .. } => blob_id,
            _ => return Err(unexpected("CreateBlob")),
        };
        // Sealed into a draft first; it becomes `files/<blob>` (what is
        // uploaded, and this device's own copy) once the upload is
        // recorded, so the sweep never finds it without its record.
        let key = FileKey::random()?;
        let mut draft = [0u8; 8];
        getrandom::getrandom(&mut draft).map_err(|e| ClientError::Store(e.to_string()))?;
        let draft = self
            .files_dir()?
            .join(format!("draft-{}", hex::encode(draft)));
        let sealing_key = key.clone();
        let sealing_to = draft.clone();
        let sealed = tokio::task::spawn_blocking(move || {
            let mut output =
                std::io::BufWriter::new(std::fs::File::create(&sealing_to).map_err(io)?);
            let sealed = match source {
                Source::Bytes(bytes) => {
                    seal::seal_file(&sealing_key, size, &mut &bytes[..], &mut output)?
                }
                Source::File(mut file) => seal::seal_file(
                    &sealing_key,
                    size,
                    &mut std::io::BufReader::new(&mut file),
                    &mut output,
                )?,
            };
            output
                .into_inner()
                .map_err(|e| io(e.into_error()))?
                .sync_all()
                .map_err(io)?;
            Ok::<_, ClientError>(sealed)
        })
        .await
        .map_err(|e| ClientError::Store(e.to_string()))?;
        let digest = match sealed {
            Ok((digest, _)) => digest,
            Err(error) => {
                let _ = std::fs::remove_file(&draft);
                return Err(error);
            }
        };
        let mut uid = [0u8; 16];
        getrandom::getrandom(&mut uid).map_err(|e| ClientError::Store(e.to_string()))?;
        let upload = Upload {
            blob_id,
            group_id,
            uid,
            attachment: Attachment {
                blob_id,
                key: *key.as_bytes(),
                digest,
                size,
                mime_type,
                name,
                caption,
                duration_ms,
                waveform,
                thumbnail,
            },
        };
        // The upload is recorded (and its draft, if any, gone) at once.
        {
            let mut db = self.db();
            let tx = db.transaction()?;
            if let Some(id) = from_draft
                && tx.execute("DELETE FROM voice_drafts WHERE id = ?1", [id])? == 0
            {
                let _ = std::fs::remove_file(&draft);
                return Err(ClientError::Invalid(format!(
                    "voice note draft {id} was sent or discarded meanwhile"
                )));
            }
            tx.execute(
                "INSERT INTO uploads (blob_id, uid, group_id, file_key, digest, size, mime_type, name,
                                      caption, thumbnail, duration_ms, waveform)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)",
                params![
                    &blob_id.0[..],
                    &uid[..],
                    upload.group_id,
                    &upload.attachment.key[..],
                    &digest[..],
                    size,
                    upload.attachment.mime_type,
                    upload.attachment.name,
                    upload.attachment.caption,
                    (!upload.attachment.thumbnail.is_empty()).then_some(&upload.attachment.thumbnail),
                    upload.attachment.duration_ms,
                    (!upload.attachment.waveform.is_empty()).then_some(&upload.attachment.waveform)
                ],
            )?;
            tx.commit()?;
        }
        std::fs::rename(&draft, self.sealed_path(&blob_id)?).map_err(io)?;
        self.finish_upload(upload, 0).await
    }

    /// Uploads what the server lacks of `upload`'s blob from `offset` on,
    /// then sends its message.
    async fn finish_upload(&self, upload: Upload, mut offset: u64) -> Result<Message> {
        let path = self.sealed_path(&upload.blob_id)?;
        let mut file = std::fs::File::open(&path).map_err(io)?;
        let total = file.metadata().map_err(io)?.len();
        let mut resets = 0;
        while offset < total {
            // Up to WINDOW requests in flight from `offset` on; the server
            // answers a connection's requests in order.
            let mut in_flight = FuturesOrdered::new();
            let mut asked = offset;
            let mut next = offset;
            let mut refused = false;
            loop {
                while in_flight.len() < WINDOW && asked < total {
                    let length =
                        usize::try_from((total - asked).min(CHUNK as u64)).unwrap_or(CHUNK);
                    let mut data = vec![0u8; length];
                    file.seek(SeekFrom::Start(asked)).map_err(io)?;
                    file.read_exact(&mut data).map_err(io)?;
                    let request = self.request(Request::PutBlob {
                        blob_id: upload.blob_id,
                        offset: asked,
                        data: data.into(),
                    });
                    let end = asked + length as u64;
                    in_flight.push_back(async move { (end, request.await) });
                    asked = end;
                }
                let Some((end, put)) = in_flight.next().await else {
                    break;
                };
                match put {
                    Ok(Reply::BlobState { stored, .. }) if stored == end => next = end,
                    Ok(_) => return Err(unexpected("PutBlob")),
                    // Another attempt got further (or less far) than this
                    // one thought: go on from where the server is.
                    Err(error) if error.server_code() == Some(ErrorCode::BlobOffset) => {
                        refused = true;
                        break;
                    }
                    Err(error) => return Err(error),
                }
                self.emit(Event::Transfer {
                    message_id: None,
                    name: upload.attachment.name.clone(),
                    upload: true,
                    done: next,
                    total,
                });
            }
            // (Requests still in flight are answered and dropped; the
            // status below is answered after them.)
            drop(in_flight);
            if refused {
                next = self.stored_at_server(&upload.blob_id).await?.min(total);
            }
            if next <= offset {
                resets += 1;
                if resets > MAX_OFFSET_RESETS {
                    return Err(ClientError::Invalid(
                        "the server keeps refusing this upload's next bytes; try again later"
                            .into(),
                    ));
                }
            } else {
                resets = 0;
            }
            offset = next;
        }
        // A send made before (its answer lost) is replaced, under the
        // same ID: recipients that got it keep one copy.
        self.db().execute(
            "DELETE FROM messages WHERE uid = ?1 AND direction = 'out' AND state = 'failed'",
            [&upload.uid[..]],
        )?;
        let conversation = ConversationId::from_group(&upload.group_id);
        let id = self
            .send_content_as(
                &conversation,
                Body::Attachment(Box::new(upload.attachment)),
                true,
                upload.uid,
            )
            .await?;
        self.db().execute(
            "DELETE FROM uploads WHERE blob_id = ?1",
            [&upload.blob_id.0[..]],
        )?;
        self.emit(Event::DeliveryStateChanged {
            message_id: id,
            state: DeliveryState::Sent,
        });
        self.message(&conversation, id)
    }

    async fn stored_at_server(&self, blob: &BlobId) -> Result<u64> {
        match self.request(Request::BlobStatus { blob_id: *blob }).await? {
            Reply::BlobState { stored, .. } => Ok(stored),
            _ => Err(unexpected("BlobStatus")),
        }
    }

    /// The uploads a dropped connection interrupted, by file name.
    pub fn pending_uploads(&self) -> Result<Vec<String>> {
        let db = self.db();
        let mut statement = db.prepare("SELECT name FROM uploads ORDER BY rowid")?;
        let rows = statement.query_map([], |row| row.get(0))?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// Gives up every interrupted upload: its record and sealed copy go
    /// (the server deletes its part once it stays idle).
    pub fn cancel_uploads(&self) -> Result<usize> {
        let cancelled = self.db().execute("DELETE FROM uploads", [])?;
        self.sweep_files()?;
        Ok(cancelled)
    }

    /// Finishes the uploads a dropped connection interrupted, each from
    /// where the server's copy ends, and sends their messages. Each is
    /// reported on its own: one that failed does not stop the others. One
    /// that can never go (the server no longer has it, or this device
    /// cannot send to its conversation any more) is given up.
    pub async fn resume_uploads(&self) -> Result<Vec<(String, Result<Message>)>> {
        let uploads: Vec<Upload> = {
            let db = self.db();
            let mut statement = db.prepare(
                "SELECT blob_id, uid, group_id, file_key, digest, size, mime_type, name, caption,
                        thumbnail, duration_ms, waveform
                 FROM uploads ORDER BY rowid",
            )?;
            let rows = statement.query_map([], |row| {
                Ok((
                    row.get::<_, Vec<u8>>(0)?,
                    row.get::<_, Vec<u8>>(1)?,
                    row.get::<_, Vec<u8>>(2)?,
                    row.get::<_, Vec<u8>>(3)?,
                    row.get::<_, Vec<u8>>(4)?,
                    row.get::<_, u64>(5)?,
                    row.get::<_, String>(6)?,
                    row.get::<_, String>(7)?,
                    row.get::<_, String>(8)?,
                    row.get::<_, Option<Vec<u8>>>(9)?,
                    row.get::<_, u32>(10)?,
                    row.get::<_, Option<Vec<u8>>>(11)?,
                ))
            })?;
            let mut uploads = Vec::new();
            for row in rows {
                let (
                    blob,
                    uid,
                    group_id,
                    key,
                    digest,
                    size,
                    mime_type,
                    name,
                    caption,
                    thumbnail,
                    duration_ms,
                    waveform,
                ) = row?;
                let blob_id = BlobId::from_slice(&blob)?;
                let corrupt = |_| ClientError::Store("an upload's row".into());
                uploads.push(Upload {
                    blob_id,
                    group_id,
                    uid: uid.try_into().map_err(corrupt)?,
                    attachment: Attachment {
                        blob_id,
                        key: key.try_into().map_err(corrupt)?,
                        digest: digest.try_into().map_err(corrupt)?,
                        size,
                        mime_type,
                        name,
                        caption,
                        duration_ms,
                        waveform: waveform.unwrap_or_default(),
                        thumbnail: thumbnail.unwrap_or_default(),
                    },
                });
            }
            uploads
        };
        let mut outcomes = Vec::new();
        for upload in uploads {
            let (blob_id, name) = (upload.blob_id, upload.attachment.name.clone());
            let outcome = match self.stored_at_server(&blob_id).await {
                Ok(stored) => self.finish_upload(upload, stored).await,
                Err(error) => Err(error),
            };
            let hopeless = outcome.as_ref().is_err_and(|error| {
                matches!(
                    error.server_code(),
                    Some(ErrorCode::UnknownBlob | ErrorCode::NotAMember | ErrorCode::UnknownGroup)
                ) || matches!(
                    error,
                    ClientError::NotAMember | ClientError::UnknownConversation(_)
                )
            });
            if hopeless {
                self.db()
                    .execute("DELETE FROM uploads WHERE blob_id = ?1", [&blob_id.0[..]])?;
                self.sweep_files()?;
            }
            outcomes.push((name, outcome));
        }
        Ok(outcomes)
    }

    fn stored_attachment(&self, message_id: i64) -> Result<Stored> {
        let row = self
            .db()
            .query_row(
                "SELECT blob_id, file_key, digest, size, name, state FROM attachments
                 WHERE message_id = ?1",
                [message_id],
                |row| {
                    Ok((
                        row.get::<_, Vec<u8>>(0)?,
                        row.get::<_, Vec<u8>>(1)?,
                        row.get::<_, Vec<u8>>(2)?,
                        row.get::<_, u64>(3)?,
                        row.get::<_, String>(4)?,
                        row.get::<_, String>(5)?,
                    ))
                },
            )
            .optional()?
            .ok_or_else(|| ClientError::Invalid(format!("message {message_id} carries no file")))?;
        let (blob, key, digest, size, name, state) = row;
        let corrupt = |_| ClientError::Store("an attachment's row".into());
        Ok(Stored {
            blob_id: BlobId::from_slice(&blob)?,
            key: FileKey::from_bytes(key.try_into().map_err(corrupt)?),
            digest: digest.try_into().map_err(corrupt)?,
            size,
            name,
            state: AttachmentState::parse(&state),
        })
    }

    /// Fetches message `message_id`'s file from the server (resuming a
    /// fetch that was cut off), checks every segment as it arrives and
    /// the whole against the digest its sender signed into the message,
    /// keeps it sealed on this device and tells the server this device
    /// has it. Nothing to do if it is here already. A file that does not
    /// check out is marked `Invalid` (not fetched again unless asked).
    pub async fn fetch_attachment(&self, message_id: i64) -> Result<AttachmentState> {
        let blob = self.stored_attachment(message_id)?.blob_id;
        let lock = self.fetch_lock(blob);
        let _fetching = lock.lock().await;
        let stored = self.stored_attachment(message_id)?;
        if stored.state.is_here() {
            return Ok(stored.state);
        }
        if stored.state == AttachmentState::Gone {
            return Err(ClientError::Invalid(
                "the server no longer has this file".into(),
            ));
        }
        // Another message named this blob: it is not fetched twice.
        match self.named_before(message_id, &stored)? {
            Some(AttachmentState::Fetched) => {
                self.db().execute(
                    "UPDATE attachments SET state = 'fetched' WHERE message_id = ?1",
                    [message_id],
                )?;
                return Ok(AttachmentState::Fetched);
            }
            Some(_) => {
                self.db().execute(
                    "UPDATE attachments SET state = 'invalid' WHERE message_id = ?1",
                    [message_id],
                )?;
                return Err(ClientError::Invalid(
                    "another message named this file with other contents; it is not fetched \
                     again"
                        .into(),
                ));
            }
            None => {}
        }
        let part = self
            .files_dir()?
            .join(format!("{}.part", stored.blob_id.to_hex()));
        let fetched = self.fetch_into(message_id, &stored, &part).await;
        match fetched {
            Ok(()) => {}
            Err(Fetch::Failed(error)) => return Err(error),
            Err(Fetch::Refused(error)) => {
                let _ = std::fs::remove_file(&part);
                self.db().execute(
                    "UPDATE attachments SET state = 'invalid' WHERE message_id = ?1",
                    [message_id],
                )?;
                return Err(error);
            }
        }
        std::fs::rename(&part, self.sealed_path(&stored.blob_id)?).map_err(io)?;
        self.db().execute(
            "UPDATE attachments SET state = 'fetched' WHERE message_id = ?1",
            [message_id],
        )?;
        // The server deletes it once every recipient device said so. Said
        // without waiting for the answer, so the next file's download does
        // not wait for the server's write; a failure only keeps it there
        // until it expires.
        let (client, blob_id) = (self.clone(), stored.blob_id);
        tokio::spawn(async move {
            if let Err(error) = client.request(Request::BlobFetched { blob_id }).await {
                tracing::debug!(%error, "telling the server a file was fetched failed");
            }
        });
        Ok(AttachmentState::Fetched)
    }

    /// The lock one fetch of `blob` holds.
    fn fetch_lock(&self, blob: BlobId) -> std::sync::Arc<tokio::sync::Mutex<()>> {
        let mut fetching = self
            .inner
            .fetching
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        // Locks nobody holds or waits for any more go.
        fetching.retain(|_, lock| std::sync::Arc::strong_count(lock) > 1);
        std::sync::Arc::clone(fetching.entry(blob).or_default())
    }

    /// What other messages that name `stored`'s blob say of it: a copy
    /// here under the same key and digest is this one's too (`Fetched`);
    /// a copy here under another, or a refusal under the same key, means
    /// this reference is false (`Invalid`): a member repeating one blob
    /// in many messages costs this device one download, not one each.
    fn named_before(&self, message_id: i64, stored: &Stored) -> Result<Option<AttachmentState>> {
        let db = self.db();
        let mut statement = db.prepare_cached(
            "SELECT file_key, digest, state FROM attachments
             WHERE blob_id = ?1 AND message_id != ?2 AND state IN ('sent', 'fetched', 'invalid')",
        )?;
        let rows = statement.query_map(params![&stored.blob_id.0[..], message_id], |row| {
            Ok((
                row.get::<_, Vec<u8>>(0)?,
                row.get::<_, Vec<u8>>(1)?,
                AttachmentState::parse(&row.get::<_, String>(2)?),
            ))
        })?;
        let mut verdict = None;
        for row in rows {
            let (key, digest, state) = row?;
            let same_key = key.as_slice() == stored.key.as_bytes();
            let same = same_key && digest.as_slice() == stored.digest;
            match state {
                AttachmentState::Sent | AttachmentState::Fetched if same => {
                    return Ok(Some(AttachmentState::Fetched));
                }
                AttachmentState::Sent | AttachmentState::Fetched => {
                    verdict = Some(AttachmentState::Invalid);
                }
                AttachmentState::Invalid if same_key => verdict = Some(AttachmentState::Invalid),
                _ => {}
            }
        }
        Ok(verdict)
    }

    /// Fetches `stored`'s blob into `part`, from where an earlier attempt
    /// left it, checked as it comes; durable when it returns.
    async fn fetch_into(&self, message_id: i64, stored: &Stored, part: &Path) -> Result<(), Fetch> {
        let expected = seal::sealed_len(stored.size);
        // What an earlier attempt fetched is checked again from the start;
        // if it does not check out (a crash mid-write), it starts over.
        let (key, size, path) = (stored.key.clone(), stored.size, part.to_owned());
        let resumed = tokio::task::spawn_blocking(move || {
            let mut file = std::fs::OpenOptions::new()
                .create(true)
                .truncate(false)
                .read(true)
                .write(true)
                .open(&path)?;
            let mut checker = Checker::new(key.clone(), size);
            let mut have = file.metadata()?.len().min(expected);
            let mut buffer = vec![0u8; SEALED_SEGMENT];
            let mut read = 0;
            while read < have {
                let length = usize::try_from((have - read).min(SEALED_SEGMENT as u64))
                    .unwrap_or(SEALED_SEGMENT);
                file.read_exact(&mut buffer[..length])?;
                if checker.update(&buffer[..length]).is_err() {
                    checker = Checker::new(key, size);
                    have = 0;
                    break;
                }
                read += length as u64;
            }
            file.set_len(have)?;
            file.seek(SeekFrom::Start(have))?;
            Ok::<_, std::io::Error>((file, checker, have))
        })
        .await
        .map_err(|e| Fetch::Failed(ClientError::Store(e.to_string())))?;
        let (mut file, mut checker, mut offset) = resumed.map_err(|e| Fetch::Failed(io(e)))?;
        // Up to WINDOW requests in flight, answered in order.
        let mut in_flight = FuturesOrdered::new();
        let mut asked = offset;
        while offset < expected {
            while in_flight.len() < WINDOW && asked < expected {
                let length = u32::try_from((expected - asked).min(CHUNK as u64)).unwrap_or(0);
                let request = self.request(Request::GetBlob {
                    blob_id: stored.blob_id,
                    offset: asked,
                    length,
                });
                in_flight.push_back(async move { (length, request.await) });
                asked += u64::from(length);
            }
            let Some((length, got)) = in_flight.next().await else {
                break;
            };
            let data = match got {
                Ok(Reply::BlobData { data, size }) => {
                    if size != expected {
                        return Err(Fetch::Refused(ClientError::Invalid(format!(
                            "the server's copy of this file is {size} bytes, not the {expected} its sender sealed"
                        ))));
                    }
                    // Within the blob, the server sends every byte asked.
                    if data.len() as u64 != u64::from(length) {
                        return Err(Fetch::Failed(unexpected("GetBlob")));
                    }
                    data
                }
                Ok(_) => return Err(Fetch::Failed(unexpected("GetBlob"))),
                Err(error) if error.server_code() == Some(ErrorCode::UnknownBlob) => {
                    let _ = std::fs::remove_file(part);
                    self.db()
                        .execute(
                            "UPDATE attachments SET state = 'gone' WHERE message_id = ?1",
                            [message_id],
                        )
                        .map_err(|e| Fetch::Failed(e.into()))?;
                    return Err(Fetch::Failed(ClientError::Invalid(
                        "the server no longer has this file (it expired, or its sender's upload was never finished)"
                            .into(),
                    )));
                }
                Err(error) => return Err(Fetch::Failed(error)),
            };
            checker.update(&data).map_err(Fetch::Refused)?;
            file.write_all(&data).map_err(|e| Fetch::Failed(io(e)))?;
            offset += data.len() as u64;
            self.emit(Event::Transfer {
                message_id: Some(message_id),
                name: stored.name.clone(),
                upload: false,
                done: offset,
                total: expected,
            });
        }
        checker.finish(&stored.digest).map_err(Fetch::Refused)?;
        // Syncing up to a hundred MiB blocks: not on the runtime's threads.
        tokio::task::spawn_blocking(move || file.sync_all())
            .await
            .map_err(|e| Fetch::Failed(ClientError::Store(e.to_string())))?
            .map_err(|e| Fetch::Failed(io(e)))?;
        Ok(())
    }

    /// Fetches every file received and not fetched yet; returns how many
    /// came. One the server refuses or that does not check out is left
    /// (and logged); only a lost connection stops the others.
    pub async fn fetch_attachments(&self) -> Result<usize> {
        let waiting: Vec<i64> = {
            let db = self.db();
            let mut statement =
                db.prepare("SELECT message_id FROM attachments WHERE state = 'available'")?;
            let rows = statement.query_map([], |row| row.get(0))?;
            rows.collect::<rusqlite::Result<_>>()?
        };
        let mut fetched = 0;
        for message_id in waiting {
            match self.fetch_attachment(message_id).await {
                Ok(_) => fetched += 1,
                Err(error @ (ClientError::ConnectionLost | ClientError::NotConnected)) => {
                    return Err(error);
                }
                Err(error) => {
                    tracing::warn!(%error, message_id, "a file could not be fetched");
                }
            }
        }
        Ok(fetched)
    }

    /// Writes message `message_id`'s file, opened, to `destination` (a
    /// new file: an existing one is not overwritten). Returns its size.
    pub async fn save_attachment(&self, message_id: i64, destination: &Path) -> Result<u64> {
        let mut stored = self.stored_attachment(message_id)?;
        if !stored.state.is_here() {
            self.fetch_attachment(message_id).await?;
            stored = self.stored_attachment(message_id)?;
        }
        let sealed = self.sealed_path(&stored.blob_id)?;
        let destination = destination.to_owned();
        tokio::task::spawn_blocking(move || {
            let mut input = std::io::BufReader::new(std::fs::File::open(&sealed).map_err(io)?);
            #[cfg(unix)]
            use std::os::unix::fs::OpenOptionsExt;
            // Readable by its owner only, as the device's own files are.
            let output = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&destination)
                .map_err(io)?;
            let mut output = std::io::BufWriter::new(output);
            let opened = seal::open_file(&stored.key, stored.size, &mut input, &mut output)
                .and_then(|()| output.flush().map_err(io));
            if opened.is_err() {
                drop(output);
                let _ = std::fs::remove_file(&destination);
            }
            opened.map(|()| stored.size)
        })
        .await
        .map_err(|e| ClientError::Store(e.to_string()))?
    }

    /// Message `message_id`'s file, opened into memory (fetched first if
    /// it is not here yet), if it is at most `max` bytes: a voice note to
    /// play, never written to disk in the clear.
    pub(super) async fn open_attachment(
        &self,
        message_id: i64,
        max: u64,
    ) -> Result<(String, zeroize::Zeroizing<Vec<u8>>)> {
        let mut stored = self.stored_attachment(message_id)?;
        if stored.size > max {
            return Err(ClientError::Invalid(format!(
                "message {message_id}'s file is larger than {} MiB",
                max >> 20
            )));
        }
        if !stored.state.is_here() {
            self.fetch_attachment(message_id).await?;
            stored = self.stored_attachment(message_id)?;
        }
        let mime_type: String = self.db().query_row(
            "SELECT mime_type FROM attachments WHERE message_id = ?1",
            [message_id],
            |row| row.get(0),
        )?;
        let sealed = self.sealed_path(&stored.blob_id)?;
        let bytes = tokio::task::spawn_blocking(move || {
            let mut input = std::io::BufReader::new(std::fs::File::open(&sealed).map_err(io)?);
            let mut output = zeroize::Zeroizing::new(Vec::with_capacity(stored.size as usize));
            seal::open_file(&stored.key, stored.size, &mut input, &mut *output)?;
            Ok::<_, ClientError>(output)
        })
        .await
        .map_err(|e| ClientError::Store(e.to_string()))??;
        Ok((mime_type, bytes))
    }

    /// Message `message_id`'s photo (JPEG or PNG), opened into memory and
    /// decoded to be drawn (fetched first if it is not here yet); `None`
    /// if its file is not a photo this device can decode.
    pub async fn photo(&self, message_id: i64) -> Result<Option<image::DynamicImage>> {
        let mime_type: Option<String> = self
            .db()
            .query_row(
                "SELECT mime_type FROM attachments WHERE message_id = ?1",
                [message_id],
                |row| row.get(0),
            )
            .optional()?;
        if !mime_type.is_some_and(|m| matches!(m.as_str(), "image/jpeg" | "image/png")) {
            return Ok(None);
        }
        let (_, bytes) = self.open_attachment(message_id, MAX_STRIPPED_BYTES).await?;
        tokio::task::spawn_blocking(move || crate::thumbnail::photo(&bytes))
            .await
            .map_err(|e| ClientError::Store(e.to_string()))
    }

    /// Message `message_id`'s thumbnail (a small JPEG from its sender, to
    /// be read with `crate::thumbnail::picture`), if it came with one.
    pub fn thumbnail(&self, message_id: i64) -> Result<Option<Vec<u8>>> {
        Ok(self
            .db()
            .query_row(
                "SELECT thumbnail FROM attachments WHERE message_id = ?1",
                [message_id],
                |row| row.get::<_, Option<Vec<u8>>>(0),
            )
            .optional()?
            .flatten())
    }

    /// Deletes every sealed file (and part of one) whose message is gone,
    /// and drafts left by an interrupted send.
    pub(crate) fn sweep_files(&self) -> Result<usize> {
        let dir = self.inner.home.join("files");
        let Ok(entries) = std::fs::read_dir(&dir) else {
            return Ok(0);
        };
        let db = self.db();
        let mut known = db.prepare_cached(
            "SELECT EXISTS (SELECT 1 FROM attachments WHERE blob_id = ?1)
                 OR EXISTS (SELECT 1 FROM uploads WHERE blob_id = ?1)",
        )?;
        let mut removed = 0;
        for entry in entries {
            let entry = entry.map_err(io)?;
            let name = entry.file_name();
            let name = name.to_string_lossy();
            let blob = name.strip_suffix(".part").unwrap_or(&name);
            let keep = match BlobId::from_hex(blob) {
                Ok(id) => known.query_row([&id.0[..]], |row| row.get::<_, bool>(0))?,
                // A draft belongs to a send under way in this process only
                // while it runs; an old one was interrupted.
                Err(_) => name.starts_with("draft-") && is_recent(&entry),
            };
            if !keep {
                std::fs::remove_file(entry.path()).map_err(io)?;
                removed += 1;
            }
        }
        Ok(removed)
    }
}

/// Whether a file was modified in the last hour.
fn is_recent(entry: &std::fs::DirEntry) -> bool {
    entry
        .metadata()
        .and_then(|m| m.modified())
        .ok()
        .and_then(|at| at.elapsed().ok())
        .is_some_and(|age| age < std::time::Duration::from_secs(3600))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn senders_file_names_cannot_name_a_path() {
        assert_eq!(safe_file_name("../../etc/passwd"), "passwd");
        assert_eq!(safe_file_name("C:\\x\\evil.exe"), "evil.exe");
        assert_eq!(safe_file_name(".."), "file");
        assert_eq!(safe_file_name("a\u{202e}gpj.exe"), "agpj.exe");
        assert_eq!(safe_file_name("cat.png"), "cat.png");
        assert_eq!(safe_file_name(".zshenv"), "zshenv");
        assert_eq!(safe_file_name("..bash_profile"), "bash_profile");
        assert_eq!(safe_file_name("\u{200b}.profile"), "profile");
        assert_eq!(safe_file_name("in\u{feff}voice.pdf"), "invoice.pdf");
        assert_eq!(safe_file_name("..."), "file");
        assert_eq!(mime_type_of("Cat.PNG"), "image/png");
        assert_eq!(mime_type_of("noext"), "application/octet-stream");
    }
}
