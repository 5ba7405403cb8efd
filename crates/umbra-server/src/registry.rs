//! Which accounts have a connection open, and how a stored delivery reaches
//! the connection that will push it.
//!
//! A fan-out hands each online recipient's connection its copy directly
//! (the row exactly as committed), so the common case never reads the
//! mailbox back. Everything else (notices, commits, a full queue) only
//! wakes the connection, which then reads the mailbox: the store stays the
//! source of truth and nothing depends on the in-memory copy arriving.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::{Notify, mpsc};
use umbra_proto::AccountId;
use umbra_store::StoredDelivery;

/// Deliveries queued in memory per connection before it falls back to
/// reading its mailbox.
const INBOX: usize = 1024;

/// What one connection's pump listens to.
#[derive(Debug)]
pub struct Inbox {
    /// "New mail is stored": read the mailbox.
    pub wake: Arc<Notify>,
    /// Fresh deliveries, in the order they were committed.
    pub deliveries: mpsc::Receiver<StoredDelivery>,
    /// Set when a delivery could not be queued; the pump clears it before
    /// reading its mailbox.
    pub overflowed: Arc<AtomicBool>,
}

#[derive(Debug)]
struct Entry {
    connection: u64,
    wake: Arc<Notify>,
    deliveries: mpsc::Sender<StoredDelivery>,
    /// Set when a copy could not be queued: no more copies are queued (so
    /// the pump never sees a later one before a missing earlier one) until
    /// the pump has read its mailbox.
    overflowed: Arc<AtomicBool>,
}

/// Maps online accounts to their connections.
#[derive(Debug, Default)]
pub struct Registry {
    online: Mutex<HashMap<AccountId, Vec<Entry>>>,
}

impl Registry {
    /// Registers connection `connection` for `account`.
    pub fn register(&self, account: &AccountId, connection: u64) -> Inbox {
        let wake = Arc::new(Notify::new());
        let (sender, receiver) = mpsc::channel(INBOX);
        let overflowed = Arc::new(AtomicBool::new(false));
        self.lock().entry(account.clone()).or_default().push(Entry {
            connection,
            wake: Arc::clone(&wake),
            deliveries: sender,
            overflowed: Arc::clone(&overflowed),
        });
        Inbox {
            wake,
            deliveries: receiver,
            overflowed,
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

    /// Wakes every connection of these accounts: new mail is stored.
    pub fn notify<'a>(&self, accounts: impl IntoIterator<Item = &'a AccountId>) {
        let online = self.lock();
        for account in accounts {
            for entry in online.get(account).into_iter().flatten() {
                // Stores a permit if the pump is busy, so no wake-up is lost.
                entry.wake.notify_one();
            }
        }
    }

    /// Hands freshly committed deliveries to their recipients' connections.
    pub fn deliver(&self, deliveries: Vec<(AccountId, StoredDelivery)>) {
        let online = self.lock();
        for (account, delivery) in deliveries {
            for entry in online.get(&account).into_iter().flatten() {
                if entry.overflowed.load(Ordering::SeqCst)
                    || entry.deliveries.try_send(delivery.clone()).is_err()
                {
                    entry.overflowed.store(true, Ordering::SeqCst);
                    entry.wake.notify_one();
                }
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<AccountId, Vec<Entry>>> {
        // The map stays consistent even if a holder panicked mid-operation:
        // every mutation is a single push, retain or remove.
        self.online.lock().unwrap_or_else(|p| p.into_inner())
    }
}
