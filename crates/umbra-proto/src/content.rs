//! What travels inside MLS application messages: the plaintext format that
//! every Umbra client speaks. Decoded only on devices.

use prost::Message;

use crate::blobs::BlobId;
use crate::wire::{self, content};
use crate::{DecodeError, MAX_FRAME_BYTES};

/// Longest group name accepted, in bytes.
pub const MAX_GROUP_NAME_BYTES: usize = 128;

/// Most message IDs one receipt may carry.
pub const MAX_RECEIPT_IDS: usize = 1000;

pub use crate::wire::ReceiptKind;

/// Longest attachment file name, in bytes.
pub const MAX_FILE_NAME_BYTES: usize = 255;
/// Longest MIME type, in bytes.
pub const MAX_MIME_TYPE_BYTES: usize = 127;
/// Longest caption, in bytes.
pub const MAX_CAPTION_BYTES: usize = 4096;
/// Largest thumbnail, in bytes.
pub const MAX_THUMBNAIL_BYTES: usize = 64 * 1024;
/// Most waveform levels a voice note carries.
pub const MAX_WAVEFORM_LEVELS: usize = 256;
/// Largest file size an attachment may state (1 TiB: far above any
/// server's limit, and within every store's integers).
pub const MAX_ATTACHMENT_SIZE: u64 = 1 << 40;

/// A file sent in a conversation: its blob at the server, the key that
/// opens it and what describes it. Its `Debug` leaves out the key.
#[derive(Clone, PartialEq, Eq)]
pub struct Attachment {
    pub blob_id: BlobId,
    /// Fresh for each file; opens the blob (ChaCha20-Poly1305, STREAM).
    pub key: [u8; 32],
    /// SHA-256 of the blob as uploaded.
    pub digest: [u8; 32],
    /// The file's own size, before padding.
    pub size: u64,
    pub mime_type: String,
    /// As the sender named it: a device must not trust it as a path.
    pub name: String,
    pub caption: String,
    /// Voice notes: length, and one level (0-255) per slice of time.
    pub duration_ms: u32,
    pub waveform: Vec<u8>,
    /// Images: a small preview.
    pub thumbnail: Vec<u8>,
}

impl std::fmt::Debug for Attachment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Attachment")
            .field("blob_id", &self.blob_id)
            .field("size", &self.size)
            .field("mime_type", &self.mime_type)
            .field("name_bytes", &self.name.len())
            .field("duration_ms", &self.duration_ms)
            .finish_non_exhaustive()
    }
}

impl Attachment {
    fn to_wire(&self) -> wire::Attachment {
        wire::Attachment {
            blob_id: self.blob_id.0.to_vec(),
            key: self.key.to_vec(),
            digest: self.digest.to_vec(),
            size: self.size,
            mime_type: self.mime_type.clone(),
            name: self.name.clone(),
            caption: self.caption.clone(),
            duration_ms: self.duration_ms,
            waveform: self.waveform.clone(),
            thumbnail: self.thumbnail.clone(),
        }
    }

    fn from_wire(raw: wire::Attachment) -> Result<Self, DecodeError> {
        let bounded = |field: &'static str, len: usize, max: usize| {
            if len > max {
                Err(DecodeError::invalid(field, format!("at most {max} bytes")))
            } else {
                Ok(())
            }
        };
        bounded("name", raw.name.len(), MAX_FILE_NAME_BYTES)?;
        bounded("mime_type", raw.mime_type.len(), MAX_MIME_TYPE_BYTES)?;
        bounded("caption", raw.caption.len(), MAX_CAPTION_BYTES)?;
        bounded("thumbnail", raw.thumbnail.len(), MAX_THUMBNAIL_BYTES)?;
        bounded("waveform", raw.waveform.len(), MAX_WAVEFORM_LEVELS)?;
        if raw.size > MAX_ATTACHMENT_SIZE {
            return Err(DecodeError::invalid("size", "at most 1 TiB"));
        }
        Ok(Attachment {
            blob_id: BlobId::from_slice(&raw.blob_id)?,
            key: <[u8; 32]>::try_from(raw.key.as_slice())
                .map_err(|_| DecodeError::invalid("key", "32 bytes"))?,
            digest: <[u8; 32]>::try_from(raw.digest.as_slice())
                .map_err(|_| DecodeError::invalid("digest", "32 bytes"))?,
            size: raw.size,
            mime_type: raw.mime_type,
            name: raw.name,
            caption: raw.caption,
            duration_ms: raw.duration_ms,
            waveform: raw.waveform,
            thumbnail: raw.thumbnail,
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Body {
    Text(String),
    GroupName(String),
    Receipt {
        kind: ReceiptKind,
        message_ids: Vec<[u8; 16]>,
    },
    Attachment(Box<Attachment>),
}

/// One decrypted application message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Content {
    pub body: Body,
    /// A text's own ID, which receipts refer to.
    pub message_id: Option<[u8; 16]>,
    /// The disappearing timer the sender saw, in seconds (0 = off).
    pub disappear_after: u32,
    /// Sender's clock, Unix milliseconds (informational: it is not trusted
    /// for ordering or expiry).
    pub sent_at_ms: u64,
}

impl Content {
    pub fn encode(&self) -> Vec<u8> {
        let body = match &self.body {
            Body::Text(body) => content::Body::Text(wire::Text { body: body.clone() }),
            Body::GroupName(name) => {
                content::Body::GroupName(wire::GroupName { name: name.clone() })
            }
            Body::Receipt { kind, message_ids } => content::Body::Receipt(wire::Receipt {
                kind: *kind as i32,
                message_ids: message_ids.iter().map(|id| id.to_vec()).collect(),
            }),
            Body::Attachment(attachment) => content::Body::Attachment(attachment.to_wire()),
        };
        wire::Content {
            body: Some(body),
            message_id: self.message_id.map(|id| id.to_vec()).unwrap_or_default(),
            disappear_after: self.disappear_after,
            sent_at_ms: self.sent_at_ms,
        }
        .encode_to_vec()
    }

    pub fn decode(bytes: &[u8]) -> Result<Content, DecodeError> {
        if bytes.len() > MAX_FRAME_BYTES {
            return Err(DecodeError::TooLarge {
                len: bytes.len(),
                max: MAX_FRAME_BYTES,
            });
        }
        let raw = wire::Content::decode(bytes).map_err(|e| DecodeError::Protobuf(e.to_string()))?;
        let body = match raw.body.ok_or(DecodeError::Missing("body"))? {
            content::Body::Text(text) => Body::Text(text.body),
            content::Body::GroupName(group) => {
                if group.name.len() > MAX_GROUP_NAME_BYTES {
                    return Err(DecodeError::invalid(
                        "group_name",
                        format!("longer than {MAX_GROUP_NAME_BYTES} bytes"),
                    ));
                }
                Body::GroupName(group.name)
            }
            content::Body::Receipt(receipt) => {
                let kind = match ReceiptKind::try_from(receipt.kind) {
                    Ok(kind @ (ReceiptKind::Delivered | ReceiptKind::Read)) => kind,
                    _ => return Err(DecodeError::invalid("receipt", "DELIVERED or READ")),
                };
                if receipt.message_ids.len() > MAX_RECEIPT_IDS {
                    return Err(DecodeError::invalid(
                        "receipt",
                        format!("at most {MAX_RECEIPT_IDS} message IDs"),
                    ));
                }
                Body::Receipt {
                    kind,
                    message_ids: receipt
                        .message_ids
                        .iter()
                        .map(|id| {
                            <[u8; 16]>::try_from(id.as_slice())
                                .map_err(|_| DecodeError::invalid("message_id", "16 bytes"))
                        })
                        .collect::<Result<_, _>>()?,
                }
            }
            content::Body::Attachment(raw) => {
                Body::Attachment(Box::new(Attachment::from_wire(raw)?))
            }
        };
        let message_id = match raw.message_id.len() {
            0 => None,
            16 => <[u8; 16]>::try_from(raw.message_id.as_slice()).ok(),
            _ => return Err(DecodeError::invalid("message_id", "16 bytes")),
        };
        Ok(Content {
            body,
            message_id,
            disappear_after: raw.disappear_after,
            sent_at_ms: raw.sent_at_ms,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_round_trips_and_rejects_garbage() {
        let content = Content {
            body: Body::Text("héllo ✓".into()),
            message_id: Some([7; 16]),
            disappear_after: 30,
            sent_at_ms: 42,
        };
        assert_eq!(Content::decode(&content.encode()), Ok(content));
        assert!(Content::decode(&[0xff, 0xff]).is_err());
        assert_eq!(Content::decode(&[]), Err(DecodeError::Missing("body")));
    }

    #[test]
    fn attachments_round_trip_are_bounded_and_keep_their_key_out_of_debug() {
        let attachment = Attachment {
            blob_id: BlobId([1; 16]),
            key: [0x42; 32],
            digest: [3; 32],
            size: 1234,
            mime_type: "image/png".into(),
            name: "cat.png".into(),
            caption: "look".into(),
            duration_ms: 0,
            waveform: vec![],
            thumbnail: vec![9; 10],
        };
        let content = Content {
            body: Body::Attachment(Box::new(attachment.clone())),
            message_id: Some([7; 16]),
            disappear_after: 0,
            sent_at_ms: 1,
        };
        assert_eq!(Content::decode(&content.encode()), Ok(content.clone()));
        let debug = format!("{content:?}");
        assert!(
            !debug.contains("66, 66") && !debug.contains("cat"),
            "{debug}"
        );
        let long = Content {
            body: Body::Attachment(Box::new(Attachment {
                name: "x".repeat(MAX_FILE_NAME_BYTES + 1),
                ..attachment.clone()
            })),
            ..content.clone()
        };
        assert!(Content::decode(&long.encode()).is_err());
        // A size no file has (a device would fail to record it, and retry
        // the delivery for ever).
        let huge = Content {
            body: Body::Attachment(Box::new(Attachment {
                size: MAX_ATTACHMENT_SIZE + 1,
                ..attachment.clone()
            })),
            ..content.clone()
        };
        assert!(Content::decode(&huge.encode()).is_err());
        let mut raw = attachment.to_wire();
        raw.key.pop();
        let broken = wire::Content {
            body: Some(content::Body::Attachment(raw)),
            ..Default::default()
        };
        assert!(Content::decode(&broken.encode_to_vec()).is_err());
    }
}
