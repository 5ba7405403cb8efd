//! A node's queue of writes batched into shared transactions: the work
//! its connections ask for at about the same moment (fan-outs,
//! acknowledgements) runs in one transaction, as the embedded store's
//! writer batches its writes in one commit.
//!
//! Most of what PostgreSQL spends on a message is per transaction and per
//! statement, not per row (see `docs/benchmarks-postgres.md`). A
//! dispatcher takes the first item waiting and every other one already
//! queued behind it (up to [`MAX_BATCH`] items or [`MAX_BATCH_BYTES`])
//! and runs them together, at most [`CONCURRENT_BATCHES`] batches at a
//! time. A lone item runs alone: at low load nothing waits for a batch to
//! fill. Under load, items queue while the batches in flight run, so the
//! next batch is larger.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::sync::{Semaphore, mpsc, oneshot};

use super::PgStore;
use crate::{BatchStats, Result, StoreError};

/// Items in one transaction at most.
const MAX_BATCH: usize = 32;
/// Bytes in one transaction at most (a batch stops growing once past it;
/// a single item of any accepted size still runs).
const MAX_BATCH_BYTES: usize = 4 << 20;
/// Batches of one kind one node runs at once (each on a pooled
/// connection).
const CONCURRENT_BATCHES: usize = 4;
/// Items waiting for a batch at most; past it a caller waits to queue.
const QUEUE: usize = 4096;
/// How long an item may wait for its batch to start. One that waited
/// longer (the batches before it stuck behind a lock, the database slow)
/// is refused unrun, retryable, as a request that found every pooled
/// connection busy was before batching: a caller is answered within this
/// and the transaction's own bound, before a device gives up and sends
/// again (which would store the message twice).
const QUEUE_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// Work a queue batches: one item, and how a batch of them runs.
pub(super) trait Work: Send + Sync + Sized + 'static {
    type Outcome: Send + 'static;
    /// What the queue calls it in an error.
    const NAME: &'static str;
    /// What the item weighs against [`MAX_BATCH_BYTES`].
    fn bytes(&self) -> usize;
    /// Runs `batch` in one transaction (or, for one item, as it ran
    /// before batching); one outcome per item, in order.
    fn run<'a>(
        store: &'a PgStore,
        batch: &'a [Self],
    ) -> impl Future<Output = Result<Vec<Self::Outcome>>> + Send + 'a;
}

struct Job<W: Work> {
    item: W,
    reply: oneshot::Sender<Result<W::Outcome>>,
    queued_at: tokio::time::Instant,
}

#[derive(Default)]
struct Counts {
    transactions: AtomicU64,
    items: AtomicU64,
    refused: AtomicU64,
}

/// A node's queue of one kind of work; its dispatcher ends when the last
/// store handle holding the queue is dropped.
pub(super) struct Queue<W: Work> {
    jobs: mpsc::Sender<Job<W>>,
    counts: Arc<Counts>,
}

impl<W: Work> Queue<W> {
    /// Starts the dispatcher over `store` (a handle without queues).
    pub(super) fn start(store: PgStore) -> Self {
        let (jobs, queued) = mpsc::channel(QUEUE);
        let counts = Arc::new(Counts::default());
        tokio::spawn(dispatch(store, queued, Arc::clone(&counts)));
        Queue { jobs, counts }
    }

    pub(super) fn stats(&self) -> BatchStats {
        BatchStats {
            transactions: self.counts.transactions.load(Ordering::Relaxed),
            items: self.counts.items.load(Ordering::Relaxed),
            refused: self.counts.refused.load(Ordering::Relaxed),
        }
    }

    /// Queues `item` and waits for its batch's outcome.
    pub(super) async fn run(&self, item: W) -> Result<W::Outcome> {
        let (reply, outcome) = oneshot::channel();
        self.jobs
            .send(Job {
                item,
                reply,
                queued_at: tokio::time::Instant::now(),
            })
            .await
            .map_err(|_| StoreError::Backend(format!("the {} queue is closed", W::NAME)))?;
        outcome.await.unwrap_or_else(|_| {
            Err(StoreError::Backend(format!(
                "the {} batch ended without an answer",
                W::NAME
            )))
        })
    }
}

async fn dispatch<W: Work>(
    store: PgStore,
    mut queued: mpsc::Receiver<Job<W>>,
    counts: Arc<Counts>,
) {
    let running = Arc::new(Semaphore::new(CONCURRENT_BATCHES));
    while let Some(first) = queued.recv().await {
        // Waiting for a batch to finish lets the queue grow: the next
        // batch takes what came meanwhile.
        let Ok(permit) = Arc::clone(&running).acquire_owned().await else {
            break;
        };
        let mut bytes = first.item.bytes();
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH && bytes < MAX_BATCH_BYTES {
            let Ok(job) = queued.try_recv() else {
                break;
            };
            bytes += job.item.bytes();
            batch.push(job);
        }
        // A caller that stopped waiting before its batch started (its
        // task was cancelled) is not served; one that stops later is (its
        // batch commits without it knowing). One that waited too long is
        // told so, nothing done.
        let now = tokio::time::Instant::now();
        let (batch, late): (Vec<_>, Vec<_>) = batch
            .into_iter()
            .filter(|job| !job.reply.is_closed())
            .partition(|job| now.duration_since(job.queued_at) <= QUEUE_WAIT);
        counts
            .refused
            .fetch_add(late.len() as u64, Ordering::Relaxed);
        for job in late {
            let _ = job.reply.send(Err(StoreError::Unavailable(format!(
                "PostgreSQL is too busy: the {} waited {} s for a transaction and was not run",
                W::NAME,
                QUEUE_WAIT.as_secs()
            ))));
        }
        if batch.is_empty() {
            continue;
        }
        let store = store.clone();
        let counts = Arc::clone(&counts);
        tokio::spawn(async move {
            let (items, replies): (Vec<W>, Vec<_>) =
                batch.into_iter().map(|job| (job.item, job.reply)).unzip();
            let outcomes = W::run(&store, &items).await;
            counts.transactions.fetch_add(1, Ordering::Relaxed);
            counts
                .items
                .fetch_add(items.len() as u64, Ordering::Relaxed);
            match outcomes {
                Ok(outcomes) => {
                    for (reply, outcome) in replies.into_iter().zip(outcomes) {
                        let _ = reply.send(Ok(outcome));
                    }
                }
                Err(error) => {
                    for reply in replies {
                        let _ = reply.send(Err(error.clone()));
                    }
                }
            }
            drop(permit);
        });
    }
}
