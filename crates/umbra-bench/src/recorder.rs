//! Counts what a measurement sent, what the server accepted and what
//! arrived: latency histogram, losses and duplicates.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use hdrhistogram::Histogram;
use serde::Serialize;

use crate::stamp::{Stamp, now_ns};

/// Latencies are recorded in microseconds, up to 10 minutes.
const MAX_LATENCY_US: u64 = 600_000_000;

/// Set in a stamp's run tag when the recipient was offline at send time:
/// such a delivery counts for loss and duplicates but its latency (mostly
/// the time the recipient stayed away) goes to a histogram of its own.
pub const DEFERRED: u16 = 0x8000;

#[derive(Debug)]
struct Inner {
    run: u16,
    latency: Histogram<u64>,
    deferred: Histogram<u64>,
    /// (receiver, sender) → bitmap of sequence numbers seen.
    seen: HashMap<(u32, u32), Vec<u64>>,
    /// sender → bitmap of the sequence numbers the server accepted, where
    /// the sender's connection tells which ([`Recorder::note_accepted`]).
    accepted: HashMap<u32, Vec<u64>>,
    unique: u64,
    duplicates: u64,
    window_end_ns: u64,
    in_window: u64,
    first_ns: u64,
    last_ns: u64,
}

/// Shared by every simulated device of one generator process.
#[derive(Debug)]
pub struct Recorder {
    inner: Mutex<Inner>,
    pub sent: AtomicU64,
    /// Sends the server answered (accepted or refused).
    pub answered: AtomicU64,
    pub accepted: AtomicU64,
    pub refused: AtomicU64,
    /// Sends made on a connection that had already ended: never answered.
    pub cut_off: AtomicU64,
    first_error: Mutex<Option<String>>,
}

/// What one measurement observed.
#[derive(Debug, Clone, Serialize)]
pub struct Observed {
    pub sent: u64,
    pub accepted: u64,
    pub refused: u64,
    pub delivered: u64,
    pub duplicates: u64,
    /// Delivered before the sending window closed.
    pub delivered_in_window: u64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
    /// Deliveries to recipients that were offline when the message was sent.
    pub deferred: u64,
    pub deferred_p50_ms: f64,
    pub first_error: Option<String>,
    pub first_delivery_ns: u64,
    pub last_delivery_ns: u64,
}

impl Default for Recorder {
    fn default() -> Self {
        Recorder::new()
    }
}

impl Recorder {
    pub fn new() -> Recorder {
        Recorder {
            inner: Mutex::new(Inner {
                run: 0,
                latency: new_histogram(),
                deferred: new_histogram(),
                seen: HashMap::new(),
                accepted: HashMap::new(),
                unique: 0,
                duplicates: 0,
                window_end_ns: u64::MAX,
                in_window: 0,
                first_ns: 0,
                last_ns: 0,
            }),
            sent: AtomicU64::new(0),
            answered: AtomicU64::new(0),
            accepted: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            cut_off: AtomicU64::new(0),
            first_error: Mutex::new(None),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Starts a new measurement tagged `run`: everything is zeroed and
    /// stamps of other runs are ignored from now on.
    pub fn begin(&self, run: u16) {
        let mut inner = self.lock();
        inner.run = run;
        inner.latency = new_histogram();
        inner.deferred = new_histogram();
        inner.seen.clear();
        inner.accepted.clear();
        inner.unique = 0;
        inner.duplicates = 0;
        inner.window_end_ns = u64::MAX;
        inner.in_window = 0;
        inner.first_ns = 0;
        inner.last_ns = 0;
        drop(inner);
        for counter in [
            &self.sent,
            &self.answered,
            &self.accepted,
            &self.refused,
            &self.cut_off,
        ] {
            counter.store(0, Ordering::SeqCst);
        }
        *self.first_error.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }

    /// Deliveries after this moment no longer count as "in the window".
    pub fn close_window(&self) {
        self.lock().window_end_ns = now_ns();
    }

    pub fn note_sent(&self) {
        self.sent.fetch_add(1, Ordering::Relaxed);
    }

    pub fn note_answer(&self, accepted: bool, error: Option<String>) {
        self.answered.fetch_add(1, Ordering::Relaxed);
        if accepted {
            self.accepted.fetch_add(1, Ordering::Relaxed);
        } else {
            self.refused.fetch_add(1, Ordering::Relaxed);
            let mut first = self.first_error.lock().unwrap_or_else(|p| p.into_inner());
            if first.is_none() {
                *first = error;
            }
        }
    }

    /// Records which message the server accepted (besides counting it
    /// with [`Recorder::note_answer`]), for [`Recorder::missing`].
    pub fn note_accepted(&self, stamp: &Stamp) {
        let mut inner = self.lock();
        if stamp.run & !DEFERRED != inner.run {
            return;
        }
        let bits = inner.accepted.entry(stamp.sender).or_default();
        set(bits, stamp.seq);
    }

    /// Messages the server accepted that have not reached every one of
    /// their recipients (`recipients(sender)`) yet, counted once per
    /// recipient: exact where [`Recorder::delivered`]'s count is not (a
    /// message stored but never answered, its sender's connection cut,
    /// arrives without having been counted as accepted).
    pub fn missing(&self, recipients: impl Fn(u32) -> Vec<u32>) -> u64 {
        let inner = self.lock();
        let mut missing = 0u64;
        for (sender, accepted) in &inner.accepted {
            for recipient in recipients(*sender) {
                let seen = inner.seen.get(&(recipient, *sender));
                for (word, bits) in accepted.iter().enumerate() {
                    let got = seen.and_then(|s| s.get(word)).copied().unwrap_or(0);
                    missing += u64::from((bits & !got).count_ones());
                }
            }
        }
        missing
    }

    /// Records a payload received by device `receiver`. Returns whether it
    /// belonged to the current run.
    pub fn delivered(&self, receiver: u32, payload: &[u8]) -> bool {
        let now = now_ns();
        let mut inner = self.lock();
        // Unstamped frames (backlog, Welcomes) and other runs' are not ours.
        let Some(stamp) = Stamp::read(payload).filter(|s| s.run & !DEFERRED == inner.run) else {
            return false;
        };
        let bits = inner.seen.entry((receiver, stamp.sender)).or_default();
        if !set(bits, stamp.seq) {
            inner.duplicates += 1;
            return true;
        }
        inner.unique += 1;
        let micros = now.saturating_sub(stamp.due_ns) / 1_000;
        if stamp.run & DEFERRED != 0 {
            let _ = inner.deferred.record(micros.clamp(1, MAX_LATENCY_US));
            return true;
        }
        if now <= inner.window_end_ns {
            inner.in_window += 1;
        }
        if inner.first_ns == 0 {
            inner.first_ns = now;
        }
        inner.last_ns = now;
        let _ = inner.latency.record(micros.clamp(1, MAX_LATENCY_US));
        true
    }

    /// Unique deliveries of the current run so far.
    pub fn delivered_count(&self) -> u64 {
        self.lock().unique
    }

    pub fn observed(&self) -> Observed {
        let inner = self.lock();
        let ms = |q: f64| inner.latency.value_at_quantile(q) as f64 / 1000.0;
        Observed {
            sent: self.sent.load(Ordering::SeqCst),
            accepted: self.accepted.load(Ordering::SeqCst),
            refused: self.refused.load(Ordering::SeqCst),
            delivered: inner.unique,
            duplicates: inner.duplicates,
            delivered_in_window: inner.in_window,
            p50_ms: ms(0.5),
            p99_ms: ms(0.99),
            p999_ms: ms(0.999),
            max_ms: inner.latency.max() as f64 / 1000.0,
            deferred: inner.deferred.len(),
            deferred_p50_ms: inner.deferred.value_at_quantile(0.5) as f64 / 1000.0,
            first_error: self
                .first_error
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
            first_delivery_ns: inner.first_ns,
            last_delivery_ns: inner.last_ns,
        }
    }
}

/// Sets bit `seq` of `bits`; returns whether it was clear.
fn set(bits: &mut Vec<u64>, seq: u64) -> bool {
    let word = usize::try_from(seq / 64).unwrap_or(usize::MAX);
    if bits.len() <= word {
        bits.resize(word + 1, 0);
    }
    let mask = 1u64 << (seq % 64);
    bits.get_mut(word).is_some_and(|w| {
        let fresh = *w & mask == 0;
        *w |= mask;
        fresh
    })
}

fn new_histogram() -> Histogram<u64> {
    // 3 significant figures from 1 µs to 10 minutes.
    Histogram::new_with_bounds(1, MAX_LATENCY_US, 3).expect("constant, valid histogram bounds")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stamped(run: u16, sender: u32, seq: u64) -> Vec<u8> {
        let mut payload = vec![0; 64];
        Stamp {
            run,
            sender,
            seq,
            due_ns: now_ns(),
        }
        .write(&mut payload);
        payload
    }

    #[test]
    fn duplicates_and_other_runs_are_told_apart_from_deliveries() {
        let recorder = Recorder::new();
        recorder.begin(3);
        assert!(recorder.delivered(1, &stamped(3, 0, 0)));
        assert!(recorder.delivered(1, &stamped(3, 0, 1)));
        assert!(
            recorder.delivered(1, &stamped(3, 0, 1)),
            "a duplicate is ours"
        );
        assert!(recorder.delivered(2, &stamped(3, 0, 1)), "another receiver");
        assert!(!recorder.delivered(1, &stamped(2, 0, 5)), "an old run");
        let seen = recorder.observed();
        assert_eq!((seen.delivered, seen.duplicates), (3, 1));
        recorder.begin(4);
        assert_eq!(recorder.observed().delivered, 0);
    }

    #[test]
    fn missing_counts_accepted_messages_each_recipient_lacks() {
        let recorder = Recorder::new();
        recorder.begin(1);
        let stamp = |seq| Stamp {
            run: 1,
            sender: 0,
            seq,
            due_ns: 0,
        };
        for seq in [0, 1, 70] {
            recorder.note_accepted(&stamp(seq));
        }
        // Sequence 2 was stored but never answered: it arrives, uncounted.
        for seq in [0, 2, 70] {
            recorder.delivered(1, &stamped(1, 0, seq));
        }
        recorder.delivered(2, &stamped(1, 0, 1));
        let recipients = |sender| if sender == 0 { vec![1, 2] } else { vec![] };
        // Device 1 lacks 1; device 2 lacks 0 and 70.
        assert_eq!(recorder.missing(recipients), 3);
        recorder.delivered(1, &stamped(1, 0, 1));
        assert_eq!(recorder.missing(recipients), 2);
        recorder.begin(2);
        assert_eq!(recorder.missing(recipients), 0);
    }
}
