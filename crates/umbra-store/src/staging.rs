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
//!
//! The window widens while acknowledgements come late (see [`Window`]): a
//! server that fell behind for a moment, and so sees acknowledgements
//! after their window, would otherwise write (and then delete) every copy
//! in the meantime, which is more work exactly when it has the least time,
//! and stay behind. A copy whose recipient has no connection open does not
//! wait out its own window ([`Staging::no_reader`]): no acknowledgement can
//! come in time.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;
use umbra_proto::{AccountId, DeviceAddr};

use crate::{Durable, StoreError, StoredDelivery, Timestamp};

/// How long a staged copy waits for its acknowledgement before it is
/// written, while acknowledgements come in time. Long enough for a device
/// on a fast link to receive and acknowledge, short enough that a sender
/// whose recipient does not answer hears "accepted" promptly.
pub const ACK_WINDOW: Duration = Duration::from_millis(10);

/// The widest the window grows while acknowledgements come late: how long
/// a sender may wait for "accepted" on an overloaded server.
pub const MAX_ACK_WINDOW: Duration = Duration::from_millis(320);

/// How often the window is reconsidered.
const ADJUST_EVERY: Duration = Duration::from_millis(100);

/// Late acknowledgements, out of every 1,000 from a connected recipient,
/// above which the window doubles.
const LATE_PER_MILLE: u64 = 20;

/// Periods in a row without a late acknowledgement before the window
/// halves: it widens at once and narrows slowly, so it does not flap.
const CALM_PERIODS: u32 = 10;

/// How long after a watched copy was written its acknowledgement still
/// counts as late (the recipient was connected, and answered, just not in
/// time); later than that it is a device that was away.
const LATE_HORIZON: Duration = Duration::from_secs(1);

/// How long past the end of the oldest open window the writer waits before
/// it writes: one commit then carries every copy whose window ended
/// meanwhile. A commit rewrites each mailbox index page it touches, about
/// one per recipient, so a few large commits write far less than many
/// small ones. A copy waits at most `ACK_WINDOW + SWEEP` (and may still be
/// acknowledged, and never written, until its sweep).
pub const SWEEP: Duration = Duration::from_millis(10);

/// One staged copy.
struct Staged {
    recipient: DeviceAddr,
    delivery: StoredDelivery,
    expires_at: Timestamp,
    /// When its window ends.
    due: Instant,
    /// Taken by a group commit that is writing it: an acknowledgement now
    /// goes to the database, after that commit.
    persisting: bool,
    /// Its recipient had a connection open when it was staged, so an
    /// acknowledgement may come in the window.
    watched: bool,
    sender: Arc<Settlement>,
}

/// A copy a sweep took, as the writer inserts it (cloned, so the insert
/// runs without the staging lock).
pub(crate) struct DueCopy {
    pub recipient: DeviceAddr,
    pub delivery: StoredDelivery,
    pub expires_at: Timestamp,
}

/// The ack window's current length, and what decides it: of the
/// acknowledgements for copies whose recipient was connected, how many
/// came in their window and how many came *late*, for a copy already being
/// written or written less than [`LATE_HORIZON`] ago (each of those cost
/// an insert and a delete the window was there to save). More than
/// [`LATE_PER_MILLE`] late in an [`ADJUST_EVERY`] period doubles the
/// window (up to [`MAX_ACK_WINDOW`]); [`CALM_PERIODS`] periods in a row
/// with none halve it (down to [`ACK_WINDOW`]). A connected device that
/// never acknowledges adds nothing either way: its copies are written
/// after the window, as they must be, without widening it for everyone.
struct Window {
    length: Duration,
    in_time: u64,
    late: u64,
    period_ends: Option<Instant>,
    calm: u32,
    /// Watched copies written in the last [`LATE_HORIZON`], by commit.
    written: VecDeque<(Instant, Vec<u64>)>,
    /// The same copies' recipients, by ID: only the recipient's own
    /// acknowledgement counts (anyone may send an Ack with any ID).
    written_ids: HashMap<u64, DeviceAddr>,
}

impl Default for Window {
    fn default() -> Self {
        Window {
            length: ACK_WINDOW,
            in_time: 0,
            late: 0,
            period_ends: None,
            calm: 0,
            written: VecDeque::new(),
            written_ids: HashMap::new(),
        }
    }
}

impl Window {
    /// Watched copies `ids` were written at `now`: an acknowledgement for
    /// one of them soon is late.
    fn written(&mut self, copies: Vec<(u64, DeviceAddr)>, now: Instant) {
        self.forget_written(now);
        if !copies.is_empty() {
            let ids = copies.iter().map(|(id, _)| *id).collect();
            self.written_ids.extend(copies);
            self.written.push_back((now, ids));
        }
    }

    fn forget_written(&mut self, now: Instant) {
        while let Some((at, _)) = self.written.front() {
            if now.saturating_duration_since(*at) < LATE_HORIZON {
                break;
            }
            if let Some((_, ids)) = self.written.pop_front() {
                for id in ids {
                    self.written_ids.remove(&id);
                }
            }
        }
    }

    /// Whether `recipient`'s acknowledgement for `id`, not found staged,
    /// is late.
    fn acknowledged_after_writing(&mut self, id: u64, recipient: &DeviceAddr) -> bool {
        if self.written_ids.get(&id) == Some(recipient) {
            self.written_ids.remove(&id);
            true
        } else {
            false
        }
    }

    /// Ends the period if it is over (crediting an idle stretch with the
    /// calm periods it spanned), adjusting the length.
    fn observe(&mut self, now: Instant) {
        let ends = *self.period_ends.get_or_insert(now + ADJUST_EVERY);
        if now < ends {
            return;
        }
        self.forget_written(now);
        let periods =
            1 + now.saturating_duration_since(ends).as_millis() / ADJUST_EVERY.as_millis().max(1);
        let periods = u32::try_from(periods).unwrap_or(u32::MAX);
        let seen = self.in_time + self.late;
        let was = self.length;
        if self.late.saturating_mul(1000) > seen.saturating_mul(LATE_PER_MILLE) {
            self.length = (self.length * 2).min(MAX_ACK_WINDOW);
            self.calm = 0;
        } else if self.late == 0 {
            self.calm = self.calm.saturating_add(periods);
            while self.calm >= CALM_PERIODS && self.length > ACK_WINDOW {
                self.length = (self.length / 2).max(ACK_WINDOW);
                self.calm -= CALM_PERIODS;
            }
            if self.length == ACK_WINDOW {
                self.calm = 0;
            }
        } else {
            self.calm = 0;
        }
        if self.length > was {
            tracing::info!(
                window_ms = self.length.as_millis() as u64,
                late = self.late,
                in_time = self.in_time,
                "ack window widened: acknowledgements are arriving after their window"
            );
        } else if self.length < was {
            tracing::info!(
                window_ms = self.length.as_millis() as u64,
                "ack window narrowed"
            );
        }
        self.in_time = 0;
        self.late = 0;
        self.period_ends = Some(now + ADJUST_EVERY);
    }
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
/// committed; their windows end in that order too, except after the
/// window narrowed or a copy lost its reader, and a sweep takes copies in
/// ID order, stopping at the first whose window is still open).
#[derive(Default)]
pub(crate) struct Staging {
    rows: BTreeMap<u64, Staged>,
    /// When the writer next looks at the staged copies by itself.
    writer_wakes: Option<Instant>,
    window: Window,
}

impl Staging {
    /// Stages a fan-out's committed copies; the returned [`Durable`]
    /// resolves once each is written or acknowledged.
    pub fn stage(
        &mut self,
        copies: &[(DeviceAddr, StoredDelivery)],
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
                    due: now + self.window.length,
                    persisting: false,
                    watched: true,
                    sender: Arc::clone(&sender),
                },
            );
        }
        Durable::waiting(answered)
    }

    /// Removes the staged copies among `ids` that belong to `recipient`
    /// (and are not being written); returns how many, and the IDs left
    /// for the database.
    pub fn ack(&mut self, recipient: &DeviceAddr, ids: &[u64], now: Instant) -> (usize, Vec<u64>) {
        let mut removed = 0;
        let mut rest = Vec::new();
        for &id in ids {
            match self.rows.get(&id) {
                Some(row) if !row.persisting && row.recipient == *recipient => {
                    if let Some(row) = self.rows.remove(&id) {
                        row.sender.settle_one();
                        removed += 1;
                        self.window.in_time += u64::from(row.watched);
                    }
                }
                Some(row) => {
                    // Being written: late, if it is this recipient's.
                    if row.persisting && row.watched && row.recipient == *recipient {
                        self.window.late += 1;
                    }
                    rest.push(id);
                }
                None => {
                    let late = self.window.acknowledged_after_writing(id, recipient);
                    self.window.late += u64::from(late);
                    rest.push(id);
                }
            }
        }
        self.window.observe(now);
        (removed, rest)
    }

    /// These copies' recipients have no connection open: nothing will
    /// acknowledge them in the window, so they are written at the next
    /// sweep (a copy staged before them that is still in its window holds
    /// them back until it is due, as sweeps take copies in ID order).
    pub fn no_reader(&mut self, ids: &[u64], now: Instant) {
        for id in ids {
            if let Some(row) = self.rows.get_mut(id) {
                row.watched = false;
                row.due = row.due.min(now);
            }
        }
    }

    /// The current ack window.
    pub fn window(&self) -> Duration {
        self.window.length
    }

    /// Copies waiting here and not yet being written, and their payload
    /// bytes.
    pub fn staged(&self) -> (u64, u64) {
        self.rows
            .values()
            .filter(|row| !row.persisting)
            .fold((0, 0), |(copies, bytes), row| {
                (copies + 1, bytes + row.delivery.payload.len() as u64)
            })
    }

    /// `recipient`'s staged copies above `after` that have not expired at
    /// `now`, in order.
    pub fn pending(
        &self,
        recipient: &DeviceAddr,
        after: u64,
        now: Timestamp,
    ) -> Vec<StoredDelivery> {
        self.rows
            .range(after.saturating_add(1)..)
            .filter(|(_, row)| row.recipient == *recipient && row.expires_at > now)
            .map(|(_, row)| row.delivery.clone())
            .collect()
    }

    /// When the window of the lowest-ID copy not being written ends (the
    /// earliest, unless the window narrowed or a copy lost its reader
    /// since: sweeps take copies in ID order).
    pub fn next_due(&self) -> Option<Instant> {
        self.rows
            .values()
            .find(|row| !row.persisting)
            .map(|row| row.due)
    }

    /// When the next sweep is due: [`SWEEP`] after [`Staging::next_due`].
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
    /// `now` as being written and returns them (in ID order); otherwise
    /// none.
    pub fn sweep(&mut self, now: Instant) -> Vec<DueCopy> {
        self.window.observe(now);
        match self.next_sweep() {
            Some(at) if at <= now => self.take_due(now),
            _ => Vec::new(),
        }
    }

    /// Marks every copy whose window ended by `now` as being written, and
    /// returns them (in ID order), stopping at the first copy still in its
    /// window.
    fn take_due(&mut self, now: Instant) -> Vec<DueCopy> {
        let mut due = Vec::new();
        for row in self.rows.values_mut() {
            if row.due > now {
                break;
            }
            if !row.persisting {
                row.persisting = true;
                due.push(DueCopy {
                    recipient: row.recipient.clone(),
                    delivery: row.delivery.clone(),
                    expires_at: row.expires_at,
                });
            }
        }
        due
    }

    /// The commit that wrote `ids` is durable at `now` (or, with an error,
    /// failed: those senders are told so and the copies dropped).
    pub fn written(&mut self, ids: &[u64], outcome: &Result<(), StoreError>, now: Instant) {
        let mut watched = Vec::new();
        for id in ids {
            if let Some(row) = self.rows.remove(id) {
                match outcome {
                    Ok(()) => {
                        row.sender.settle_one();
                        if row.watched {
                            watched.push((*id, row.recipient));
                        }
                    }
                    Err(error) => row.sender.answer(Err(error.clone())),
                }
            }
        }
        self.window.written(watched, now);
    }

    /// Drops the staged copies for `account`'s devices (the line was
    /// revoked), or for one of them (`device`, removed from its account),
    /// settling their senders: the copies were accepted, there is just no
    /// one left to read them.
    pub fn drop_recipient(&mut self, account: &AccountId, device: Option<umbra_proto::DeviceId>) {
        let ids: Vec<u64> = self
            .rows
            .iter()
            .filter(|(_, row)| {
                row.recipient.account == *account
                    && device.is_none_or(|device| row.recipient.device == device)
            })
            .map(|(id, _)| *id)
            .collect();
        for id in ids {
            if let Some(row) = self.rows.remove(&id) {
                row.sender.settle_one();
            }
        }
    }

    /// Every copy still staged, for a last write at shutdown (no window
    /// ends later than [`MAX_ACK_WINDOW`] from now).
    pub fn take_all(&mut self) -> Vec<DueCopy> {
        self.take_due(Instant::now() + MAX_ACK_WINDOW)
    }
}

#[cfg(test)]
#[allow(clippy::expect_used)] // a test fails loudly
mod tests {
    use super::*;
    use umbra_proto::DeliveryKind;

    fn copy(id: u64) -> (DeviceAddr, StoredDelivery) {
        let account = |text: &str| AccountId::parse(text).expect("a valid account ID");
        let delivery = StoredDelivery {
            id,
            sender: None,
            kind: DeliveryKind::Application,
            group_id: None,
            payload: vec![7; 16],
            sent_at: 0,
        };
        (DeviceAddr::first(account("BBBBBBBB")), delivery)
    }

    /// A staged copy is its recipient device's: another device of the
    /// same account neither acknowledges nor reads it.
    #[test]
    fn a_copy_is_its_devices_alone() {
        let mut staging = Staging::default();
        let start = Instant::now();
        let (to, delivery) = copy(1);
        let _durable = staging.stage(&[(to.clone(), delivery)], 100, start);
        let other = DeviceAddr::new(to.account.clone(), umbra_proto::DeviceId(2));
        assert!(staging.pending(&other, 0, 0).is_empty());
        assert_eq!(staging.ack(&other, &[1], start).0, 0);
        assert_eq!(staging.pending(&to, 0, 0).len(), 1);
        assert_eq!(staging.ack(&to, &[1], start).0, 1);
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
        let swept: Vec<u64> = staging
            .sweep(start + ACK_WINDOW + SWEEP)
            .iter()
            .map(|copy| copy.delivery.id)
            .collect();
        assert_eq!(swept, vec![1, 2]);
        assert_eq!(
            staging.next_sweep(),
            Some(start + 2 * ACK_WINDOW + 2 * SWEEP)
        );
        // A copy being written is not acknowledged from memory.
        let (forgotten, rest) = staging.ack(&copy(1).0, &[1, 3], start);
        assert_eq!((forgotten, rest), (1, vec![1]));
    }

    fn swept(staging: &mut Staging, at: Instant) -> Vec<u64> {
        staging
            .sweep(at)
            .iter()
            .map(|copy| copy.delivery.id)
            .collect()
    }

    /// A fresh staging where copy 1, staged now, was swept and written at
    /// the first sweep (returned).
    fn first_copy_written() -> (Staging, Instant) {
        let mut staging = Staging::default();
        let start = Instant::now();
        let first_sweep = start + ACK_WINDOW + SWEEP;
        stage_and_write(&mut staging, 1, start, first_sweep);
        (staging, first_sweep)
    }

    /// Stages copy `id` at `staged`, and has the sweep at `swept_at` take
    /// it and its commit succeed.
    fn stage_and_write(staging: &mut Staging, id: u64, staged: Instant, swept_at: Instant) {
        let _answer = staging.stage(&[copy(id)], 100, staged);
        assert_eq!(swept(staging, swept_at), vec![id]);
        staging.written(&[id], &Ok(()), swept_at);
    }

    #[test]
    fn the_window_doubles_on_late_acknowledgements_and_halves_when_calm() {
        let (mut staging, first_sweep) = first_copy_written();
        // Acknowledged after it was written: late.
        let (forgotten, rest) = staging.ack(&copy(1).0, &[1], first_sweep);
        assert_eq!((forgotten, rest), (0, vec![1]));
        assert_eq!(
            staging.window(),
            ACK_WINDOW,
            "adjusted only once a period ends"
        );

        let period = first_sweep + ADJUST_EVERY;
        assert!(swept(&mut staging, period).is_empty());
        assert_eq!(staging.window(), 2 * ACK_WINDOW);
        let _next = staging.stage(&[copy(2)], 100, period);
        assert_eq!(staging.next_due(), Some(period + 2 * ACK_WINDOW));
        let (acknowledged, _) = staging.ack(&copy(2).0, &[2], period);
        assert_eq!(acknowledged, 1);

        // It narrows only after CALM_PERIODS periods in a row with none.
        let calm = |n: u32| period + ADJUST_EVERY * n;
        for n in 1..CALM_PERIODS {
            assert!(swept(&mut staging, calm(n)).is_empty());
            assert_eq!(staging.window(), 2 * ACK_WINDOW, "after {n} calm periods");
        }
        assert!(swept(&mut staging, calm(CALM_PERIODS)).is_empty());
        assert_eq!(staging.window(), ACK_WINDOW);
    }

    #[test]
    fn a_silent_reader_does_not_widen_the_window_and_idle_time_narrows_it() {
        // Written unacknowledged, and never acknowledged: no sign that the
        // server is behind.
        let (mut staging, first_sweep) = first_copy_written();
        // Nor is someone else's Ack naming its ID.
        let someone_else =
            DeviceAddr::first(AccountId::parse("AAAAAAAA").expect("a valid account ID"));
        let _ = staging.ack(&someone_else, &[1], first_sweep);
        assert!(swept(&mut staging, first_sweep + ADJUST_EVERY).is_empty());
        assert_eq!(staging.window(), ACK_WINDOW);

        // Late acknowledgements widen it twice...
        let mut at = first_sweep + ADJUST_EVERY;
        for id in [2, 3] {
            let staged = at;
            at += MAX_ACK_WINDOW + SWEEP;
            stage_and_write(&mut staging, id, staged, at);
            let _ = staging.ack(&copy(id).0, &[id], at);
            at += ADJUST_EVERY;
            assert!(swept(&mut staging, at).is_empty());
        }
        assert_eq!(staging.window(), 4 * ACK_WINDOW);
        // ...and an idle stretch counts as the calm periods it spans.
        assert!(swept(&mut staging, at + ADJUST_EVERY * (2 * CALM_PERIODS)).is_empty());
        assert_eq!(staging.window(), ACK_WINDOW);
    }

    #[test]
    fn a_copy_with_no_reader_skips_the_window_and_is_not_counted_late() {
        let mut staging = Staging::default();
        let start = Instant::now();
        let _unread = staging.stage(&[copy(1)], 100, start);
        staging.no_reader(&[1], start);
        assert_eq!(staging.next_sweep(), Some(start + SWEEP));
        assert_eq!(swept(&mut staging, start + SWEEP), vec![1]);
        staging.written(&[1], &Ok(()), start + SWEEP);
        // Its recipient comes back and acknowledges it at once.
        let _ = staging.ack(&copy(1).0, &[1], start + SWEEP);
        assert!(swept(&mut staging, start + SWEEP + ADJUST_EVERY).is_empty());
        assert_eq!(staging.window(), ACK_WINDOW);
    }
}
