//! Attachments' blobs: the ciphertext of a file, uploaded in chunks over the
//! device's connection, fetched by the other devices of the conversation,
//! and deleted once each has fetched it or when it expires
//! (`docs/protocol.md`, "Attachments").
//!
//! The server learns a blob's size (padded by the device to a bucket), its
//! conversation, who uploaded it and which devices fetched it: nothing of
//! the file. The key, digest, name and type travel inside the MLS
//! application message that refers to the blob ([`crate::content`]).

use std::fmt;

use crate::DecodeError;

/// Most bytes one `PutBlob` carries or one `GetBlob` asks for (below the
/// frame limit, with room for the request around it).
pub const MAX_BLOB_CHUNK: usize = 768 * 1024;

/// The shortest lifetime of a blob, whatever the conversation's timer: a
/// recipient offline for a few hours still gets the file.
pub const MIN_BLOB_TTL_SECS: u64 = 24 * 3600;

/// A blob's random ID, drawn by the server. Knowing it is not enough to
/// read the blob: only the uploader and the conversation's members may.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BlobId(pub [u8; 16]);

impl BlobId {
    pub fn from_slice(bytes: &[u8]) -> Result<Self, DecodeError> {
        Ok(BlobId(bytes.try_into().map_err(|_| {
            DecodeError::invalid("blob_id", format!("{} bytes, expected 16", bytes.len()))
        })?))
    }

    /// Lower-case hex, for file names and people.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    pub fn from_hex(text: &str) -> Result<Self, DecodeError> {
        let bytes = hex::decode(text).map_err(|_| DecodeError::invalid("blob_id", "hex"))?;
        Self::from_slice(&bytes)
    }
}

// Only a prefix: logs need not say which blob.
impl fmt::Debug for BlobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "BlobId({}…)", hex::encode(&self.0[..2]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blob_ids_parse_only_at_their_length_and_debug_shows_a_prefix() {
        let id = BlobId([0xab; 16]);
        assert_eq!(BlobId::from_hex(&id.to_hex()), Ok(id));
        assert!(BlobId::from_slice(&[1; 15]).is_err());
        assert!(BlobId::from_hex("zz").is_err());
        assert_eq!(format!("{id:?}"), "BlobId(abab…)");
    }
}
