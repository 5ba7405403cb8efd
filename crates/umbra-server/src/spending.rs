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
//! node of a cluster shares), never the ID itself: no account or group ID
//! is on `umbra.v1.spent` (timing can still tie a payer's charges to the
//! wake-ups its sends caused, which name the recipients' accounts).
//!
//! What is told is only counted, never trusted for anything else: a lost
//! message (NATS away, a node stopped or killed before it told) lets an
//! account spend that much more, as on a node alone. Whoever can publish
//! on NATS can charge any payer it can name; one message refuses a
//! payer for an hour at most, and NATS admits only the cluster's nodes
//! (`docs/operations.md`).
//!
//! The message's format is `umbra_proto::spent`.

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use hmac::Mac;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};
use umbra_proto::spent::{Budget, Charge, Payer, decode, encode};
use umbra_proto::{AccountId, GroupId};

use crate::cluster::Cluster;
use crate::service::Services;

/// The subject budgets are shared on.
pub const SUBJECT: &str = "umbra.v1.spent";

/// How often a node tells the others what it charged.
pub const SHARE_EVERY: Duration = Duration::from_millis(250);

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

/// The bucket of `budget`.
fn bucket(services: &Services, budget: Budget) -> &crate::limits::SendBudget<Payer> {
    match budget {
        Budget::Delivery => &services.send_budget,
        Budget::Anonymous => &services.anonymous_budget,
        Budget::Downloads => &services.blob_read_budget,
        Budget::Uploads => &services.blob_upload_budget,
    }
}

/// Shares this node's budgets with the other nodes' until `shutdown`:
/// tells what it charges every [`SHARE_EVERY`], and charges what it hears.
/// (What it charged in its last period is not told: a node stopped or
/// killed lets that much more be spent, as NATS away does.)
pub async fn share(services: Arc<Services>, cluster: Arc<Cluster>, shutdown: CancellationToken) {
    for budget in Budget::ALL {
        bucket(&services, budget).share();
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
            // (NATS that takes no message holds neither this task nor the
            // node's stop: what it does not take in time is not told.)
            _ = every.tick() => {
                let _ = tokio::time::timeout(4 * SHARE_EVERY, tell(&services, &cluster)).await;
            }
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
            bucket(services, budget)
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
    if node == umbra_proto::spent::node_name(me) {
        return;
    }
    let now = tokio::time::Instant::now();
    for charge in charges.iter().filter(|charge| charge.bytes > 0) {
        bucket(services, charge.budget).charge_elsewhere(&charge.payer, charge.bytes, now);
        services.metrics.cluster_charges_heard.inc_by(charge.bytes);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
