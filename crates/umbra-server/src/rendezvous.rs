//! Rendezvous for linking a device: short-lived, size-capped slots two
//! devices exchange sealed payloads through (see
//! `umbra_proto::rendezvous`).
//!
//! Held in memory only: a rendezvous lives ten minutes, and one lost to a
//! restart costs the user a new link, never a message. An account has at
//! most one open (opening another closes the first); all of them together
//! hold at most `max_rendezvous_bytes`. Expired ones are dropped when the
//! next is opened, and refused as unknown before that. In a cluster the
//! node that holds a rendezvous answers for it to the others
//! ([`across`]): the device being linked may reach any node.

pub mod across;

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

use tokio_util::sync::CancellationToken;

use umbra_proto::rendezvous::{
    RENDEZVOUS_BYTES, RENDEZVOUS_SLOT_BYTES, RENDEZVOUS_SLOTS, RENDEZVOUS_TTL_SECS,
};
use umbra_proto::{AccountId, ErrorCode, ErrorReply, RendezvousId};

struct Meeting {
    opener: AccountId,
    expires_at: u64,
    slots: BTreeMap<u32, Vec<u8>>,
    bytes: usize,
    /// Cancelled when the meeting goes (closed, replaced, expired): what
    /// answers for it elsewhere stops.
    gone: CancellationToken,
}

impl Drop for Meeting {
    fn drop(&mut self) {
        self.gone.cancel();
    }
}

/// Every open rendezvous of this node.
pub struct Rendezvous {
    max_bytes: usize,
    open: Mutex<Open>,
}

#[derive(Default)]
struct Open {
    meetings: HashMap<RendezvousId, Meeting>,
    /// Payload bytes held by all meetings.
    bytes: usize,
}

impl std::fmt::Debug for Rendezvous {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rendezvous")
            .field("max_bytes", &self.max_bytes)
            .finish_non_exhaustive()
    }
}

fn unknown() -> ErrorReply {
    ErrorReply::new(
        ErrorCode::UnknownRendezvous,
        "no such rendezvous: it expired, was closed, or never existed; start linking again",
    )
}

impl Rendezvous {
    pub fn new(max_bytes: u64) -> Rendezvous {
        Rendezvous {
            max_bytes: usize::try_from(max_bytes).unwrap_or(usize::MAX),
            open: Mutex::default(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Open> {
        // Every change below keeps `bytes` equal to the meetings' sum
        // before it can panic.
        self.open.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Opens a rendezvous for `opener`, closing any it had open; returns
    /// its ID and when it expires.
    pub fn open(&self, opener: &AccountId, now: u64) -> Result<(RendezvousId, u64), ErrorReply> {
        let mut id = [0u8; 16];
        getrandom::getrandom(&mut id)
            .map_err(|_| ErrorReply::new(ErrorCode::Internal, "no randomness available"))?;
        let id = RendezvousId(id);
        let mut open = self.lock();
        let Open { meetings, bytes } = &mut *open;
        meetings.retain(|_, m| {
            let keep = m.expires_at > now && &m.opener != opener;
            if !keep {
                *bytes -= m.bytes;
            }
            keep
        });
        let expires_at = now + RENDEZVOUS_TTL_SECS;
        meetings.insert(
            id,
            Meeting {
                opener: opener.clone(),
                expires_at,
                slots: BTreeMap::new(),
                bytes: 0,
                gone: CancellationToken::new(),
            },
        );
        Ok((id, expires_at))
    }

    /// Whether this node holds rendezvous `id`, open at `now`.
    pub fn holds(&self, id: &RendezvousId, now: u64) -> bool {
        self.lock()
            .meetings
            .get(id)
            .is_some_and(|m| m.expires_at > now)
    }

    /// Cancelled once rendezvous `id` is gone from this node (at once if
    /// it is not here).
    pub fn gone(&self, id: &RendezvousId) -> CancellationToken {
        self.lock()
            .meetings
            .get(id)
            .map(|m| m.gone.clone())
            .unwrap_or_else(|| {
                let gone = CancellationToken::new();
                gone.cancel();
                gone
            })
    }

    /// Writes `slot` of rendezvous `id`, once.
    pub fn put(
        &self,
        id: &RendezvousId,
        slot: u32,
        payload: Vec<u8>,
        now: u64,
    ) -> Result<(), ErrorReply> {
        check_put(slot, payload.len())?;
        let mut open = self.lock();
        // Expired ones give their bytes back before the budget is checked.
        let Open { meetings, bytes } = &mut *open;
        meetings.retain(|_, m| {
            let live = m.expires_at > now;
            if !live {
                *bytes -= m.bytes;
            }
            live
        });
        let total = open.bytes;
        let meeting = open
            .meetings
            .get_mut(id)
            .filter(|m| m.expires_at > now)
            .ok_or_else(unknown)?;
        if meeting.slots.contains_key(&slot) {
            return Err(ErrorReply::new(
                ErrorCode::SlotTaken,
                format!("slot {slot} of this rendezvous was already written"),
            ));
        }
        if meeting.bytes + payload.len() > RENDEZVOUS_BYTES {
            return Err(ErrorReply::new(
                ErrorCode::QuotaExceeded,
                format!("a rendezvous holds at most {RENDEZVOUS_BYTES} bytes"),
            ));
        }
        if total + payload.len() > self.max_bytes {
            return Err(ErrorReply::new(
                ErrorCode::ServerBusy,
                "the server holds as many linking payloads as it allows; try again in a few minutes",
            ));
        }
        let len = payload.len();
        meeting.bytes += len;
        meeting.slots.insert(slot, payload);
        open.bytes += len;
        Ok(())
    }

    /// What `slot` of rendezvous `id` holds, if it was written.
    pub fn get(
        &self,
        id: &RendezvousId,
        slot: u32,
        now: u64,
    ) -> Result<Option<Vec<u8>>, ErrorReply> {
        let open = self.lock();
        let meeting = open
            .meetings
            .get(id)
            .filter(|m| m.expires_at > now)
            .ok_or_else(unknown)?;
        Ok(meeting.slots.get(&slot).cloned())
    }

    /// Deletes rendezvous `id`, which `opener` must have opened.
    pub fn close(&self, id: &RendezvousId, opener: &AccountId) -> Result<(), ErrorReply> {
        let mut open = self.lock();
        match open.meetings.get(id) {
            Some(meeting) if &meeting.opener == opener => {
                let freed = meeting.bytes;
                open.meetings.remove(id);
                open.bytes -= freed;
                Ok(())
            }
            _ => Err(unknown()),
        }
    }
}

/// Refuses a put no rendezvous takes: a slot past the last, a payload
/// larger than a slot.
pub fn check_put(slot: u32, len: usize) -> Result<(), ErrorReply> {
    if slot >= RENDEZVOUS_SLOTS {
        return Err(ErrorReply::new(
            ErrorCode::InvalidRequest,
            format!(
                "rendezvous slots are numbered 0 to {}",
                RENDEZVOUS_SLOTS - 1
            ),
        ));
    }
    if len > RENDEZVOUS_SLOT_BYTES {
        return Err(ErrorReply::new(
            ErrorCode::InvalidRequest,
            format!(
                "a rendezvous slot holds at most {RENDEZVOUS_SLOT_BYTES} bytes, not {}",
                len
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn alice() -> AccountId {
        AccountId::parse("AAAAAAAA").unwrap_or_else(|e| panic!("{e}"))
    }

    fn bob() -> AccountId {
        AccountId::parse("BBBBBBBB").unwrap_or_else(|e| panic!("{e}"))
    }

    fn code(result: Result<impl std::fmt::Debug, ErrorReply>) -> ErrorCode {
        result.err().map_or(ErrorCode::Unspecified, |e| e.code)
    }

    #[test]
    fn slots_are_written_once_read_often_and_gone_with_their_rendezvous() {
        let rendezvous = Rendezvous::new(1 << 20);
        let (id, expires_at) = rendezvous
            .open(&alice(), 100)
            .unwrap_or_else(|e| panic!("{e:?}"));
        assert_eq!(expires_at, 100 + RENDEZVOUS_TTL_SECS);
        assert_eq!(rendezvous.get(&id, 0, 101).ok(), Some(None));
        assert!(rendezvous.put(&id, 0, vec![1, 2], 101).is_ok());
        assert_eq!(
            code(rendezvous.put(&id, 0, vec![3], 101)),
            ErrorCode::SlotTaken
        );
        assert_eq!(rendezvous.get(&id, 0, 102).ok(), Some(Some(vec![1, 2])));
        assert_eq!(rendezvous.get(&id, 0, 102).ok(), Some(Some(vec![1, 2])));
        assert_eq!(
            code(rendezvous.put(&id, RENDEZVOUS_SLOTS, vec![], 101)),
            ErrorCode::InvalidRequest
        );
        // Only its opener closes it; then it is unknown.
        assert_eq!(
            code(rendezvous.close(&id, &bob())),
            ErrorCode::UnknownRendezvous
        );
        assert!(rendezvous.close(&id, &alice()).is_ok());
        assert_eq!(
            code(rendezvous.get(&id, 0, 103)),
            ErrorCode::UnknownRendezvous
        );
        assert_eq!(rendezvous.lock().bytes, 0);
    }

    #[test]
    fn rendezvous_expire_and_one_per_account_stays_open() {
        let rendezvous = Rendezvous::new(1 << 20);
        let (first, _) = rendezvous
            .open(&alice(), 0)
            .unwrap_or_else(|e| panic!("{e:?}"));
        assert!(rendezvous.put(&first, 1, vec![0; 10], 1).is_ok());
        let (second, _) = rendezvous
            .open(&alice(), 2)
            .unwrap_or_else(|e| panic!("{e:?}"));
        assert_eq!(
            code(rendezvous.get(&first, 1, 3)),
            ErrorCode::UnknownRendezvous
        );
        assert_eq!(rendezvous.lock().bytes, 0);
        assert!(rendezvous.put(&second, 1, vec![0; 10], 3).is_ok());
        let (bobs, _) = rendezvous
            .open(&bob(), 2)
            .unwrap_or_else(|e| panic!("{e:?}"));
        let late = 2 + RENDEZVOUS_TTL_SECS;
        assert_eq!(
            code(rendezvous.get(&second, 0, late)),
            ErrorCode::UnknownRendezvous
        );
        assert_eq!(
            code(rendezvous.put(&bobs, 0, vec![1], late)),
            ErrorCode::UnknownRendezvous
        );
        // Expired, their bytes are free again.
        assert_eq!(rendezvous.lock().bytes, 0);
    }

    #[test]
    fn the_node_and_each_rendezvous_hold_a_bounded_number_of_bytes() {
        let rendezvous = Rendezvous::new(2 * RENDEZVOUS_SLOT_BYTES as u64);
        let (a, _) = rendezvous
            .open(&alice(), 0)
            .unwrap_or_else(|e| panic!("{e:?}"));
        let (b, _) = rendezvous
            .open(&bob(), 0)
            .unwrap_or_else(|e| panic!("{e:?}"));
        let full = || vec![0u8; RENDEZVOUS_SLOT_BYTES];
        assert_eq!(
            code(rendezvous.put(&a, 0, vec![0; RENDEZVOUS_SLOT_BYTES + 1], 1)),
            ErrorCode::InvalidRequest
        );
        assert!(rendezvous.put(&a, 0, full(), 1).is_ok());
        assert!(rendezvous.put(&b, 0, full(), 1).is_ok());
        assert_eq!(
            code(rendezvous.put(&a, 1, vec![1], 1)),
            ErrorCode::ServerBusy
        );
        assert!(rendezvous.close(&b, &bob()).is_ok());
        assert!(rendezvous.put(&a, 1, vec![1], 1).is_ok());

        let roomy = Rendezvous::new(u64::MAX);
        let (c, _) = roomy.open(&alice(), 0).unwrap_or_else(|e| panic!("{e:?}"));
        let mut slot = 0;
        let refused = loop {
            match roomy.put(&c, slot, full(), 1) {
                Ok(()) => slot += 1,
                Err(error) => break error.code,
            }
        };
        assert_eq!(refused, ErrorCode::QuotaExceeded);
        assert_eq!(slot as usize, RENDEZVOUS_BYTES / RENDEZVOUS_SLOT_BYTES);
    }
}
