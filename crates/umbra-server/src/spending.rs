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
//! A bucket is kept under a [`Payer`], a keyed hash of the budget and the
//! account or group ID ([`Pseudonyms`], keyed from `delivery-ids.key`,
//! which every node of a cluster shares), never the ID itself: no account
//! or group ID is on `umbra.v1.spent`, and one account's three budgets are
//! unrelated payers (timing can still tie a payer's charges to the
//! wake-ups its sends caused, which name the recipients' accounts).
//!
//! Each message carries a tag ([`seals`]: HMAC-SHA-256 under another key
//! derived from `delivery-ids.key`), its teller's clock and a sequence
//! number. A node counts a message only if the tag is the cluster's, the
//! clock is within [`MAX_SKEW`] of its own and the number is past the
//! last it counted from that teller ([`Hearing`]): holding NATS
//! credentials is not enough to charge a budget, nor is a message seen
//! once enough to charge it again, and a node whose `delivery-ids.key` is
//! another's is refused and reported (a metric, a warning) rather than
//! silently sharing nothing.
//!
//! What is told is only counted, never trusted for anything else: a lost
//! message (NATS away, a node stopped or killed before it told) lets an
//! account spend that much more, as on a node alone. One message refuses
//! a payer for an hour at most.
//!
//! The message's format is `umbra_proto::spent`.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};
use umbra_proto::spent::{Budget, Charge, MAX_MESSAGE, NODE_LEN, Payer, decode, encode, node_name};
use umbra_proto::{AccountId, GroupId};

use crate::cluster::Cluster;
use crate::delivery_ids::ClusterMac;
use crate::service::Services;

/// The subject budgets are shared on.
pub const SUBJECT: &str = "umbra.v1.spent";

/// How often a node tells the others what it charged.
pub const SHARE_EVERY: Duration = Duration::from_millis(250);

/// How far a message's time may be from the hearer's clock, either way:
/// the nodes' clocks must agree within this (NTP does), and a message
/// older than this is not counted.
pub const MAX_SKEW: Duration = Duration::from_secs(60);

/// How often at most a refused message is logged as a warning (the others
/// are counted, and logged at debug level).
const WARN_EVERY: Duration = Duration::from_secs(60);

/// The keyed hash from budgets and account or group IDs to [`Payer`]s:
/// HMAC-SHA-256, truncated to 128 bits, under a key derived from the
/// cluster's `delivery-ids.key`.
#[derive(Debug)]
pub struct Pseudonyms(ClusterMac);

impl Pseudonyms {
    pub fn new(cluster_key: &[u8; 16]) -> Pseudonyms {
        Pseudonyms(ClusterMac::new(cluster_key, b"umbra.v1.spent payers"))
    }

    /// The payer for `account`'s `budget` (deliveries, downloads or
    /// uploads).
    pub fn account(&self, budget: Budget, account: &AccountId) -> Payer {
        self.of(budget, b'a', account.as_str().as_bytes())
    }

    /// The payer for `group`'s budget of anonymous messages.
    pub fn group(&self, group: &GroupId) -> Payer {
        self.of(Budget::Anonymous, b'g', group.as_bytes())
    }

    fn of(&self, budget: Budget, kind: u8, id: &[u8]) -> Payer {
        let tag = self.0.tag(&[&[budget as u8, kind], id]);
        let mut payer = [0u8; 16];
        for (to, from) in payer.iter_mut().zip(tag) {
            *to = from;
        }
        Payer(payer)
    }
}

/// The tags on what the nodes tell, under a key of their own (not the
/// payers').
pub fn seals(cluster_key: &[u8; 16]) -> ClusterMac {
    ClusterMac::new(cluster_key, b"umbra.v1.spent tags")
}

/// Why a message on `umbra.v1.spent` was not counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Refused {
    /// Not a message this node reads (another version, a bad length).
    Malformed,
    /// Its tag is not under this cluster's key: a node with another
    /// `delivery-ids.key`, or not a node at all.
    Forged,
    /// Its number is not past the last counted from its teller.
    Replayed,
    /// Its time is more than [`MAX_SKEW`] from this node's clock.
    Stale,
}

impl Refused {
    /// The metric label.
    fn reason(self) -> &'static str {
        match self {
            Refused::Malformed => "malformed",
            Refused::Forged => "forged",
            Refused::Replayed => "replayed",
            Refused::Stale => "stale",
        }
    }
}

/// What this node heard from each teller: the check a message passes
/// before it is counted.
struct Hearing {
    /// This node's name as messages carry it.
    me: [u8; NODE_LEN],
    seals: Arc<ClusterMac>,
    /// Each teller's last counted message: its number and its time.
    /// Forgotten once its time is [`MAX_SKEW`] old: a copy of any of its
    /// messages is stale by then.
    last: HashMap<[u8; NODE_LEN], (u64, u64)>,
}

impl Hearing {
    fn new(me: &str, seals: Arc<ClusterMac>) -> Hearing {
        Hearing {
            me: node_name(me),
            seals,
            last: HashMap::new(),
        }
    }

    /// The charges to count from `message`, heard at `now` (Unix
    /// milliseconds): none if this node told it.
    fn hear(&mut self, message: &[u8], now: u64) -> Result<Vec<Charge>, Refused> {
        if message.len() > MAX_MESSAGE {
            return Err(Refused::Malformed);
        }
        let told = decode(message).map_err(|_| Refused::Malformed)?;
        if !self.seals.check(&[told.tagged], told.tag) {
            return Err(Refused::Forged);
        }
        let header = told.header;
        if header.node == self.me {
            return Ok(Vec::new());
        }
        let skew = MAX_SKEW.as_millis() as u64;
        if header.sent_at.abs_diff(now) > skew {
            return Err(Refused::Stale);
        }
        self.last
            .retain(|_, &mut (_, sent_at)| now.saturating_sub(sent_at) <= skew);
        match self.last.get(&header.node) {
            Some(&(sequence, _)) if header.sequence <= sequence => Err(Refused::Replayed),
            last => {
                // (The latest time heard from it: a teller whose clock
                // stepped back is not forgotten while a message it sent
                // before could still be counted.)
                let latest = last.map_or(header.sent_at, |&(_, at)| at.max(header.sent_at));
                self.last.insert(header.node, (header.sequence, latest));
                Ok(told.charges)
            }
        }
    }
}

/// Now, in Unix milliseconds (0 before 1970).
fn unix_millis() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |since| since.as_millis() as u64)
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
pub async fn share(
    services: Arc<Services>,
    cluster: Arc<Cluster>,
    seals: Arc<ClusterMac>,
    shutdown: CancellationToken,
) {
    for budget in Budget::ALL {
        bucket(&services, budget).share();
    }
    let mut hearing = Hearing::new(cluster.node(), Arc::clone(&seals));
    let mut next_sequence = 1u64;
    // When each reason was last warned of (one reason's flood, an old
    // node's messages in an upgrade, hides no other's).
    let mut warned: HashMap<&'static str, tokio::time::Instant> = HashMap::new();
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
                let told = tell(&services, &cluster, &seals, &mut next_sequence);
                let _ = tokio::time::timeout(4 * SHARE_EVERY, told).await;
            }
            message = next => match message {
                Some(message) => match hearing.hear(&message.payload, unix_millis()) {
                    Ok(charges) => charge(&services, &charges),
                    Err(refused) => {
                        services
                            .metrics
                            .cluster_spent_refused
                            .get_or_create(&crate::metrics::RefusalLabels {
                                reason: refused.reason(),
                            })
                            .inc();
                        let last = warned.get(refused.reason());
                        if last.is_none_or(|at| at.elapsed() >= WARN_EVERY) {
                            warned.insert(refused.reason(), tokio::time::Instant::now());
                            warn!(
                                reason = refused.reason(),
                                "a message on {SUBJECT} was not counted (forged: a node \
                                 whose delivery-ids.key is not this one's, or not a node; \
                                 stale: clocks apart by more than a minute)"
                            );
                        } else {
                            debug!(reason = refused.reason(), "not counted");
                        }
                    }
                },
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
async fn tell(services: &Services, cluster: &Cluster, seals: &ClusterMac, next_sequence: &mut u64) {
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
    let told = encode(
        cluster.node(),
        unix_millis(),
        *next_sequence,
        &charges,
        |tagged| seals.tag(&[tagged]),
    );
    *next_sequence += told.len() as u64;
    for telling in told {
        if cluster.tell_all(SUBJECT, telling.message).await {
            services
                .metrics
                .cluster_charges_told
                .inc_by(telling.charged);
        } else {
            services
                .metrics
                .cluster_charges_untold
                .inc_by(telling.charged);
        }
    }
}

/// Charges this node's budgets with what another node told.
fn charge(services: &Services, charges: &[Charge]) {
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
        let sends = one.account(Budget::Delivery, &alice);
        assert_eq!(sends, one.account(Budget::Delivery, &alice));
        assert_ne!(sends, other.account(Budget::Delivery, &alice), "keyed");
        assert_ne!(sends, one.group(&group), "an account is no group");
        assert_ne!(
            sends,
            one.account(Budget::Uploads, &alice),
            "an account's budgets are not linked"
        );
        assert!(!sends.0.windows(8).any(|w| w == b"AAAAAAAA"));
    }

    const NOW: u64 = 1_800_000_000_000;
    const SKEW: u64 = MAX_SKEW.as_millis() as u64;

    fn charges(bytes: u64) -> Vec<Charge> {
        vec![Charge {
            budget: Budget::Delivery,
            payer: Payer([3; 16]),
            bytes,
        }]
    }

    /// A message from `node`, numbered `sequence`, told at `sent_at`,
    /// tagged under `key`.
    fn told(key: u8, node: &str, sent_at: u64, sequence: u64, bytes: u64) -> Vec<u8> {
        let seals = seals(&[key; 16]);
        encode(node, sent_at, sequence, &charges(bytes), |t| {
            seals.tag(&[t])
        })
        .pop()
        .map(|telling| telling.message)
        .unwrap_or_default()
    }

    fn hearing() -> Hearing {
        Hearing::new("me", Arc::new(seals(&[1; 16])))
    }

    #[test]
    fn a_message_is_counted_once_from_a_node_of_the_cluster() {
        let mut hearing = hearing();
        let first = told(1, "other", NOW, 1, 8);
        assert_eq!(hearing.hear(&first, NOW), Ok(charges(8)));
        assert_eq!(hearing.hear(&first, NOW), Err(Refused::Replayed));
        assert_eq!(
            hearing.hear(&told(1, "other", NOW, 3, 9), NOW + 1),
            Ok(charges(9)),
            "a gap (a message lost) is no replay"
        );
        assert_eq!(
            hearing.hear(&told(1, "other", NOW, 2, 8), NOW + 1),
            Err(Refused::Replayed),
            "nor is a message older than the last counted counted"
        );
        assert_eq!(
            hearing.hear(&told(1, "third", NOW, 1, 7), NOW + 1),
            Ok(charges(7)),
            "each teller is numbered apart"
        );
        assert_eq!(
            hearing.hear(&told(1, "me", NOW, 1, 8), NOW),
            Ok(Vec::new()),
            "what this node told"
        );
    }

    #[test]
    fn a_message_not_under_the_clusters_key_is_forged() {
        let mut hearing = hearing();
        assert_eq!(
            hearing.hear(&told(2, "other", NOW, 1, 8), NOW),
            Err(Refused::Forged),
            "another delivery-ids.key"
        );
        let mut changed = told(1, "other", NOW, 1, 8);
        for at in 0..changed.len() {
            if let Some(byte) = changed.get_mut(at) {
                *byte ^= 1;
            }
            let heard = hearing.hear(&changed, NOW);
            assert!(
                matches!(heard, Err(Refused::Forged | Refused::Malformed)),
                "byte {at} changed: {heard:?}"
            );
            if let Some(byte) = changed.get_mut(at) {
                *byte ^= 1;
            }
        }
        assert_eq!(hearing.hear(&changed, NOW), Ok(charges(8)));
        assert_eq!(hearing.hear(b"\x02", NOW), Err(Refused::Malformed));
    }

    #[test]
    fn a_message_from_too_far_in_the_past_or_future_is_stale() {
        let mut hearing = hearing();
        assert_eq!(
            hearing.hear(&told(1, "other", NOW - SKEW - 1, 1, 8), NOW),
            Err(Refused::Stale)
        );
        assert_eq!(
            hearing.hear(&told(1, "other", NOW + SKEW + 1, 1, 8), NOW),
            Err(Refused::Stale)
        );
        assert_eq!(
            hearing.hear(&told(1, "other", NOW - SKEW, 1, 8), NOW),
            Ok(charges(8))
        );
    }

    #[test]
    fn a_teller_whose_clock_stepped_back_is_remembered_from_its_latest_time() {
        let mut hearing = hearing();
        let ahead = told(1, "other", NOW + SKEW, 1, 8);
        assert_eq!(hearing.hear(&ahead, NOW), Ok(charges(8)));
        // Its clock steps back a minute; its next message is not what
        // keeps it in mind.
        assert_eq!(
            hearing.hear(&told(1, "other", NOW, 2, 1), NOW),
            Ok(charges(1))
        );
        let later = NOW + SKEW + 1;
        assert_eq!(
            hearing.hear(&told(1, "third", later, 1, 1), later),
            Ok(charges(1))
        );
        assert_eq!(
            hearing.hear(&ahead, later),
            Err(Refused::Replayed),
            "its first message, still within a minute, is no longer counted"
        );
    }

    #[test]
    fn a_message_longer_than_any_told_is_not_read() {
        let mut hearing = hearing();
        let long = told(1, "other", NOW, 1, 8);
        let mut longer = long.clone();
        longer.resize(MAX_MESSAGE + 1, 0);
        assert_eq!(hearing.hear(&longer, NOW), Err(Refused::Malformed));
        assert_eq!(hearing.hear(&long, NOW), Ok(charges(8)));
    }

    #[test]
    fn a_teller_is_forgotten_only_once_its_messages_are_stale() {
        let mut hearing = hearing();
        let message = told(1, "other", NOW, 5, 8);
        assert_eq!(hearing.hear(&message, NOW), Ok(charges(8)));
        // Another teller's message makes this node forget what is old.
        let later = NOW + SKEW;
        assert_eq!(
            hearing.hear(&told(1, "third", later, 1, 1), later),
            Ok(charges(1))
        );
        assert_eq!(hearing.hear(&message, later), Err(Refused::Replayed));
        let past = later + 1;
        assert_eq!(
            hearing.hear(&told(1, "third", past, 2, 1), past),
            Ok(charges(1))
        );
        assert_eq!(hearing.last.len(), 1, "\"other\" forgotten");
        assert_eq!(hearing.hear(&message, past), Err(Refused::Stale));
    }
}
