//! What the nodes of a cluster tell each other of the hourly budgets they
//! charged (`umbra.v1.spent` on NATS; the server's `spending` module says
//! why). Node to node only: no device sends or reads it.
//!
//! ```text
//! message := version (1 byte: 1) node (16 bytes: the teller's name)
//!            charge*
//! charge  := budget (1 byte: 1 delivery, 2 anonymous, 3 downloads,
//!            4 uploads; another is skipped) payer (16 bytes)
//!            bytes (8 bytes, big-endian)
//! ```
//!
//! A message in another version, or whose length does not fit, is
//! refused whole.

use crate::DecodeError;

const VERSION: u8 = 1;

/// A node's name as it is told (8 random bytes in hex).
pub const NODE_LEN: usize = 16;

/// One charge's length on the wire.
const CHARGE_LEN: usize = 1 + 16 + 8;

/// Past this, what a node tells goes in several messages (NATS's own
/// default limit is 1 MiB).
const MAX_MESSAGE: usize = 60 * 1024;

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

/// `charges`, told by `node`, as messages of at most [`MAX_MESSAGE`]
/// bytes (none if there is nothing to tell).
pub fn encode(node: &str, charges: &[Charge]) -> Vec<Vec<u8>> {
    let per_message = (MAX_MESSAGE - 1 - NODE_LEN) / CHARGE_LEN;
    charges
        .chunks(per_message)
        .map(|chunk| {
            let mut message = Vec::with_capacity(1 + NODE_LEN + chunk.len() * CHARGE_LEN);
            message.push(VERSION);
            message.extend_from_slice(&node_name(node));
            for charge in chunk {
                message.push(charge.budget as u8);
                message.extend_from_slice(&charge.payer.0);
                message.extend_from_slice(&charge.bytes.to_be_bytes());
            }
            message
        })
        .collect()
}

/// The teller's name and its charges (those to a budget this node does
/// not know skipped).
pub fn decode(message: &[u8]) -> Result<(&[u8], Vec<Charge>), DecodeError> {
    let (&version, rest) = message.split_first().ok_or(DecodeError::Empty)?;
    if version != VERSION {
        return Err(DecodeError::UnsupportedVersion { got: version });
    }
    let (node, rest) = rest
        .split_at_checked(NODE_LEN)
        .ok_or(DecodeError::Missing("node"))?;
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
    Ok((node, charges))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn payer(n: u8) -> Payer {
        Payer([n; 16])
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
        let messages = encode("0123456789abcdef", &charges);
        assert_eq!(messages.len(), 1);
        let message = messages.first().map_or(&[][..], Vec::as_slice);
        let (node, heard) = decode(message).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(node, b"0123456789abcdef");
        assert_eq!(heard, charges);
        assert!(encode("0123456789abcdef", &[]).is_empty());
    }

    #[test]
    fn many_charges_are_told_in_several_messages() {
        let charge = Charge {
            budget: Budget::Delivery,
            payer: payer(7),
            bytes: 1,
        };
        let charges = vec![charge; 10_000];
        let messages = encode("0123456789abcdef", &charges);
        assert!(messages.len() > 1);
        let mut heard = Vec::new();
        for message in &messages {
            assert!(message.len() <= MAX_MESSAGE);
            heard.extend(decode(message).unwrap_or_else(|e| panic!("{e}")).1);
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
        let good = encode("0123456789abcdef", &[charge.clone(), charge.clone()]).concat();
        assert_eq!(decode(&good).map(|(_, c)| c.len()).ok(), Some(2));
        // Every cut but at a charge's end (the header alone is a message
        // with no charge in it), and another version.
        for cut in (0..good.len())
            .filter(|&cut| cut <= NODE_LEN || !(cut - 1 - NODE_LEN).is_multiple_of(CHARGE_LEN))
        {
            let part = good.get(..cut).unwrap_or_default();
            assert!(decode(part).is_err(), "cut at {cut}");
        }
        assert!(decode(&set(&good, 0, 2)).is_err(), "another version");
        // A budget a newer node knows and this one does not: that charge
        // alone is skipped.
        let newer = set(&good, 1 + NODE_LEN, 9);
        assert_eq!(decode(&newer).map(|(_, c)| c).ok(), Some(vec![charge]));
    }
}
