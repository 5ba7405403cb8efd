//! The ack window: fan-out copies that wait a moment for their recipient's
//! acknowledgement before they are written.
//!
//! A fan-out is checked, and its copies get their IDs, inside a group
//! commit like any other write, but the rows are not inserted there. Once
//! that commit is durable the copies are *staged* here: mailbox reads see
//! them and online recipients are handed them at once. A copy acknowledged
//! within the window never touches the disk (its insert and its delete
//! both vanish); the others are inserted by the first group commit after
//! their window ends. The sender is told "accepted" only once every one of
//! its copies is either on disk or acknowledged, so nothing that was
//! acknowledged to a sender can be lost; a crash loses only copies whose
//! sender was never answered (and that some recipients may have received).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;
use umbra_proto::AccountId;

use crate::{Durable, StoreError, StoredDelivery, Timestamp};

/// How long a staged copy waits for its acknowledgement before it is
/// written. Long enough for a device on a fast link to receive and
/// acknowledge, short enough that a sender hears "accepted" promptly.
pub const ACK_WINDOW: Duration = Duration::from_millis(10);

/// How long past the end of the oldest open window the writer waits before
/// it writes: one commit then carries every copy whose window ended
/// meanwhile. A commit rewrites each mailbox index page it touches, about
/// one per recipient, so a few large commits write far less than many
/// small ones. A copy waits at most `ACK_WINDOW + SWEEP` (and may still be
/// acknowledged, and never written, until its sweep).
pub const SWEEP: Duration = Duration::from_millis(10);

/// One staged copy.
pub(crate) struct Staged {
    pub recipient: AccountId,
    pub delivery: StoredDelivery,
    pub expires_at: Timestamp,
    /// When its window ends.
    due: Instant,
    /// Taken by a group commit that is writing it: an acknowledgement now
    /// goes to the database, after that commit.
    persisting: bool,
    sender: Arc<Settlement>,
}

/// A sender's answer, given when the last of its copies is settled
/// (written, or acknowledged).
struct Settlement {
    unsettled: AtomicUsize,
    answer: Mutex<Option<oneshot::Sender<crate::Result<()>>>>,
}

impl Settlement {
    fn answer(&self, result: crate::Result<()>) {
        let answer = self.answer.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(answer) = answer {
            let _ = answer.send(result);
        }
    }

    fn settle_one(&self) {
        if self.unsettled.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.answer(Ok(()));
        }
    }
}

/// The staged copies, by delivery ID (so in the order they were
/// committed, and so also in the order their windows end).
#[derive(Default)]
pub(crate) struct Staging {
    rows: BTreeMap<u64, Staged>,
    /// When the writer next looks at the staged copies by itself.
    writer_wakes: Option<Instant>,
}

impl Staging {
    /// Stages a fan-out's committed copies; the returned [`Durable`]
    /// resolves once each is written or acknowledged.
    pub fn stage(
        &mut self,
        copies: &[(AccountId, StoredDelivery)],
        expires_at: Timestamp,
        now: Instant,
    ) -> Durable {
        if copies.is_empty() {
            return Durable::ready();
        }
        let (answer, answered) = oneshot::channel();
        let sender = Arc::new(Settlement {
            unsettled: AtomicUsize::new(copies.len()),
            answer: Mutex::new(Some(answer)),
        });
        for (recipient, delivery) in copies {
            self.rows.insert(
                delivery.id,
                Staged {
                    recipient: recipient.clone(),
                    delivery: delivery.clone(),
                    expires_at,
                    due: now + ACK_WINDOW,
                    persisting: false,
                    sender: Arc::clone(&sender),
                },
            );
        }
        Durable::waiting(answered)
    }

    /// Removes the staged copies among `ids` that belong to `recipient`
    /// (and are not being written); returns how many, and the IDs left
    /// for the database.
    pub fn ack(&mut self, recipient: &AccountId, ids: &[u64]) -> (usize, Vec<u64>) {
        let mut removed = 0;
        let mut rest = Vec::new();
        for &id in ids {
            match self.rows.get(&id) {
                Some(row) if !row.persisting && row.recipient == *recipient => {
                    if let Some(row) = self.rows.remove(&id) {
                        row.sender.settle_one();
                        removed += 1;
                    }
                }
                _ => rest.push(id),
            }
        }
        (removed, rest)
    }

    /// `recipient`'s staged copies above `after` that have not expired at
    /// `now`, in order.
    pub fn pending(
        &self,
        recipient: &AccountId,
        after: u64,
        now: Timestamp,
    ) -> Vec<StoredDelivery> {
        self.rows
            .range(after.saturating_add(1)..)
            .filter(|(_, row)| row.recipient == *recipient && row.expires_at > now)
            .map(|(_, row)| row.delivery.clone())
            .collect()
    }

    /// When the earliest window that is still open ends.
    pub fn next_due(&self) -> Option<Instant> {
        self.rows
            .values()
            .find(|row| !row.persisting)
            .map(|row| row.due)
    }

    /// When the next sweep is due: [`SWEEP`] after the earliest open
    /// window ends.
    pub fn next_sweep(&self) -> Option<Instant> {
        self.next_due().map(|due| due + SWEEP)
    }

    /// The writer is going to sleep until `at` unless a write arrives.
    pub fn writer_wakes_at(&mut self, at: Instant) {
        self.writer_wakes = Some(at);
    }

    /// Copies were staged outside the writer: whether it must be woken to
    /// sweep them in time (if so, it is taken as woken, so the copies
    /// staged after these do not wake it again).
    pub fn wake_writer(&mut self) -> bool {
        let Some(sweep) = self.next_sweep() else {
            return false;
        };
        match self.writer_wakes {
            Some(at) if at <= sweep => false,
            _ => {
                self.writer_wakes = Some(sweep);
                true
            }
        }
    }

    /// If a sweep is due at `now`, marks every copy whose window ended by
    /// `now` as being written and returns their IDs (in order); otherwise
    /// none.
    pub fn sweep(&mut self, now: Instant) -> Vec<u64> {
        match self.next_sweep() {
            Some(at) if at <= now => self.take_due(now),
            _ => Vec::new(),
        }
    }

    /// Marks every copy whose window ended by `now` as being written, and
    /// returns their IDs (in order).
    pub fn take_due(&mut self, now: Instant) -> Vec<u64> {
        let mut due = Vec::new();
        for (id, row) in self.rows.iter_mut() {
            if row.due > now {
                break;
            }
            if !row.persisting {
                row.persisting = true;
                due.push(*id);
            }
        }
        due
    }

    pub fn get(&self, id: u64) -> Option<&Staged> {
        self.rows.get(&id)
    }

    /// The commit that wrote `ids` is durable (or, with an error, failed:
    /// those senders are told so and the copies dropped).
    pub fn written(&mut self, ids: &[u64], outcome: &std::result::Result<(), String>) {
        for id in ids {
            if let Some(row) = self.rows.remove(id) {
                match outcome {
                    Ok(()) => row.sender.settle_one(),
                    Err(error) => row.sender.answer(Err(StoreError::Backend(error.clone()))),
                }
            }
        }
    }

    /// Drops `recipient`'s staged copies (the line was revoked), settling
    /// their senders: the copies were accepted, there is just no one left
    /// to read them.
    pub fn drop_recipient(&mut self, recipient: &AccountId) {
        let ids: Vec<u64> = self
            .rows
            .iter()
            .filter(|(_, row)| row.recipient == *recipient)
            .map(|(id, _)| *id)
            .collect();
        for id in ids {
            if let Some(row) = self.rows.remove(&id) {
                row.sender.settle_one();
            }
        }
    }

    /// Every copy still staged, for a last write at shutdown (no window
    /// ends later than [`ACK_WINDOW`] from now).
    pub fn take_all(&mut self) -> Vec<u64> {
        self.take_due(Instant::now() + ACK_WINDOW)
    }
}

#[cfg(test)]
#[allow(clippy::expect_used)] // a test fails loudly
mod tests {
    use super::*;
    use umbra_proto::DeliveryKind;

    fn copy(id: u64) -> (AccountId, StoredDelivery) {
        let account = |text: &str| AccountId::parse(text).expect("a valid account ID");
        let delivery = StoredDelivery {
            id,
            sender: account("AAAAAAAA"),
            kind: DeliveryKind::Application,
            group_id: None,
            payload: vec![7; 16],
            sent_at: 0,
        };
        (account("BBBBBBBB"), delivery)
    }

    #[test]
    fn a_sweep_waits_past_the_oldest_window_and_takes_every_ended_one() {
        let mut staging = Staging::default();
        let start = Instant::now();
        let _first = staging.stage(&[copy(1)], 100, start);
        let later = start + ACK_WINDOW / 2;
        let _second = staging.stage(&[copy(2)], 100, later);
        let _third = staging.stage(&[copy(3)], 100, start + ACK_WINDOW + SWEEP);

        // Windows that ended are not written before the sweep is due.
        assert_eq!(staging.next_sweep(), Some(start + ACK_WINDOW + SWEEP));
        assert!(staging.sweep(start + ACK_WINDOW).is_empty());
        assert!(staging.sweep(start + ACK_WINDOW + SWEEP / 2).is_empty());
        // Once it is, it takes both ended windows and leaves the open one.
        assert_eq!(staging.sweep(start + ACK_WINDOW + SWEEP), vec![1, 2]);
        assert_eq!(
            staging.next_sweep(),
            Some(start + 2 * ACK_WINDOW + 2 * SWEEP)
        );
        // A copy being written is not acknowledged from memory.
        let (forgotten, rest) = staging.ack(&copy(1).0, &[1, 3]);
        assert_eq!((forgotten, rest), (1, vec![1]));
    }
}
