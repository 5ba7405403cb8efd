//! What travels inside MLS application messages: the plaintext format that
//! every Umbra client speaks. Decoded only on devices.

use prost::Message;

use crate::wire::{self, content};
use crate::{DecodeError, MAX_FRAME_BYTES};

/// Longest group name accepted, in bytes.
pub const MAX_GROUP_NAME_BYTES: usize = 128;

#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Body {
    Text(String),
    GroupName(String),
}

/// One decrypted application message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Content {
    pub body: Body,
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
        };
        wire::Content {
            body: Some(body),
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
        };
        Ok(Content {
            body,
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
            disappear_after: 30,
            sent_at_ms: 42,
        };
        assert_eq!(Content::decode(&content.encode()), Ok(content));
        assert!(Content::decode(&[0xff, 0xff]).is_err());
        assert_eq!(Content::decode(&[]), Err(DecodeError::Missing("body")));
    }
}
