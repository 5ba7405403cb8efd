//! Limits one connection, one source address or one account may not
//! exceed, so that no single client can exhaust the node for everyone
//! else: connections per IP address, requests per second per connection,
//! and the hourly budgets' buckets (checked and charged by the services;
//! shared between a cluster's nodes by [`crate::spending`]). (Quotas
//! counted in the store are checked by the services against it; the
//! session cap lives in the [`crate::registry::Registry`].)

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

/// Open connections per source address.
#[derive(Debug)]
pub struct AddressSlots {
    max: usize,
    open: Mutex<HashMap<IpAddr, usize>>,
}

/// One connection's slot; gives it back when dropped.
#[derive(Debug)]
pub struct AddressSlot {
    slots: Arc<AddressSlots>,
    address: IpAddr,
}

impl AddressSlots {
    pub fn new(max: usize) -> Arc<AddressSlots> {
        Arc::new(AddressSlots {
            max: max.max(1),
            open: Mutex::default(),
        })
    }

    /// A slot for one more connection from `address`, unless it already has
    /// the most allowed.
    pub fn take(self: &Arc<Self>, address: IpAddr) -> Option<AddressSlot> {
        let mut open = self.lock();
        let count = open.entry(address).or_default();
        if *count >= self.max {
            return None;
        }
        *count += 1;
        Some(AddressSlot {
            slots: Arc::clone(self),
            address,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<IpAddr, usize>> {
        // Every mutation is one increment or decrement.
        self.open.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Drop for AddressSlot {
    fn drop(&mut self) {
        let mut open = self.slots.lock();
        if let Some(count) = open.get_mut(&self.address) {
            *count -= 1;
            if *count == 0 {
                open.remove(&self.address);
            }
        }
    }
}

/// A token bucket: `rate` requests per second sustained, `burst` at once.
#[derive(Debug)]
pub struct RateLimit {
    rate: f64,
    burst: f64,
    tokens: f64,
    refilled: Instant,
}

impl RateLimit {
    pub fn new(rate: u32, burst: u32) -> RateLimit {
        let burst = f64::from(burst.max(1));
        RateLimit {
            rate: f64::from(rate.max(1)),
            burst,
            tokens: burst,
            refilled: Instant::now(),
        }
    }

    /// Takes a token for one request; false if the bucket is empty.
    pub fn allow(&mut self, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.refilled).as_secs_f64();
        self.refilled = now;
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// Bytes of deliveries each account may put into others' mailboxes per
/// hour (a message's size times its recipients), as a bucket that refills
/// continuously: what keeps one account from filling the store for
/// everyone. Kept in memory (a restart forgets it); only accounts that
/// sent recently are remembered. In a cluster every node charges its
/// buckets with what the others charged too (`crate::spending`), so the
/// budget is the cluster's, not each node's.
#[derive(Debug)]
pub struct SendBudget<K = umbra_proto::AccountId> {
    per_hour: f64,
    accounts: Mutex<HashMap<K, (f64, Instant)>>,
    /// What this node charged since the other nodes were last told; kept
    /// only once [`SendBudget::share`] was called.
    untold: Mutex<Option<HashMap<K, u64>>>,
}

impl<K: std::hash::Hash + Eq + Clone> SendBudget<K> {
    pub fn new(bytes_per_hour: u64) -> SendBudget<K> {
        SendBudget {
            per_hour: (bytes_per_hour.max(1)) as f64,
            accounts: Mutex::default(),
            untold: Mutex::default(),
        }
    }

    /// From now on, keeps what this node charges for
    /// [`SendBudget::take_untold`].
    pub fn share(&self) {
        self.lock_untold().get_or_insert_with(HashMap::new);
    }

    /// What this node charged since the last call, per key (empty unless
    /// [`SendBudget::share`] was called).
    pub fn take_untold(&self) -> Vec<(K, u64)> {
        match self.lock_untold().as_mut() {
            Some(untold) => untold.drain().collect(),
            None => Vec::new(),
        }
    }

    /// Charges `account` for `bytes` another node charged it, leaving it
    /// at most an hour's refill below zero (whatever another node says, it
    /// cannot refuse the account for longer than an hour).
    pub fn charge_elsewhere(&self, account: &K, bytes: u64, now: Instant) {
        let mut accounts = self.lock();
        let left = accounts
            .get(account)
            .map_or(self.per_hour, |&entry| self.refilled(entry, now));
        // (A bucket this node overdrew further itself stays as it is.)
        let floor = left.min(-self.per_hour);
        accounts.insert(account.clone(), ((left - bytes as f64).max(floor), now));
    }

    fn lock_untold(&self) -> std::sync::MutexGuard<'_, Option<HashMap<K, u64>>> {
        // Every mutation is one insert or drain.
        self.untold.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn refilled(&self, (left, at): (f64, Instant), now: Instant) -> f64 {
        let elapsed = now.saturating_duration_since(at).as_secs_f64();
        (left + elapsed * self.per_hour / 3600.0).min(self.per_hour)
    }

    /// Whether `account` may send now: its budget is not used up. If not,
    /// how long until it is positive again.
    pub fn check(&self, account: &K, now: Instant) -> Result<(), Duration> {
        let accounts = self.lock();
        let Some(&entry) = accounts.get(account) else {
            return Ok(());
        };
        let left = self.refilled(entry, now);
        if left > 0.0 {
            Ok(())
        } else {
            Err(Duration::from_secs_f64(-left * 3600.0 / self.per_hour))
        }
    }

    /// Charges `account` for `bytes` delivered (the budget may go below
    /// zero by the last message; the next waits until it is positive).
    pub fn charge(&self, account: &K, bytes: u64, now: Instant) {
        self.spend(account, bytes, now);
        if let Some(untold) = self.lock_untold().as_mut() {
            let entry = untold.entry(account.clone()).or_default();
            *entry = entry.saturating_add(bytes);
        }
    }

    fn spend(&self, account: &K, bytes: u64, now: Instant) {
        let mut accounts = self.lock();
        let left = accounts
            .get(account)
            .map_or(self.per_hour, |&entry| self.refilled(entry, now));
        accounts.insert(account.clone(), (left - bytes as f64, now));
    }

    /// Forgets the accounts whose budget has refilled completely.
    pub fn prune(&self, now: Instant) {
        let per_hour = self.per_hour;
        self.lock()
            .retain(|_, entry| self.refilled(*entry, now) < per_hour);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<K, (f64, Instant)>> {
        // Every mutation is one insert or retain.
        self.accounts.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_address_gets_its_slots_back_when_connections_end() {
        let slots = AddressSlots::new(2);
        let a: IpAddr = [127, 0, 0, 1].into();
        let b: IpAddr = [127, 0, 0, 2].into();
        let first = slots.take(a);
        let second = slots.take(a);
        assert!(first.is_some() && second.is_some());
        assert!(
            slots.take(a).is_none(),
            "a third connection from one address"
        );
        assert!(slots.take(b).is_some(), "another address is not affected");
        drop(first);
        assert!(slots.take(a).is_some());
    }

    #[test]
    fn the_bucket_allows_a_burst_then_the_rate() {
        let start = Instant::now();
        let mut limit = RateLimit::new(10, 5);
        limit.refilled = start;
        assert_eq!((0..8).filter(|_| limit.allow(start)).count(), 5);
        // A tenth of a second refills one token at 10 per second.
        let later = start + Duration::from_millis(100);
        assert!(limit.allow(later));
        assert!(!limit.allow(later));
        // The bucket never holds more than the burst.
        let much_later = later + Duration::from_secs(60);
        assert_eq!((0..8).filter(|_| limit.allow(much_later)).count(), 5);
    }

    #[test]
    fn a_send_budget_refills_over_the_hour_and_forgets_idle_accounts() {
        let budget = SendBudget::new(3600);
        let alice = umbra_proto::AccountId::parse("AAAAAAAA").unwrap_or_else(|e| panic!("{e}"));
        let bob = umbra_proto::AccountId::parse("BBBBBBBB").unwrap_or_else(|e| panic!("{e}"));
        let start = Instant::now();
        assert!(budget.check(&alice, start).is_ok());
        // One message may overdraw; the next waits for the refill.
        budget.charge(&alice, 3700, start);
        let wait = budget.check(&alice, start).err();
        assert!(wait.is_some_and(|w| w > Duration::from_secs(99) && w <= Duration::from_secs(100)));
        assert!(
            budget.check(&bob, start).is_ok(),
            "another account is not affected"
        );
        let later = start + Duration::from_secs(101);
        assert!(budget.check(&alice, later).is_ok());
        budget.prune(later);
        assert_eq!(budget.lock().len(), 1, "alice is still refilling");
        budget.prune(start + Duration::from_secs(3700));
        assert!(budget.lock().is_empty());
    }

    #[test]
    fn a_shared_budget_keeps_what_to_tell_and_counts_what_it_hears() {
        let budget = SendBudget::new(3600);
        let alice = umbra_proto::AccountId::parse("AAAAAAAA").unwrap_or_else(|e| panic!("{e}"));
        let start = Instant::now();
        budget.charge(&alice, 100, start);
        assert!(
            budget.take_untold().is_empty(),
            "nothing is kept before sharing"
        );
        budget.share();
        budget.charge(&alice, 100, start);
        budget.charge(&alice, 200, start);
        // What another node charged counts here, and is not told back.
        budget.charge_elsewhere(&alice, 3200, start);
        assert_eq!(budget.take_untold(), vec![(alice.clone(), 300)]);
        assert!(budget.take_untold().is_empty(), "told once");
        assert!(
            budget.check(&alice, start).is_err(),
            "3,600 bytes of 3,600 spent, here and elsewhere"
        );
        // Another node's word refuses an account for an hour at most.
        budget.charge_elsewhere(&alice, u64::MAX, start);
        let wait = budget.check(&alice, start).err();
        assert!(
            wait.is_some_and(|w| w <= Duration::from_secs(3600)),
            "{wait:?}"
        );
        assert!(
            budget
                .check(&alice, start + Duration::from_secs(3601))
                .is_ok()
        );
        // A bucket this node overdrew further itself is not raised by
        // another node's charge.
        let bob = umbra_proto::AccountId::parse("BBBBBBBB").unwrap_or_else(|e| panic!("{e}"));
        budget.charge(&bob, 4 * 3600, start);
        budget.charge_elsewhere(&bob, 1, start);
        let wait = budget.check(&bob, start).err();
        assert!(
            wait.is_some_and(|w| w >= Duration::from_secs(3 * 3600)),
            "{wait:?}"
        );
    }
}
