//! Which accounts have a connection open, and how a stored delivery reaches
//! the connection that will push it.
//!
//! A fan-out hands each online recipient's connection its copy directly
//! (the copy exactly as the mailbox holds it, staged or written), so the
//! common case never reads the mailbox back. Everything else (notices, commits, a full queue) only
//! wakes the connection, which then reads the mailbox: the store stays the
//! source of truth and nothing depends on the in-memory copy arriving.
//!
//! An idle connection's inbox holds no buffer at all: the queue is a
//! `VecDeque` that allocates on the first copy and is taken whole by the
//! connection, so memory follows traffic, not connection count.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use umbra_proto::{AccountId, DeviceAddr, DeviceId, ErrorCode, ErrorReply};
use umbra_store::StoredDelivery;

use crate::cluster::Cluster;

/// Deliveries, and bytes of their payloads, queued in memory per
/// connection before it falls back to reading its mailbox.
const INBOX: usize = 1024;
const INBOX_BYTES: usize = 4 * 1024 * 1024;

/// One connection's inbox, shared by the registry (which fills it) and the
/// connection (which empties it).
#[derive(Debug, Default)]
pub struct Inbox {
    state: Mutex<InboxState>,
    /// Signalled whenever `state` gained something; stores a permit when
    /// the connection is busy, so no signal is lost.
    signal: Notify,
    /// Cancelled when the session must end at once (its line was revoked,
    /// or a newer login displaced it); the reason is in `state.ended`.
    end: CancellationToken,
}

/// What the connection takes out of its inbox in one go.
#[derive(Debug, Default)]
pub struct Taken {
    /// Fresh deliveries, in the order they entered the mailbox.
    pub deliveries: VecDeque<StoredDelivery>,
    /// The mailbox must be read: new mail was stored that is not in
    /// `deliveries` (a notice, a commit, or a copy that did not fit).
    pub read_mailbox: bool,
}

#[derive(Debug, Default)]
struct InboxState {
    deliveries: VecDeque<StoredDelivery>,
    /// A copy could not be queued: no more copies are queued (so the
    /// connection never sees a later one before a missing earlier one)
    /// until it has taken this flag and so will read its mailbox.
    overflowed: bool,
    wake: bool,
    /// Bytes of payload in `deliveries`.
    bytes: usize,
    /// Why the session was ended, if it was.
    ended: Option<ErrorReply>,
}

impl Inbox {
    /// Waits until something arrived; pair with [`Inbox::take`].
    pub async fn signalled(&self) {
        self.signal.notified().await;
    }

    /// Everything queued so far. Taking the overflow flag re-opens the
    /// queue: copies queued from now on entered the mailbox after the
    /// mailbox read the connection is about to make began, or are found by it and
    /// skipped as already pushed.
    pub fn take(&self) -> Taken {
        let mut state = self.lock();
        let read_mailbox = std::mem::take(&mut state.overflowed) | std::mem::take(&mut state.wake);
        state.bytes = 0;
        Taken {
            deliveries: std::mem::take(&mut state.deliveries),
            read_mailbox,
        }
    }

    /// Resolves once the session has been ended, with the reason to give
    /// the device.
    pub async fn ended(&self) -> ErrorReply {
        self.end.cancelled().await;
        self.lock().ended.clone().unwrap_or_else(|| {
            ErrorReply::new(ErrorCode::SessionReplaced, "this session was closed")
        })
    }

    pub(crate) fn end(&self, reason: ErrorReply) {
        self.lock().ended.get_or_insert(reason);
        self.end.cancel();
    }

    pub(crate) fn wake(&self) {
        self.lock().wake = true;
        self.signal.notify_one();
    }

    fn push(&self, delivery: StoredDelivery) {
        {
            let mut state = self.lock();
            let size = delivery.payload.len();
            if state.overflowed
                || state.deliveries.len() >= INBOX
                || state.bytes + size > INBOX_BYTES
            {
                state.overflowed = true;
            } else {
                state.bytes += size;
                state.deliveries.push_back(delivery);
            }
        }
        self.signal.notify_one();
    }

    fn lock(&self) -> MutexGuard<'_, InboxState> {
        // Every mutation is a single push or take: a panicking holder
        // cannot leave the state half-changed.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[derive(Debug)]
struct Entry {
    connection: u64,
    device: DeviceId,
    inbox: Arc<Inbox>,
}

/// Maps online accounts to their connections; in a cluster, also tells
/// the other nodes (through [`Cluster`]) what it cannot do here.
#[derive(Debug, Default)]
pub struct Registry {
    online: Mutex<HashMap<AccountId, Vec<Entry>>>,
    cluster: std::sync::OnceLock<Arc<Cluster>>,
}

impl Registry {
    /// Makes this node one of a cluster's: mail for devices with no
    /// connection here, and sessions ended here, are announced to the
    /// other nodes.
    pub fn join(&self, cluster: Arc<Cluster>) {
        let _ = self.cluster.set(cluster);
    }

    /// The cluster this node is in, if any.
    pub fn cluster(&self) -> Option<&Arc<Cluster>> {
        self.cluster.get()
    }

    /// Wakes every connection on this node: each reads its mailbox (after
    /// wake-ups from other nodes may have been lost).
    pub fn wake_all(&self) {
        for entry in self.lock().values().flatten() {
            entry.inbox.wake();
        }
    }

    /// Wakes the connections numbered `part` modulo `parts`: `parts` calls
    /// with each `part` wake every connection once (the cluster's safety
    /// poll, spread over its period rather than one burst of reads).
    pub fn wake_share(&self, part: u64, parts: u64) {
        let parts = parts.max(1);
        for entry in self.lock().values().flatten() {
            if entry.connection % parts == part % parts {
                entry.inbox.wake();
            }
        }
    }

    /// Registers connection `connection` for `account`. An account has at
    /// most `max_sessions`: registering one more ends the oldest.
    pub fn register(
        &self,
        account: &AccountId,
        device: DeviceId,
        connection: u64,
        max_sessions: usize,
    ) -> Arc<Inbox> {
        let inbox = Arc::new(Inbox::default());
        let mut online = self.lock();
        let entries = online.entry(account.clone()).or_default();
        let excess = (entries.len() + 1).saturating_sub(max_sessions.max(1));
        for old in entries.drain(..excess) {
            old.inbox.end(ErrorReply::new(
                ErrorCode::SessionReplaced,
                format!(
                    "a newer login of this account replaced this session (at most {max_sessions} at once)"
                ),
            ));
        }
        entries.push(Entry {
            connection,
            device,
            inbox: Arc::clone(&inbox),
        });
        inbox
    }

    /// Ends every session of `account` at once, telling each `reason`.
    pub fn end_sessions(&self, account: &AccountId, reason: &ErrorReply) {
        if let Some(entries) = self.lock().remove(account) {
            for entry in entries {
                entry.inbox.end(reason.clone());
            }
        }
        if let Some(cluster) = self.cluster.get() {
            cluster.end_account(account);
        }
    }

    /// Ends the sessions of one device of `account` at once (it was
    /// removed from the account), telling each `reason`.
    pub fn end_device_sessions(&self, account: &AccountId, device: DeviceId, reason: &ErrorReply) {
        let mut online = self.lock();
        if let Some(entries) = online.get_mut(account) {
            entries.retain(|entry| {
                let ended = entry.device == device;
                if ended {
                    entry.inbox.end(reason.clone());
                }
                !ended
            });
            if entries.is_empty() {
                online.remove(account);
            }
        }
        if let Some(cluster) = self.cluster.get() {
            cluster.end_device(&DeviceAddr::new(account.clone(), device));
        }
    }

    pub fn unregister(&self, account: &AccountId, connection: u64) {
        let mut online = self.lock();
        if let Some(entries) = online.get_mut(account) {
            entries.retain(|entry| entry.connection != connection);
            if entries.is_empty() {
                online.remove(account);
            }
        }
    }

    /// Wakes every connection of these devices: new mail is stored.
    pub fn notify<'a>(&self, devices: impl IntoIterator<Item = &'a DeviceAddr>) {
        let online = self.lock();
        for device in devices {
            let mut here = false;
            for entry in online.get(&device.account).into_iter().flatten() {
                if entry.device == device.device {
                    entry.inbox.wake();
                    here = true;
                }
            }
            // Perhaps connected to another node.
            if let (false, Some(cluster)) = (here, self.cluster.get()) {
                cluster.wake(device);
            }
        }
    }

    /// Hands deliveries fresh in the mailbox to their recipient devices'
    /// connections; returns the IDs of those whose device has none.
    pub fn deliver(&self, deliveries: Vec<(DeviceAddr, StoredDelivery)>) -> Vec<u64> {
        let online = self.lock();
        let mut unread = Vec::new();
        for (to, delivery) in deliveries {
            let mut connections = online
                .get(&to.account)
                .map(Vec::as_slice)
                .unwrap_or(&[])
                .iter()
                .filter(|entry| entry.device == to.device)
                .peekable();
            if connections.peek().is_none() {
                unread.push(delivery.id);
                // Perhaps connected to another node.
                if let Some(cluster) = self.cluster.get() {
                    cluster.wake(&to);
                }
                continue;
            }
            while let Some(entry) = connections.next() {
                if connections.peek().is_some() {
                    entry.inbox.push(delivery.clone());
                } else {
                    entry.inbox.push(delivery);
                    break;
                }
            }
        }
        unread
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<AccountId, Vec<Entry>>> {
        // The map stays consistent even if a holder panicked mid-operation:
        // every mutation is a single push, retain or remove.
        self.online.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use umbra_proto::DeliveryKind;

    fn account(id: &str) -> AccountId {
        AccountId::parse(id).unwrap_or_else(|e| panic!("{e}"))
    }

    fn delivery(id: u64) -> StoredDelivery {
        StoredDelivery {
            id,
            sender: None,
            kind: DeliveryKind::Application,
            group_id: None,
            payload: vec![0; 8],
            sent_at: 0,
        }
    }

    #[test]
    fn copies_arrive_in_order_until_the_queue_overflows_then_only_the_flag() {
        let registry = Registry::default();
        let account = account("ABCDEFGH");
        let inbox = registry.register(&account, DeviceId::FIRST, 1, 8);
        registry.deliver(
            (1..=INBOX as u64 + 2)
                .map(|id| (DeviceAddr::first(account.clone()), delivery(id)))
                .collect(),
        );
        let taken = inbox.take();
        assert!(
            taken.read_mailbox,
            "the overflow must send the connection to its mailbox"
        );
        let ids: Vec<u64> = taken.deliveries.iter().map(|d| d.id).collect();
        assert_eq!(ids, (1..=INBOX as u64).collect::<Vec<_>>());
        // Taken: the queue is open again and empty, with no buffer held.
        registry.deliver(vec![(DeviceAddr::first(account.clone()), delivery(9999))]);
        let taken = inbox.take();
        assert!(!taken.read_mailbox);
        assert_eq!(taken.deliveries.len(), 1);
        let idle = inbox.take();
        assert_eq!(idle.deliveries.capacity(), 0);
    }

    #[test]
    fn a_notice_wakes_only_that_device_and_unregistered_connections_get_nothing() {
        let registry = Registry::default();
        let a = account("ABCDEFGH");
        let b = account("HGFEDCBA");
        let (a1, a2, b1) = (
            DeviceAddr::first(a.clone()),
            DeviceAddr::new(a.clone(), DeviceId(2)),
            DeviceAddr::first(b.clone()),
        );
        let (ia, ia2, ib) = (
            registry.register(&a, DeviceId::FIRST, 1, 8),
            registry.register(&a, DeviceId(2), 3, 8),
            registry.register(&b, DeviceId::FIRST, 2, 8),
        );
        registry.notify([&a1]);
        assert!(ia.take().read_mailbox);
        assert!(!ia2.take().read_mailbox, "another device of the account");
        assert!(!ib.take().read_mailbox);
        registry.unregister(&a, 1);
        assert_eq!(
            registry.deliver(vec![
                (a1.clone(), delivery(1)),
                (b1.clone(), delivery(2)),
                (a2.clone(), delivery(3))
            ]),
            vec![1],
            "only the copy for the device with no connection is unread"
        );
        let ids = |taken: Taken| taken.deliveries.iter().map(|d| d.id).collect::<Vec<_>>();
        assert_eq!(ids(ia2.take()), [3], "each device gets its own copies");
        assert_eq!(ids(ib.take()), [2]);
        registry.notify([&a1]);
        let taken = ia.take();
        assert!(!taken.read_mailbox && taken.deliveries.is_empty());
    }

    /// The safety poll's share: each call wakes every `parts`-th
    /// connection, so `parts` calls wake each exactly once and a node's
    /// mailbox reads are spread over the period, not all at one tick.
    #[test]
    fn a_share_of_the_connections_wakes_each_once_over_all_shares() {
        let registry = Registry::default();
        let inboxes: Vec<Arc<Inbox>> = (0..24u64)
            .map(|n| {
                let letters = b"ABCDEFGHJKMNPQRSTVWX";
                let letter = letters.get((n % 20) as usize).copied().unwrap_or(b'A');
                let id = format!("{}AAAAAAA", char::from(letter));
                let device = DeviceId(u32::try_from(n / 20).unwrap_or(0) + 1);
                registry.register(&account(&id), device, n, 8)
            })
            .collect();
        let mut woken = vec![0; inboxes.len()];
        for part in 0..12 {
            registry.wake_share(part, 12);
            let now: Vec<usize> = (0..inboxes.len())
                .filter(|&i| {
                    inboxes
                        .get(i)
                        .is_some_and(|inbox| inbox.take().read_mailbox)
                })
                .collect();
            assert_eq!(now.len(), 2, "share {part} woke {now:?}");
            for i in now {
                if let Some(count) = woken.get_mut(i) {
                    *count += 1;
                }
            }
        }
        assert!(woken.iter().all(|&n| n == 1), "{woken:?}");
    }
}
