//! The generator's stamp: the last [`STAMP_LEN`] bytes of every payload say
//! who sent it, its sequence number, and when it was due to be sent.
//!
//! For Umbra the payload is a real MLS PrivateMessage, so the stamp lands in
//! the tail of its ciphertext: the server parses the MLS header and treats
//! the rest as opaque, as it does for every message. For peers the payload is
//! random bytes of the same size with the same stamp.

use std::time::{SystemTime, UNIX_EPOCH};

pub const STAMP_LEN: usize = 24;
const MAGIC: u16 = 0x5542; // "UB"

/// What the stamp carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamp {
    /// Which measurement this message belongs to; others are ignored.
    pub run: u16,
    pub sender: u32,
    pub seq: u64,
    /// When the message was due (open loop: scheduled, not actual, send
    /// time), in nanoseconds since the Unix epoch.
    pub due_ns: u64,
}

/// Nanoseconds since the Unix epoch: comparable across processes.
pub fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

impl Stamp {
    /// Writes the stamp over the last bytes of `payload` (which must be at
    /// least [`STAMP_LEN`] long; shorter payloads are left unstamped).
    pub fn write(&self, payload: &mut [u8]) {
        let Some(start) = payload.len().checked_sub(STAMP_LEN) else {
            return;
        };
        let mut bytes = [0u8; STAMP_LEN];
        bytes[..2].copy_from_slice(&MAGIC.to_be_bytes());
        bytes[2..4].copy_from_slice(&self.run.to_be_bytes());
        bytes[4..8].copy_from_slice(&self.sender.to_be_bytes());
        bytes[8..16].copy_from_slice(&self.seq.to_be_bytes());
        bytes[16..24].copy_from_slice(&self.due_ns.to_be_bytes());
        if let Some(tail) = payload.get_mut(start..) {
            tail.copy_from_slice(&bytes);
        }
    }

    /// Reads the stamp from the end of `payload`, if it has one.
    pub fn read(payload: &[u8]) -> Option<Stamp> {
        let start = payload.len().checked_sub(STAMP_LEN)?;
        let tail = payload.get(start..)?;
        let field = |range: std::ops::Range<usize>| tail.get(range);
        let magic = u16::from_be_bytes(field(0..2)?.try_into().ok()?);
        if magic != MAGIC {
            return None;
        }
        Some(Stamp {
            run: u16::from_be_bytes(field(2..4)?.try_into().ok()?),
            sender: u32::from_be_bytes(field(4..8)?.try_into().ok()?),
            seq: u64::from_be_bytes(field(8..16)?.try_into().ok()?),
            due_ns: u64::from_be_bytes(field(16..24)?.try_into().ok()?),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stamp_round_trips_and_unstamped_bytes_are_not_read_as_one() {
        let stamp = Stamp {
            run: 7,
            sender: 42,
            seq: 1 << 40,
            due_ns: now_ns(),
        };
        let mut payload = vec![0xAA; 256];
        assert_eq!(Stamp::read(&payload), None);
        stamp.write(&mut payload);
        assert_eq!(Stamp::read(&payload), Some(stamp));
        assert_eq!(payload.first(), Some(&0xAA), "only the tail is written");
        assert_eq!(Stamp::read(&payload[..10]), None);
    }
}
