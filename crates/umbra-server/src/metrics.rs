//! Prometheus metrics and health checks, on a listener of their own
//! (`metrics_listen`), never on the devices' port: what an operator's
//! monitoring scrapes says how the node is doing, and nothing about whom it
//! serves (no account, group or address appears in a metric or label).
//!
//! `GET /metrics` answers the text exposition format; `GET /health` answers
//! 200 when the store answers a read, 503 otherwise; `GET /ready` answers
//! 200 while the node accepts connections. Anything else is 404.

use std::sync::Arc;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::service::Services;

/// Most scrapes served at once; more wait for a slot.
const MAX_SCRAPES: usize = 8;
/// Largest request head read from a scraper.
const MAX_REQUEST_BYTES: usize = 8 * 1024;
/// Time a scraper has to send its request.
const READ_TIMEOUT: Duration = Duration::from_secs(5);
/// Time one scrape may hold its slot in all (a scraper trickling bytes
/// would otherwise hold it as long as each read came within the above).
const SCRAPE_TIMEOUT: Duration = Duration::from_secs(10);
/// Time the store has to answer `/health`.
const HEALTH_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// The request's name, as in `umbra.proto`.
    pub request: &'static str,
}

/// The kind of work a store batched: `fan_out` or `ack`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BatchLabels {
    pub kind: &'static str,
}

/// Why a message on `umbra.v1.spent` was not counted: `malformed`,
/// `forged`, `replayed` or `stale`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RefusalLabels {
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    /// The error code's name, as in `umbra.proto` (`BadSignature`, ...).
    pub code: String,
}

/// What the node counts. Cloning shares the counters.
pub struct Metrics {
    registry: Registry,
    /// Connections open (TLS and WebSocket set up or under way).
    pub connections: Gauge,
    /// Messages accepted from logged-in devices (`SendMessage`).
    pub messages_accepted: Counter,
    /// Messages accepted on `SendAnonymous`.
    pub anonymous_accepted: Counter,
    /// Commits accepted.
    pub commits_accepted: Counter,
    /// Deliveries pushed to connected devices.
    pub deliveries_pushed: Counter,
    /// Requests answered with an error, by code.
    pub errors: Family<ErrorLabels, Counter>,
    /// Time from a request's arrival to its answer being ready (the store's
    /// time included: most requests are a store read or write), by request.
    pub request_seconds: Family<RequestLabels, Histogram>,
    /// When the TLS certificate presented expires (Unix seconds); not
    /// set for an older server's self-signed certificate.
    pub tls_expiry: Gauge,
    /// Times every connection read its mailbox because a node asked
    /// (`umbra.v1.poll`; at most one a second).
    pub cluster_polls: Counter,
    /// Bytes this node charged to the hourly budgets and told the other
    /// nodes, and bytes they told it they charged (`umbra.v1.spent`).
    pub cluster_charges_told: Counter,
    pub cluster_charges_heard: Counter,
    /// Bytes this node charged and could not tell (NATS away).
    pub cluster_charges_untold: Counter,
    /// Messages on `umbra.v1.spent` not counted, by reason.
    pub cluster_spent_refused: Family<RefusalLabels, Counter>,
    /// Whether NATS is connected, read at each scrape (a node of a
    /// cluster only).
    pub nats_connected: Gauge,
    /// Copies waiting in the mailboxes (the ack window's included), and
    /// their bytes: read from the store at each scrape.
    pub mailbox_copies: Gauge,
    pub mailbox_bytes: Gauge,
    /// The ack window's width now (seconds) and the copies in it (the
    /// embedded store; absent on PostgreSQL, which has none).
    pub ack_window_seconds: Gauge<f64, std::sync::atomic::AtomicU64>,
    pub ack_window_copies: Gauge,
    /// The clustered store's batching, by kind: transactions run, items
    /// they carried, items refused unrun; read from the store at each
    /// scrape.
    pub batch_transactions: Family<BatchLabels, Counter>,
    pub batched_items: Family<BatchLabels, Counter>,
    pub batch_refused: Family<BatchLabels, Counter>,
    /// Attachment blob bytes written (uploads) and read (downloads).
    pub blob_bytes_written: Counter,
    pub blob_bytes_read: Counter,
    /// Blobs deleted because every recipient device fetched them.
    pub blobs_deleted: Counter,
    /// When the depth was last counted (held while counting).
    depth_counted: tokio::sync::Mutex<Option<tokio::time::Instant>>,
    /// Held while the batching counters catch up with the store's.
    batches_read: std::sync::Mutex<()>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("umbra");
        let connections = Gauge::default();
        registry.register("connections", "Connections open", connections.clone());
        let messages_accepted = Counter::default();
        registry.register(
            "messages_accepted",
            "Messages accepted from logged-in devices",
            messages_accepted.clone(),
        );
        let anonymous_accepted = Counter::default();
        registry.register(
            "anonymous_messages_accepted",
            "Messages accepted without a login (SendAnonymous)",
            anonymous_accepted.clone(),
        );
        let commits_accepted = Counter::default();
        registry.register(
            "commits_accepted",
            "Commits accepted",
            commits_accepted.clone(),
        );
        let deliveries_pushed = Counter::default();
        registry.register(
            "deliveries_pushed",
            "Deliveries pushed to connected devices",
            deliveries_pushed.clone(),
        );
        let errors = Family::<ErrorLabels, Counter>::default();
        registry.register(
            "request_errors",
            "Requests answered with an error, by code",
            errors.clone(),
        );
        let request_seconds = Family::<RequestLabels, Histogram>::new_with_constructor(|| {
            // 50 µs to about 3 s.
            Histogram::new(exponential_buckets(0.000_05, 3.0, 11))
        });
        registry.register(
            "request_seconds",
            "Time to answer a request (store included), by request",
            request_seconds.clone(),
        );
        let tls_expiry = Gauge::default();
        registry.register(
            "tls_certificate_expiry_timestamp_seconds",
            "When the TLS certificate presented expires (Unix time)",
            tls_expiry.clone(),
        );
        let nats_connected = Gauge::default();
        registry.register(
            "nats_connected",
            "Whether this node is connected to the cluster's NATS (1) or not (0: its connections poll meanwhile; always 0 on a node without NATS)",
            nats_connected.clone(),
        );
        let cluster_polls = Counter::default();
        registry.register(
            "cluster_polls",
            "Times every connection read its mailbox because a node of the cluster asked",
            cluster_polls.clone(),
        );
        let cluster_charges_told = Counter::default();
        registry.register(
            "cluster_charges_told_bytes",
            "Bytes this node charged to the hourly budgets (deliveries, anonymous messages, attachments) and told the other nodes",
            cluster_charges_told.clone(),
        );
        let cluster_charges_heard = Counter::default();
        registry.register(
            "cluster_charges_heard_bytes",
            "Bytes the other nodes told this node they charged to the hourly budgets",
            cluster_charges_heard.clone(),
        );
        let cluster_charges_untold = Counter::default();
        registry.register(
            "cluster_charges_untold_bytes",
            "Bytes this node charged to the hourly budgets and could not tell the other nodes (NATS away)",
            cluster_charges_untold.clone(),
        );
        let cluster_spent_refused = Family::<RefusalLabels, Counter>::default();
        registry.register(
            "cluster_spent_refused",
            "Messages on umbra.v1.spent not counted, by reason: malformed, forged (not under this cluster's key: another delivery-ids.key, or not a node), replayed, stale (more than a minute from this node's clock)",
            cluster_spent_refused.clone(),
        );
        let mailbox_copies = Gauge::default();
        registry.register(
            "mailbox_copies",
            "Copies waiting for their devices, the ack window's included",
            mailbox_copies.clone(),
        );
        let mailbox_bytes = Gauge::default();
        registry.register(
            "mailbox_bytes",
            "Payload bytes of the copies waiting for their devices",
            mailbox_bytes.clone(),
        );
        let ack_window_seconds = Gauge::<f64, std::sync::atomic::AtomicU64>::default();
        registry.register(
            "ack_window_seconds",
            "How long a copy waits for its acknowledgement before it is written",
            ack_window_seconds.clone(),
        );
        let ack_window_copies = Gauge::default();
        registry.register(
            "ack_window_copies",
            "Copies in the ack window (not written, perhaps never)",
            ack_window_copies.clone(),
        );
        let batch_transactions = Family::<BatchLabels, Counter>::default();
        registry.register(
            "store_batch_transactions",
            "Transactions the clustered store ran for queued fan-outs or acknowledgements",
            batch_transactions.clone(),
        );
        let batched_items = Family::<BatchLabels, Counter>::default();
        registry.register(
            "store_batched_items",
            "Fan-outs or acknowledgements those transactions carried",
            batched_items.clone(),
        );
        let batch_refused = Family::<BatchLabels, Counter>::default();
        registry.register(
            "store_batch_refused",
            "Fan-outs or acknowledgements refused unrun (retryable): they waited too long for a transaction",
            batch_refused.clone(),
        );
        let blob_bytes_written = Counter::default();
        registry.register(
            "blob_bytes_written",
            "Attachment blob bytes uploaded and stored",
            blob_bytes_written.clone(),
        );
        let blob_bytes_read = Counter::default();
        registry.register(
            "blob_bytes_read",
            "Attachment blob bytes downloaded",
            blob_bytes_read.clone(),
        );
        let blobs_deleted = Counter::default();
        registry.register(
            "blobs_fetched_by_all",
            "Attachment blobs deleted because every recipient device fetched them",
            blobs_deleted.clone(),
        );
        Metrics {
            registry,
            connections,
            messages_accepted,
            anonymous_accepted,
            commits_accepted,
            deliveries_pushed,
            errors,
            request_seconds,
            tls_expiry,
            cluster_polls,
            cluster_charges_told,
            cluster_charges_heard,
            cluster_charges_untold,
            cluster_spent_refused,
            nats_connected,
            mailbox_copies,
            mailbox_bytes,
            ack_window_seconds,
            ack_window_copies,
            batch_transactions,
            batched_items,
            batch_refused,
            blob_bytes_written,
            blob_bytes_read,
            blobs_deleted,
            depth_counted: tokio::sync::Mutex::new(None),
            batches_read: std::sync::Mutex::new(()),
        }
    }
}

impl Metrics {
    /// The text exposition of every metric.
    pub fn render(&self) -> String {
        let mut text = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut text, &self.registry);
        text
    }
}

/// Counts a connection while it lives.
pub(crate) struct Open(Gauge);

impl Open {
    pub(crate) fn new(metrics: &Metrics) -> Open {
        metrics.connections.inc();
        Open(metrics.connections.clone())
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// Serves scrapes on `listener` until `shutdown`.
pub async fn serve(listener: TcpListener, services: Arc<Services>, shutdown: CancellationToken) {
    let slots = Arc::new(Semaphore::new(MAX_SCRAPES));
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(error) => {
                warn!(%error, "accepting a metrics connection failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(slot) = Arc::clone(&slots).acquire_owned().await else {
            return;
        };
        let services = Arc::clone(&services);
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            let _slot = slot;
            tokio::select! {
                _ = shutdown.cancelled() => {}
                answered = tokio::time::timeout(SCRAPE_TIMEOUT, answer(stream, &services)) => {
                    match answered {
                        Ok(Ok(())) => {}
                        Ok(Err(error)) => debug!(%error, "metrics request"),
                        Err(_) => debug!("metrics request took too long; closed"),
                    }
                }
            }
        });
    }
}

async fn answer(mut stream: TcpStream, services: &Services) -> std::io::Result<()> {
    let mut buffer = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    let path = loop {
        let n = tokio::time::timeout(READ_TIMEOUT, stream.read(&mut chunk))
            .await
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "no request"))??;
        if n == 0 {
            return Ok(());
        }
        buffer.extend_from_slice(chunk.get(..n).unwrap_or_default());
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut request = httparse::Request::new(&mut headers);
        match request.parse(&buffer) {
            Ok(httparse::Status::Complete(_)) => {
                if request.method != Some("GET") {
                    break None;
                }
                break request.path.map(str::to_owned);
            }
            Ok(httparse::Status::Partial) if buffer.len() < MAX_REQUEST_BYTES => continue,
            _ => {
                return respond(
                    &mut stream,
                    "400 Bad Request",
                    "text/plain",
                    "bad request\n",
                )
                .await;
            }
        }
    };
    match path.as_deref() {
        Some("/metrics") => {
            read_store(services).await;
            let body = services.metrics.render();
            respond(
                &mut stream,
                "200 OK",
                "text/plain; version=0.0.4; charset=utf-8",
                &body,
            )
            .await
        }
        Some("/health") => {
            let answers = tokio::time::timeout(HEALTH_TIMEOUT, services.store_answers()).await;
            if answers.unwrap_or(false) {
                respond(&mut stream, "200 OK", "text/plain", "ok\n").await
            } else {
                respond(
                    &mut stream,
                    "503 Service Unavailable",
                    "text/plain",
                    "the store does not answer\n",
                )
                .await
            }
        }
        Some("/ready") => respond(&mut stream, "200 OK", "text/plain", "ready\n").await,
        Some(_) => respond(&mut stream, "404 Not Found", "text/plain", "not found\n").await,
        None => {
            respond(
                &mut stream,
                "405 Method Not Allowed",
                "text/plain",
                "only GET\n",
            )
            .await
        }
    }
}

/// How often the mailboxes' depth is counted at most: counting scans the
/// whole mailbox table (on the embedded store, on the connection every
/// mailbox read uses), so scrapers, however many and however frequent,
/// must not set the pace.
const DEPTH_EVERY: Duration = Duration::from_secs(30);

/// Sets the gauges read from the store: the mailboxes' depth (at most
/// every [`DEPTH_EVERY`], one count at a time; left as it was if the store
/// does not answer within the health check's time) and the ack window.
async fn read_store(services: &Services) {
    let metrics = &services.metrics;
    let due = match metrics.depth_counted.try_lock() {
        Ok(mut last) if last.is_none_or(|at| at.elapsed() >= DEPTH_EVERY) => {
            *last = Some(tokio::time::Instant::now());
            Some(last)
        }
        _ => None,
    };
    if let Some(_counting) = due
        && let Ok(Ok(depth)) = tokio::time::timeout(HEALTH_TIMEOUT, services.store.depth()).await
    {
        metrics
            .mailbox_copies
            .set(i64::try_from(depth.copies).unwrap_or(i64::MAX));
        metrics
            .mailbox_bytes
            .set(i64::try_from(depth.bytes).unwrap_or(i64::MAX));
    }
    if let Some(cluster) = services.registry.cluster() {
        metrics.nats_connected.set(i64::from(cluster.connected()));
    }
    if let Some(window) = services.store.ack_window() {
        metrics.ack_window_seconds.set(window.width.as_secs_f64());
        metrics
            .ack_window_copies
            .set(i64::try_from(window.copies).unwrap_or(i64::MAX));
    }
    if let Some(batching) = services.store.batching() {
        // The store counts; the counters catch up with it (one scrape at
        // a time, so that none is counted twice).
        let _one = metrics
            .batches_read
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for (kind, stats) in [("fan_out", batching.fan_outs), ("ack", batching.acks)] {
            let labels = BatchLabels { kind };
            for (counter, value) in [
                (&metrics.batch_transactions, stats.transactions),
                (&metrics.batched_items, stats.items),
                (&metrics.batch_refused, stats.refused),
            ] {
                let counter = counter.get_or_create(&labels);
                counter.inc_by(value.saturating_sub(counter.get()));
            }
        }
    }
}

async fn respond(
    stream: &mut TcpStream,
    status: &str,
    content_type: &str,
    body: &str,
) -> std::io::Result<()> {
    let head = format!(
        "HTTP/1.1 {status}\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body.as_bytes()).await?;
    stream.shutdown().await
}
