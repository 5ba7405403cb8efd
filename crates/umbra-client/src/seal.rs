//! How a file is sealed before it leaves the device: padded to a bucket,
//! then encrypted with ChaCha20-Poly1305 in the STREAM construction
//! (Hoang, Reyhanitabar, Rogaway and Vizár; RustCrypto's `aead::stream`,
//! big-endian 32-bit segment counter and a last-segment flag in the nonce)
//! under a key drawn for that file alone. Each 64 KiB segment is
//! authenticated on its own, so a download is checked as it arrives; a
//! segment moved, dropped or cut off fails to open, and so does a blob
//! that stops before its last segment (only the real last one opens with
//! the flag set).
//!
//! Padding: the file is followed by zeros up to its bucket, at least 64 KiB
//! (so short voice notes and small images all look alike) and above that
//! the Padmé bucket ([`padded_len`], part of the protocol since the server
//! bounds blobs by it).

use chacha20poly1305::aead::stream::{NewStream, StreamBE32, StreamPrimitive};
use chacha20poly1305::{ChaCha20Poly1305, KeyInit};
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use crate::error::{ClientError, Result};

pub use umbra_proto::blobs::{
    MIN_PADDED, SEALED_SEGMENT, SEGMENT, TAG, padded_len, sealed_len, segments,
};

/// A file's key: 32 random bytes, fresh for each file. Its `Debug` shows
/// nothing of it.
#[derive(Clone)]
pub struct FileKey(Zeroizing<[u8; 32]>);

impl std::fmt::Debug for FileKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("FileKey(…)")
    }
}

impl FileKey {
    pub fn random() -> Result<Self> {
        let mut key = Zeroizing::new([0u8; 32]);
        getrandom::getrandom(key.as_mut()).map_err(|e| ClientError::Store(e.to_string()))?;
        Ok(FileKey(key))
    }

    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        FileKey(Zeroizing::new(bytes))
    }

    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    fn stream(&self) -> StreamBE32<ChaCha20Poly1305> {
        // The key is never used for another file, so one nonce prefix
        // (zeros) serves every file.
        let aead = ChaCha20Poly1305::new(self.0.as_ref().into());
        StreamBE32::from_aead(aead, &Default::default())
    }
}

/// Seals segment `index` (`plaintext` is at most [`SEGMENT`] bytes).
pub fn seal_segment(key: &FileKey, index: u64, last: bool, plaintext: &[u8]) -> Result<Vec<u8>> {
    let position =
        u32::try_from(index).map_err(|_| ClientError::Invalid("file too large".into()))?;
    key.stream()
        .encrypt(position, last, plaintext)
        .map_err(|_| ClientError::Invalid("a file segment could not be sealed".into()))
}

/// Opens segment `index`; refused if it was altered, moved, or is flagged
/// last when it is not (or not when it is).
pub fn open_segment(key: &FileKey, index: u64, last: bool, sealed: &[u8]) -> Result<Vec<u8>> {
    let position = u32::try_from(index).map_err(|_| corrupt())?;
    key.stream()
        .decrypt(position, last, sealed)
        .map_err(|_| corrupt())
}

fn corrupt() -> ClientError {
    ClientError::Invalid(
        "the file's data does not open under its key: altered, cut short or out of order".into(),
    )
}

/// Seals a whole file from `input` into `output` (segment by segment, never
/// the whole file in memory). Returns the blob's SHA-256 and its size.
pub fn seal_file(
    key: &FileKey,
    size: u64,
    input: &mut impl std::io::Read,
    output: &mut impl std::io::Write,
) -> Result<([u8; 32], u64)> {
    let padded = padded_len(size);
    let count = segments(padded);
    let mut digest = Sha256::new();
    let mut written = 0u64;
    let mut remaining = size;
    let mut buffer = Zeroizing::new(vec![0u8; SEGMENT]);
    for index in 0..count {
        let start = index * SEGMENT as u64;
        let length = usize::try_from((padded - start).min(SEGMENT as u64)).unwrap_or(SEGMENT);
        let from_file = usize::try_from(remaining.min(length as u64)).unwrap_or(length);
        let segment = &mut buffer[..length];
        input.read_exact(&mut segment[..from_file])?;
        segment[from_file..].fill(0);
        remaining -= from_file as u64;
        let sealed = seal_segment(key, index, index + 1 == count, segment)?;
        digest.update(&sealed);
        output.write_all(&sealed)?;
        written += sealed.len() as u64;
    }
    Ok((digest.finalize().into(), written))
}

/// Checks a blob as its bytes arrive, in order: every whole segment is
/// opened (and its plaintext dropped), and the digest is taken.
#[derive(Debug)]
pub struct Checker {
    key: FileKey,
    count: u64,
    next: u64,
    pending: Vec<u8>,
    digest: Sha256,
}

impl Checker {
    /// For the blob of a file of `size` bytes.
    pub fn new(key: FileKey, size: u64) -> Self {
        Checker {
            key,
            count: segments(padded_len(size)),
            next: 0,
            pending: Vec::new(),
            digest: Sha256::new(),
        }
    }

    /// Takes the next bytes of the blob; refused as soon as a whole
    /// segment does not open, or more arrives than the blob holds.
    pub fn update(&mut self, mut bytes: &[u8]) -> Result<()> {
        self.digest.update(bytes);
        while !bytes.is_empty() {
            let take = (SEALED_SEGMENT - self.pending.len()).min(bytes.len());
            self.pending.extend_from_slice(&bytes[..take]);
            bytes = &bytes[take..];
            // The last segment may be short: `finish` opens it.
            if self.pending.len() == SEALED_SEGMENT && self.next + 1 < self.count {
                open_segment(&self.key, self.next, false, &self.pending)?;
                self.pending.clear();
                self.next += 1;
            } else if !bytes.is_empty() {
                return Err(corrupt());
            }
        }
        Ok(())
    }

    /// Opens the last segment and compares the digest with `expected`.
    pub fn finish(self, expected: &[u8; 32]) -> Result<()> {
        if self.next + 1 != self.count {
            return Err(corrupt());
        }
        open_segment(&self.key, self.next, true, &self.pending)?;
        let digest: [u8; 32] = self.digest.finalize().into();
        if subtle_eq(&digest, expected) {
            Ok(())
        } else {
            Err(ClientError::Invalid(
                "the file's digest does not match what its sender said".into(),
            ))
        }
    }
}

fn subtle_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Opens a whole blob from `input` into `output`: the file's `size` bytes,
/// without the padding.
pub fn open_file(
    key: &FileKey,
    size: u64,
    input: &mut impl std::io::Read,
    output: &mut impl std::io::Write,
) -> Result<()> {
    let padded = padded_len(size);
    let count = segments(padded);
    let mut remaining = size;
    let mut sealed = vec![0u8; SEALED_SEGMENT];
    for index in 0..count {
        let start = index * SEGMENT as u64;
        let length = usize::try_from((padded - start).min(SEGMENT as u64)).unwrap_or(SEGMENT) + TAG;
        input
            .read_exact(&mut sealed[..length])
            .map_err(|_| corrupt())?;
        let plaintext = Zeroizing::new(open_segment(
            key,
            index,
            index + 1 == count,
            &sealed[..length],
        )?);
        let keep = usize::try_from(remaining.min(plaintext.len() as u64)).unwrap_or(0);
        output.write_all(&plaintext[..keep])?;
        remaining -= keep as u64;
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn sealed(data: &[u8], key: &FileKey) -> (Vec<u8>, [u8; 32]) {
        let mut out = Vec::new();
        let (digest, len) = seal_file(key, data.len() as u64, &mut &data[..], &mut out).unwrap();
        assert_eq!(len, out.len() as u64);
        assert_eq!(len, sealed_len(data.len() as u64));
        (out, digest)
    }

    #[test]
    fn files_round_trip_in_any_size() {
        let key = FileKey::random().unwrap();
        for size in [
            0usize,
            1,
            SEGMENT - 1,
            SEGMENT,
            SEGMENT + 1,
            3 * SEGMENT + 17,
            300_000,
        ] {
            let data: Vec<u8> = (0..size).map(|i| (i * 31 % 251) as u8).collect();
            let (blob, digest) = sealed(&data, &key);
            let mut checker = Checker::new(key.clone(), size as u64);
            for piece in blob.chunks(10_000) {
                checker.update(piece).unwrap();
            }
            checker.finish(&digest).unwrap();
            let mut out = Vec::new();
            open_file(&key, size as u64, &mut &blob[..], &mut out).unwrap();
            assert_eq!(out, data, "{size}");
        }
    }

    #[test]
    fn altered_cut_or_reordered_blobs_are_refused() {
        let key = FileKey::random().unwrap();
        let data = vec![7u8; 5 * SEGMENT];
        let (blob, digest) = sealed(&data, &key);
        let check = |blob: &[u8]| {
            let mut checker = Checker::new(key.clone(), data.len() as u64);
            checker.update(blob).and_then(|()| checker.finish(&digest))
        };
        assert!(check(&blob).is_ok());
        let mut wrong = digest;
        wrong[0] ^= 1;
        let mut checker = Checker::new(key.clone(), data.len() as u64);
        checker.update(&blob).unwrap();
        assert!(
            checker.finish(&wrong).is_err(),
            "a digest its sender did not state"
        );
        let mut longer = blob.clone();
        longer.push(0);
        assert!(check(&longer).is_err(), "more than the blob holds");
        let mut flipped = blob.clone();
        flipped[SEALED_SEGMENT + 3] ^= 1;
        assert!(check(&flipped).is_err(), "altered");
        assert!(
            check(&blob[..blob.len() - SEALED_SEGMENT]).is_err(),
            "cut at a segment"
        );
        assert!(check(&blob[..blob.len() - 1]).is_err(), "cut short");
        let mut swapped = blob.clone();
        let (a, b) = swapped.split_at_mut(SEALED_SEGMENT);
        a.swap_with_slice(&mut b[..SEALED_SEGMENT]);
        assert!(check(&swapped).is_err(), "reordered");
        let other = FileKey::random().unwrap();
        let mut out = Vec::new();
        assert!(open_file(&other, data.len() as u64, &mut &blob[..], &mut out).is_err());
        assert_eq!(format!("{other:?}"), "FileKey(…)");
    }
}
