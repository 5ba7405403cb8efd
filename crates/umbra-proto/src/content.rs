//! What travels inside MLS application messages: the plaintext format that
//! every Umbra client speaks. Decoded only on devices.

use prost::Message;

use crate::wire::{self, content};
use crate::{DecodeError, MAX_FRAME_BYTES};

/// Longest group name accepted, in bytes.
pub const MAX_GROUP_NAME_BYTES: usize = 128;

/// Most message IDs one receipt may carry.
pub const MAX_RECEIPT_IDS: usize = 1000;

pub use crate::wire::ReceiptKind;

#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Body {
    Text(String),
    GroupName(String),
    Receipt {
        kind: ReceiptKind,
        message_ids: Vec<[u8; 16]>,
    },
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
}
