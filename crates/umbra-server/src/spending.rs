//! The hourly budgets, kept for the cluster rather than for each node.
//!
//! Each budget ([`crate::limits::SendBudget`]: bytes an account delivers,
//! bytes a group receives anonymously, bytes of attachments an account
//! downloads and uploads) is a bucket in one node's memory. Alone, a
//! cluster of N nodes would let an account spend N budgets, one per node
//! it connects to. So every [`SHARE_EVERY`] each node tells the others,
//! on `umbra.v1.spent`, what it charged since it last told, and each node
//! charges its own buckets with what it hears.
//!
//! A bucket is kept under a [`Payer`], a keyed hash of the account or
//! group ID ([`Pseudonyms`], keyed from `delivery-ids.key`, which every
//! node of a cluster shares), never the ID itself: what NATS carries
//! names no account or group, and nothing on NATS maps a payer to one.
//!
//! What is told is only counted, never trusted for anything else: a lost
//! message (NATS away, a node stopped or killed before it told) lets an
//! account spend that much more, as on a node alone. Whoever can publish
//! on NATS can charge any payer it can name; one message refuses a
//! payer for an hour at most, and NATS admits only the cluster's nodes
//! (`docs/operations.md`).
//!
//! A message on the subject:
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
//! ignored whole.

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use hmac::Mac;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};
use umbra_proto::{AccountId, GroupId};

use crate::cluster::Cluster;
use crate::service::Services;

/// The subject budgets are shared on.
pub const SUBJECT: &str = "umbra.v1.spent";

/// How often a node tells the others what it charged.
pub const SHARE_EVERY: Duration = Duration::from_millis(250);

const VERSION: u8 = 1;

/// A node's name as it is told (8 random bytes in hex).
const NODE_LEN: usize = 16;

/// One charge's length on the wire.
const CHARGE_LEN: usize = 1 + 16 + 8;

/// Past this, what a node tells goes in several messages (NATS's own
/// default limit is 1 MiB).
const MAX_MESSAGE: usize = 60 * 1024;

/// Whom a budget's bucket belongs to: a keyed hash of an account or group
/// ID (see [`Pseudonyms`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Payer([u8; 16]);

/// The keyed hash from account and group IDs to [`Payer`]s: HMAC-SHA-256,
/// truncated to 128 bits, under a key derived (HKDF-SHA-256) from the
/// cluster's `delivery-ids.key`.
pub struct Pseudonyms {
    mac: hmac::Hmac<sha2::Sha256>,
}

impl std::fmt::Debug for Pseudonyms {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Pseudonyms")
    }
}

impl Pseudonyms {
    pub fn new(cluster_key: &[u8; 16]) -> Pseudonyms {
        let mut key = [0u8; 32];
        hkdf::Hkdf::<sha2::Sha256>::new(None, cluster_key)
            .expand(b"umbra.v1.spent payers", &mut key)
            .unwrap_or_else(|_| unreachable!("32 bytes is a valid HKDF-SHA-256 length"));
        let mac = <hmac::Hmac<sha2::Sha256> as Mac>::new_from_slice(&key)
            .unwrap_or_else(|_| unreachable!("HMAC takes a key of any length"));
        Pseudonyms { mac }
    }

    /// The payer for `account`'s budgets.
    pub fn account(&self, account: &AccountId) -> Payer {
        self.of(b'a', account.as_str().as_bytes())
    }

    /// The payer for `group`'s budget of anonymous messages.
    pub fn group(&self, group: &GroupId) -> Payer {
        self.of(b'g', group.as_bytes())
    }

    fn of(&self, kind: u8, id: &[u8]) -> Payer {
        let mut mac = self.mac.clone();
        mac.update(&[kind]);
        mac.update(id);
        let tag = mac.finalize().into_bytes();
        let mut payer = [0u8; 16];
        for (to, from) in payer.iter_mut().zip(tag) {
            *to = from;
        }
        Payer(payer)
    }
}

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
    const ALL: [Budget; 4] = [
        Budget::Delivery,
        Budget::Anonymous,
        Budget::Downloads,
        Budget::Uploads,
    ];

    fn of(services: &Services, budget: Budget) -> &crate::limits::SendBudget<Payer> {
        match budget {
            Budget::Delivery => &services.send_budget,
            Budget::Anonymous => &services.anonymous_budget,
            Budget::Downloads => &services.blob_read_budget,
            Budget::Uploads => &services.blob_upload_budget,
        }
    }
}

/// One charge to one budget.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Charge {
    pub budget: Budget,
    pub payer: Payer,
    pub bytes: u64,
}

/// A message on [`SUBJECT`] that is not one this node can read.
#[derive(Debug, thiserror::Error)]
#[error("a budget message on NATS that is not well formed: {0}")]
pub struct Malformed(&'static str);

/// `charges`, told by `node`, as messages of at most [`MAX_MESSAGE`]
/// bytes (none if there is nothing to tell).
pub fn encode(node: &str, charges: &[Charge]) -> Vec<Vec<u8>> {
    let per_message = (MAX_MESSAGE - 1 - NODE_LEN) / CHARGE_LEN;
    charges
        .chunks(per_message)
        .map(|chunk| {
            let mut message = Vec::with_capacity(1 + NODE_LEN + chunk.len() * CHARGE_LEN);
            message.push(VERSION);
            let mut name = [b'0'; NODE_LEN];
            for (to, from) in name.iter_mut().zip(node.bytes()) {
                *to = from;
            }
            message.extend_from_slice(&name);
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
pub fn decode(message: &[u8]) -> Result<(&[u8], Vec<Charge>), Malformed> {
    let (&version, rest) = message.split_first().ok_or(Malformed("empty"))?;
    if version != VERSION {
        return Err(Malformed("another version"));
    }
    let (node, rest) = rest
        .split_at_checked(NODE_LEN)
        .ok_or(Malformed("too short for a node's name"))?;
    let entries = rest.chunks_exact(CHARGE_LEN);
    if !entries.remainder().is_empty() {
        return Err(Malformed("cut short"));
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

/// Shares this node's budgets with the other nodes' until `shutdown`:
/// tells what it charges every [`SHARE_EVERY`], and charges what it hears.
/// (What it charged in its last period is not told: a node stopped or
/// killed lets that much more be spent, as NATS away does.)
pub async fn share(services: Arc<Services>, cluster: Arc<Cluster>, shutdown: CancellationToken) {
    for budget in Budget::ALL {
        Budget::of(&services, budget).share();
    }
    let mut heard = match cluster.hear(SUBJECT).await {
        Ok(subscriber) => Some(subscriber),
        Err(error) => {
            warn!(%error, "cannot hear what the other nodes charge: budgets hold per node");
            None
        }
    };
    let mut every = tokio::time::interval(SHARE_EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let next = async {
            match heard.as_mut() {
                Some(subscriber) => subscriber.next().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = every.tick() => tell(&services, &cluster).await,
            message = next => match message {
                Some(message) => hear(&services, cluster.node(), &message.payload),
                None => {
                    warn!("no longer hearing what the other nodes charge: budgets hold per node");
                    heard = None;
                }
            },
        }
    }
}

/// Tells the other nodes what this one charged since it last did; while
/// NATS is away, that is not told (the budgets hold per node meanwhile).
async fn tell(services: &Services, cluster: &Cluster) {
    let mut charges: Vec<Charge> = Vec::new();
    for budget in Budget::ALL {
        charges.extend(
            Budget::of(services, budget)
                .take_untold()
                .into_iter()
                .filter(|&(_, bytes)| bytes > 0)
                .map(|(payer, bytes)| Charge {
                    budget,
                    payer,
                    bytes,
                }),
        );
    }
    for message in encode(cluster.node(), &charges) {
        let total = decode(&message).map_or(0, |(_, told)| {
            told.iter()
                .fold(0u64, |sum, charge| sum.saturating_add(charge.bytes))
        });
        if cluster.tell_all(SUBJECT, message).await {
            services.metrics.cluster_charges_told.inc_by(total);
        } else {
            services.metrics.cluster_charges_untold.inc_by(total);
        }
    }
}

/// Charges this node's budgets with what another node told.
fn hear(services: &Services, me: &str, message: &[u8]) {
    let (node, charges) = match decode(message) {
        Ok(decoded) => decoded,
        Err(error) => {
            debug!(%error, "ignored");
            return;
        }
    };
    if node == me.as_bytes() {
        return;
    }
    let now = tokio::time::Instant::now();
    for charge in charges.iter().filter(|charge| charge.bytes > 0) {
        Budget::of(services, charge.budget).charge_elsewhere(&charge.payer, charge.bytes, now);
        services.metrics.cluster_charges_heard.inc_by(charge.bytes);
    }
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

    #[test]
    fn payers_are_keyed_and_apart() {
        let alice = AccountId::parse("AAAAAAAA").unwrap_or_else(|e| panic!("{e}"));
        let group = GroupId::new(b"AAAAAAAA".to_vec()).unwrap_or_else(|e| panic!("{e}"));
        let (one, other) = (Pseudonyms::new(&[1; 16]), Pseudonyms::new(&[2; 16]));
        assert_eq!(one.account(&alice), one.account(&alice));
        assert_ne!(one.account(&alice), other.account(&alice), "keyed");
        assert_ne!(
            one.account(&alice),
            one.group(&group),
            "an account is no group"
        );
        assert!(!one.account(&alice).0.windows(8).any(|w| w == b"AAAAAAAA"));
    }
}
