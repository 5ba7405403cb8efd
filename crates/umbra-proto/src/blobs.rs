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

/// Plaintext bytes per sealed segment of a file (`docs/protocol.md`,
/// "Attachments").
pub const SEGMENT: usize = 64 * 1024;
/// The authentication tag each sealed segment carries.
pub const TAG: usize = 16;
/// Bytes a whole segment takes sealed.
pub const SEALED_SEGMENT: usize = SEGMENT + TAG;
/// The smallest bucket a file is padded to.
pub const MIN_PADDED: u64 = SEGMENT as u64;

/// The bucket a file of `size` bytes is padded to: at least
/// [`MIN_PADDED`], above it the Padmé bucket (Nikitin et al., "Reducing
/// Metadata Leakage from Encrypted Files and Communication with PURBs"),
/// at most 1/32 larger, leaking O(log log size) bits of the size.
pub fn padded_len(size: u64) -> u64 {
    if size <= MIN_PADDED {
        return MIN_PADDED;
    }
    // Keep the top bits of the size that say its order of magnitude's
    // order of magnitude; round the rest up.
    let e = 63 - u64::from(size.leading_zeros()); // floor(log2 size)
    let s = 64 - u64::from(e.leading_zeros()); // floor(log2 e) + 1
    let mask = (1u64 << (e - s)) - 1;
    size.saturating_add(mask) & !mask
}

/// How many segments a padded plaintext of `padded` bytes takes (at
/// least one).
pub fn segments(padded: u64) -> u64 {
    padded.div_ceil(SEGMENT as u64).max(1)
}

/// The blob's size for a file of `size` bytes: what the server sees.
pub fn sealed_len(size: u64) -> u64 {
    let padded = padded_len(size);
    padded + segments(padded) * TAG as u64
}

/// Whether a blob of `size` bytes can hold a sealed file: some bucket
/// [`padded_len`] gives, sealed. A server refuses any other size, so that
/// no line can fill it with blobs smaller than a device ever makes.
pub fn is_sealed_len(size: u64) -> bool {
    // Every segment but the last is whole; the last holds 1 to SEGMENT
    // bytes and its tag, so the segment count follows from the size.
    let count = size.div_ceil(SEALED_SEGMENT as u64);
    let Some(padded) = size.checked_sub(count.saturating_mul(TAG as u64)) else {
        return false;
    };
    padded >= MIN_PADDED && padded_len(padded) == padded && sealed_len(padded) == size
}

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

    #[test]
    fn buckets_hide_small_differences_and_cost_little() {
        assert_eq!(padded_len(0), MIN_PADDED);
        assert_eq!(
            padded_len(9_000),
            padded_len(12_000),
            "a 3 s and a 4 s voice note"
        );
        for size in [
            65_537u64,
            1 << 20,
            3_000_001,
            20 << 20,
            100 << 20,
            (1 << 40) + 1,
        ] {
            let padded = padded_len(size);
            assert!(
                padded >= size && padded - size <= size / 32,
                "{size} -> {padded}"
            );
        }
        assert_eq!(padded_len(20_000_000), padded_len(20_100_000));
        assert_eq!(
            sealed_len(100_000),
            100_352 + 2 * 16,
            "protocol.md's example"
        );
    }

    #[test]
    fn only_sealed_files_sizes_are_blob_sizes() {
        let mut sizes = vec![0u64, 1, 65_536, 65_537, 100_000, 1 << 20, 3_000_001];
        sizes.extend((0..400).map(|i| 60_000 + i * 7_919));
        sizes.extend([100 << 20, (1 << 40) + 1]);
        for size in sizes {
            let sealed = sealed_len(size);
            assert!(is_sealed_len(sealed), "{size} sealed is {sealed}");
            assert!(!is_sealed_len(sealed - 1), "{sealed} - 1");
            assert!(!is_sealed_len(sealed + 1), "{sealed} + 1");
        }
        for size in [0, 1, 10, 65_551, 65_553, u64::MAX] {
            assert!(!is_sealed_len(size), "{size}");
        }
        assert!(is_sealed_len(SEALED_SEGMENT as u64), "one whole segment");
    }
}
