//! Which accounts have a connection open, so that a stored delivery wakes
//! the connection that will push it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;
use umbra_proto::AccountId;

/// The wake-up signals of one account's open connections, by connection ID.
type Connections = Vec<(u64, Arc<Notify>)>;

/// Maps online accounts to the wake-up signals of their connections.
#[derive(Debug, Default)]
pub struct Registry {
    online: Mutex<HashMap<AccountId, Connections>>,
}

impl Registry {
    /// Registers connection `connection` for `account`; its pump waits on
    /// the returned signal.
    pub fn register(&self, account: &AccountId, connection: u64) -> Arc<Notify> {
        let notify = Arc::new(Notify::new());
        self.lock()
            .entry(account.clone())
            .or_default()
            .push((connection, Arc::clone(&notify)));
        notify
    }

    pub fn unregister(&self, account: &AccountId, connection: u64) {
        let mut online = self.lock();
        if let Some(entries) = online.get_mut(account) {
            entries.retain(|(id, _)| *id != connection);
            if entries.is_empty() {
                online.remove(account);
            }
        }
    }

    /// Wakes every connection of these accounts: new mail is stored.
    pub fn notify<'a>(&self, accounts: impl IntoIterator<Item = &'a AccountId>) {
        let online = self.lock();
        for account in accounts {
            for (_, notify) in online.get(account).into_iter().flatten() {
                // Stores a permit if the pump is busy, so no wake-up is lost.
                notify.notify_one();
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<AccountId, Connections>> {
        // The map stays consistent even if a holder panicked mid-operation:
        // every mutation is a single push, retain or remove.
        self.online.lock().unwrap_or_else(|p| p.into_inner())
    }
}
