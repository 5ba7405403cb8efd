//! What the nodes of a cluster tell each other of the hourly budgets they
//! charged (`umbra.v1.spent` on NATS; the server's `spending` module says
//! why). Node to node only: no device sends or reads it.
//!
//! ```text
//! message  := version (1 byte: 2) node (16 bytes: the teller's name)
//!             sent_at (8 bytes: Unix milliseconds) sequence (8 bytes)
//!             charge* tag (32 bytes)
//! charge   := budget (1 byte: 1 delivery, 2 anonymous, 3 downloads,
//!             4 uploads; another is skipped) payer (16 bytes)
//!             bytes (8 bytes)
//! ```
//!
//! Integers are big-endian. `sequence` counts the teller's messages from 1
//! at each of its starts (its name is new at each). `tag` is
//! HMAC-SHA-256 of everything before it under a key only the cluster's
//! nodes hold; this codec leaves making and checking it to the caller.
//!
//! A message in another version, or whose length does not fit, is
//! refused whole.

use crate::DecodeError;

const VERSION: u8 = 2;

/// A node's name as it is told (8 random bytes in hex).
pub const NODE_LEN: usize = 16;

/// One charge's length on the wire.
const CHARGE_LEN: usize = 1 + 16 + 8;

/// The tag's length: HMAC-SHA-256's, untruncated.
pub const TAG_LEN: usize = 32;

/// What comes before the charges.
const HEADER_LEN: usize = 1 + NODE_LEN + 8 + 8;

/// Past this, what a node tells goes in several messages (NATS's own
/// default limit is 1 MiB); a longer message is not one a node told.
pub const MAX_MESSAGE: usize = 60 * 1024;

/// Whom a budget's bucket belongs to: a keyed hash of an account or group
/// ID (the server keys it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Payer(pub [u8; 16]);

/// Which budget a charge is to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Budget {
    /// Bytes an account delivered to others' mailboxes.
    Delivery = 1,
    /// Bytes a group received anonymously.
    Anonymous = 2,
    /// Bytes of attachments an account downloaded.
    Downloads = 3,
    /// Bytes of attachments an account uploaded.
    Uploads = 4,
}

impl Budget {
    pub const ALL: [Budget; 4] = [
        Budget::Delivery,
        Budget::Anonymous,
        Budget::Downloads,
        Budget::Uploads,
    ];
}

/// One charge to one budget.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Charge {
    pub budget: Budget,
    pub payer: Payer,
    pub bytes: u64,
}

/// `node`'s name as a message carries it: its first 16 bytes, padded
/// with `0` (compare a message's teller with this, not with the name).
pub fn node_name(node: &str) -> [u8; NODE_LEN] {
    let mut name = [b'0'; NODE_LEN];
    for (to, from) in name.iter_mut().zip(node.bytes()) {
        *to = from;
    }
    name
}

/// Who told a message, when, and its place among the teller's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// The teller's name ([`node_name`]).
    pub node: [u8; NODE_LEN],
    /// When it was told, in Unix milliseconds by the teller's clock.
    pub sent_at: u64,
    /// Its place among the teller's messages, from 1.
    pub sequence: u64,
}

/// One message to tell, and the bytes its charges add up to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Telling {
    pub message: Vec<u8>,
    pub charged: u64,
}

/// `charges`, told by `node` at `sent_at`, as messages of at most
/// [`MAX_MESSAGE`] bytes numbered from `first_sequence` (none if there is
/// nothing to tell); `tag` makes each message's tag from what comes
/// before it.
pub fn encode(
    node: &str,
    sent_at: u64,
    first_sequence: u64,
    charges: &[Charge],
    tag: impl Fn(&[u8]) -> [u8; TAG_LEN],
) -> Vec<Telling> {
    let per_message = (MAX_MESSAGE - HEADER_LEN - TAG_LEN) / CHARGE_LEN;
    charges
        .chunks(per_message)
        .zip(first_sequence..)
        .map(|(chunk, sequence)| {
            let mut message = Vec::with_capacity(HEADER_LEN + chunk.len() * CHARGE_LEN + TAG_LEN);
            message.push(VERSION);
            message.extend_from_slice(&node_name(node));
            message.extend_from_slice(&sent_at.to_be_bytes());
            message.extend_from_slice(&sequence.to_be_bytes());
            let mut charged = 0u64;
            for charge in chunk {
                message.push(charge.budget as u8);
                message.extend_from_slice(&charge.payer.0);
                message.extend_from_slice(&charge.bytes.to_be_bytes());
                charged = charged.saturating_add(charge.bytes);
            }
            let tag = tag(&message);
            message.extend_from_slice(&tag);
            Telling { message, charged }
        })
        .collect()
}

/// A message as decoded: not yet checked against its tag.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Told<'a> {
    pub header: Header,
    /// The charges, those to a budget this node does not know skipped.
    pub charges: Vec<Charge>,
    /// What the tag was made over.
    pub tagged: &'a [u8],
    pub tag: &'a [u8],
}

/// A message's parts (charges to a budget this node does not know
/// skipped); its tag is for the caller to check.
pub fn decode(message: &[u8]) -> Result<Told<'_>, DecodeError> {
    let (&version, _) = message.split_first().ok_or(DecodeError::Empty)?;
    if version != VERSION {
        return Err(DecodeError::UnsupportedVersion { got: version });
    }
    let (tagged, tag) = message
        .len()
        .checked_sub(TAG_LEN)
        .filter(|&at| at >= HEADER_LEN)
        .and_then(|at| message.split_at_checked(at))
        .ok_or(DecodeError::Missing("header or tag"))?;
    let (header, rest) = tagged
        .split_at_checked(HEADER_LEN)
        .ok_or(DecodeError::Missing("header"))?;
    let u64_at = |at: usize| {
        header
            .get(at..at + 8)
            .and_then(|bytes| bytes.try_into().ok())
            .map(u64::from_be_bytes)
    };
    let header = Header {
        node: header
            .get(1..1 + NODE_LEN)
            .and_then(|node| node.try_into().ok())
            .ok_or(DecodeError::Missing("node"))?,
        sent_at: u64_at(1 + NODE_LEN).ok_or(DecodeError::Missing("sent_at"))?,
        sequence: u64_at(1 + NODE_LEN + 8).ok_or(DecodeError::Missing("sequence"))?,
    };
    let entries = rest.chunks_exact(CHARGE_LEN);
    if !entries.remainder().is_empty() {
        return Err(DecodeError::invalid(
            "charge",
            format!("{} bytes left over", entries.remainder().len()),
        ));
    }
    let charges = entries
        .filter_map(|entry| {
            let (&budget, rest) = entry.split_first()?;
            let budget = *Budget::ALL.iter().find(|b| **b as u8 == budget)?;
            let (payer, bytes) = rest.split_at_checked(16)?;
            Some(Charge {
                budget,
                payer: Payer(payer.try_into().ok()?),
                bytes: u64::from_be_bytes(bytes.try_into().ok()?),
            })
        })
        .collect();
    Ok(Told {
        header,
        charges,
        tagged,
        tag,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const NODE: &str = "0123456789abcdef";

    fn payer(n: u8) -> Payer {
        Payer([n; 16])
    }

    /// A stand-in for the caller's HMAC: the tagged bytes' length and
    /// first byte, so a test sees what the tag was made over.
    fn tag(tagged: &[u8]) -> [u8; TAG_LEN] {
        let mut tag = [0u8; TAG_LEN];
        tag[..8].copy_from_slice(&(tagged.len() as u64).to_be_bytes());
        tag[8] = tagged.first().copied().unwrap_or(0);
        tag
    }

    fn set(message: &[u8], at: usize, value: u8) -> Vec<u8> {
        let mut changed = message.to_vec();
        if let Some(byte) = changed.get_mut(at) {
            *byte = value;
        }
        changed
    }

    #[test]
    fn charges_come_out_as_they_went_in() {
        let charges: Vec<Charge> = Budget::ALL
            .iter()
            .zip([8_300, u64::MAX, 0, 1])
            .map(|(&budget, bytes)| Charge {
                budget,
                payer: payer(bytes as u8),
                bytes,
            })
            .collect();
        let told = encode(NODE, 1_700_000_000_123, 41, &charges, tag);
        assert_eq!(told.len(), 1);
        let telling = told.first().cloned().unwrap_or_else(|| panic!("none"));
        assert_eq!(telling.charged, u64::MAX, "saturated");
        let heard = decode(&telling.message).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            heard.header,
            Header {
                node: *b"0123456789abcdef",
                sent_at: 1_700_000_000_123,
                sequence: 41,
            }
        );
        assert_eq!(heard.charges, charges);
        assert_eq!(heard.tagged.len() + TAG_LEN, telling.message.len());
        assert_eq!(heard.tag, tag(heard.tagged), "made over all before it");
        assert!(encode(NODE, 0, 1, &[], tag).is_empty());
    }

    #[test]
    fn many_charges_are_told_in_several_numbered_messages() {
        let charge = Charge {
            budget: Budget::Delivery,
            payer: payer(7),
            bytes: 1,
        };
        let charges = vec![charge; 10_000];
        let told = encode(NODE, 5, 1, &charges, tag);
        assert!(told.len() > 1);
        let mut heard = Vec::new();
        for (telling, sequence) in told.iter().zip(1..) {
            assert!(telling.message.len() <= MAX_MESSAGE);
            let decoded = decode(&telling.message).unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(decoded.header.sequence, sequence);
            assert_eq!(telling.charged, decoded.charges.len() as u64);
            heard.extend(decoded.charges);
        }
        assert_eq!(heard, charges);
    }

    #[test]
    fn a_message_not_well_formed_is_refused_whole_and_an_unknown_budget_skipped() {
        let charge = Charge {
            budget: Budget::Uploads,
            payer: payer(5),
            bytes: 5,
        };
        let told = encode(NODE, 5, 1, &[charge.clone(), charge.clone()], tag);
        let good = told.first().map(|t| t.message.clone()).unwrap_or_default();
        assert_eq!(decode(&good).map(|t| t.charges.len()).ok(), Some(2));
        // Every cut but one that leaves whole charges before a tag's
        // length (the cut message is then read as fewer charges and a tag
        // that will not check).
        for cut in (0..good.len()).filter(|&cut| {
            cut < HEADER_LEN + TAG_LEN || !(cut - HEADER_LEN - TAG_LEN).is_multiple_of(CHARGE_LEN)
        }) {
            let part = good.get(..cut).unwrap_or_default();
            assert!(decode(part).is_err(), "cut at {cut}");
        }
        assert!(decode(&set(&good, 0, 1)).is_err(), "another version");
        // A budget a newer node knows and this one does not: that charge
        // alone is skipped.
        let newer = set(&good, HEADER_LEN, 9);
        assert_eq!(decode(&newer).map(|t| t.charges).ok(), Some(vec![charge]));
    }
}
