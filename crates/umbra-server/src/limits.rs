//! Limits one connection or one source address may not exceed, so that no
//! single client can exhaust the node for everyone else: connections per
//! IP address, and requests per second per connection. (Per-account
//! quotas are checked by the services against the store; the session cap
//! lives in the [`crate::registry::Registry`].)

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
/// sent recently are remembered.
#[derive(Debug)]
pub struct SendBudget<K = umbra_proto::AccountId> {
    per_hour: f64,
    accounts: Mutex<HashMap<K, (f64, Instant)>>,
}

impl<K: std::hash::Hash + Eq + Clone> SendBudget<K> {
    pub fn new(bytes_per_hour: u64) -> SendBudget<K> {
        SendBudget {
            per_hour: (bytes_per_hour.max(1)) as f64,
            accounts: Mutex::default(),
        }
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
}
