//! The Umbra relay. It authenticates devices, keeps the KeyPackage directory,
//! orders each group's commits (one per epoch), and stores ciphertext in
//! per-device mailboxes until the device acknowledges it.
//!
//! Entry point: [`run`] serves a bound listener until a cancellation token
//! fires, then drains its connections. [`init`] prepares a data directory;
//! [`admin`] holds the operator's commands.
//!
//! **Invariant:** the server never holds a private key of a device or a
//! plaintext message; it cannot decrypt what it relays.
#![deny(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

pub mod admin;
mod burst;
pub mod cluster;
pub mod config;
mod connection;
pub mod delivery_ids;
mod handshake;
mod limits;
pub mod metrics;
mod reads;
mod registry;
pub mod rendezvous;
pub mod service;
mod spending;
pub mod tls;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, error, info, warn};
use umbra_proto::CertFingerprint;
use umbra_store::sqlite::SqliteStore;
use umbra_store::{Store, StoreLimits};

pub use config::Config;
pub use connection::websocket_config;
pub use umbra_proto::clock::{Clock, ManualClock, SystemClock};

use crate::connection::Connection;
use crate::registry::Registry;
pub use crate::service::PushWindow;
use crate::service::{Limits, Services};

/// Which way a frame went, for a [`FrameTap`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    Inbound,
    Outbound,
}

/// Sees every WebSocket frame the server receives or sends (after TLS).
/// Used by audits and tests that check what crosses the wire.
pub type FrameTap = Arc<dyn Fn(Direction, &[u8]) + Send + Sync>;

/// How long a new connection may take to finish its TLS and WebSocket
/// handshakes before it is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServerError {
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    #[error("cannot open the database: {0}")]
    Store(#[from] umbra_store::StoreError),
    #[error(transparent)]
    Cluster(#[from] cluster::ClusterError),
    #[error(
        "refusing to serve plain ws:// on {0}: without TLS the server may listen on a loopback address only"
    )]
    PlaintextOffLoopback(SocketAddr),
    #[error("{context}: {source}")]
    Io {
        context: String,
        source: std::io::Error,
    },
}

/// Extra wiring for [`run`]; the defaults are right for production.
#[derive(Clone)]
pub struct ServerOptions {
    pub clock: Arc<dyn Clock>,
    pub tap: Option<FrameTap>,
    /// The protocol's push flow control; tests of devices against a
    /// misbehaving server lift it.
    pub push_window: PushWindow,
    /// Told the address the metrics listener bound (`metrics_listen` may
    /// name port 0).
    pub metrics_bound: Option<Arc<std::sync::OnceLock<SocketAddr>>>,
    /// Notified to read the TLS certificate and key again (`umbra-server
    /// run` does on SIGHUP).
    pub reload_tls: Arc<tokio::sync::Notify>,
}

impl Default for ServerOptions {
    fn default() -> Self {
        ServerOptions {
            clock: Arc::new(SystemClock),
            tap: None,
            push_window: PushWindow::default(),
            metrics_bound: None,
            reload_tls: Arc::default(),
        }
    }
}

impl std::fmt::Debug for ServerOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerOptions")
            .field("clock", &self.clock)
            .field("tap", &self.tap.is_some())
            .finish()
    }
}

/// Creates `dir` (and its parents) readable by its owner only, as the data
/// directory and its backups are: they hold the TLS key, the delivery-ID
/// key and the database.
pub(crate) fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    builder.create(dir)
}

/// Creates `data_dir` with a documented configuration file, a fresh anchor
/// and a TLS certificate it issued for `public_address` (see [`tls`]).
/// Returns the anchor's fingerprint, which activation strings carry.
pub fn init(data_dir: &Path, public_address: &str) -> Result<CertFingerprint, ServerError> {
    let io = |context: String| move |source| ServerError::Io { context, source };
    // Readable by its owner only: it holds the TLS key, the delivery-ID
    // key and the database.
    create_private_dir(data_dir).map_err(io(format!("creating {}", data_dir.display())))?;
    let config_path = data_dir.join(config::CONFIG_FILE);
    if !config_path.exists() {
        let text = config::DEFAULT_CONFIG_TEXT.replace(
            "public_address = \"127.0.0.1:7443\"",
            &format!("public_address = {public_address:?}"),
        );
        std::fs::write(&config_path, text)
            .map_err(io(format!("writing {}", config_path.display())))?;
    }
    let config = Config::load(data_dir)?;
    let cert = data_dir.join(&config.cert);
    if cert.exists() {
        return Ok(tls::fingerprint(&cert)?);
    }
    // One address, or a cluster's nodes separated by commas: the
    // certificate (which every node presents) names each host.
    let names = tls::names_for(public_address);
    Ok(tls::generate(&cert, &data_dir.join(&config.key), names)?.pin)
}

/// Opens the data directory's SQLite store (refused when the
/// configuration names a PostgreSQL database: see [`connect_store`]).
pub fn open_store(data_dir: &Path, config: &Config) -> Result<SqliteStore, ServerError> {
    if config.postgres_url().is_some() {
        return Err(ServerError::Store(umbra_store::StoreError::Backend(
            "the configured database is PostgreSQL, not an SQLite file".into(),
        )));
    }
    let limits = StoreLimits {
        database_bytes: config.max_database_bytes,
        mailbox_bytes: config.max_mailbox_bytes,
    };
    Ok(SqliteStore::open_limited(
        &data_dir.join(&config.database),
        limits,
    )?)
}

/// Environment variable holding the PostgreSQL password, kept out of the
/// configuration file (and so out of backups of the data directory).
pub const DATABASE_PASSWORD_ENV: &str = "UMBRA_DATABASE_PASSWORD";

/// Environment variable holding the password (or token) this node gives
/// NATS, kept out of the configuration file as the database's is.
pub const NATS_PASSWORD_ENV: &str = "UMBRA_NATS_PASSWORD";

/// Opens the store the configuration names: the PostgreSQL database of a
/// `postgres://` URL (migrating it, one node at a time), or the data
/// directory's SQLite file.
pub async fn connect_store(
    data_dir: &Path,
    config: &Config,
) -> Result<Arc<dyn Store>, ServerError> {
    let Some(url) = config.postgres_url() else {
        return Ok(Arc::new(open_store(data_dir, config)?));
    };
    if config.max_database_bytes != 0 {
        return Err(ServerError::Store(umbra_store::StoreError::Backend(
            "max_database_bytes applies to the embedded SQLite store only: with PostgreSQL, \
             size its disk (and watch it) instead, and set max_database_bytes = 0"
                .into(),
        )));
    }
    let limits = StoreLimits {
        database_bytes: 0,
        mailbox_bytes: config.max_mailbox_bytes,
    };
    let password = std::env::var(DATABASE_PASSWORD_ENV).ok();
    Ok(Arc::new(
        umbra_store::postgres::PgStore::connect_with_password(url, password.as_deref(), limits)
            .await?,
    ))
}

/// Serves `listener` until `shutdown` is cancelled, then stops accepting,
/// lets every connection finish the request it is handling, and returns.
/// Every message acknowledged to a sender was stored before the
/// acknowledgement, so none is lost by stopping.
pub async fn run(
    config: Config,
    data_dir: PathBuf,
    listener: TcpListener,
    shutdown: CancellationToken,
    options: ServerOptions,
) -> Result<(), ServerError> {
    let local = listener.local_addr().map_err(|source| ServerError::Io {
        context: "reading the listening address".into(),
        source,
    })?;
    if !config.tls && !local.ip().is_loopback() {
        return Err(ServerError::PlaintextOffLoopback(local));
    }
    let acceptor = if config.tls {
        let identity =
            tls::Identity::load(&data_dir.join(&config.cert), &data_dir.join(&config.key))?;
        let server_config = tls::server_config(Arc::clone(&identity))?;
        Some((tokio_rustls::TlsAcceptor::from(server_config), identity))
    } else {
        None
    };
    if config.nats.is_some() && config.postgres_url().is_none() {
        return Err(ServerError::Store(umbra_store::StoreError::Backend(
            "nats is set, but the database is this node's own SQLite file: the nodes of a \
             cluster share a PostgreSQL database (database = \"postgres://…\")"
                .into(),
        )));
    }
    // NATS first: a wrong address is refused before the database is
    // touched (connecting does not wait for NATS to answer).
    let cluster = match &config.nats {
        Some(url) => {
            let password = std::env::var(NATS_PASSWORD_ENV).ok();
            Some(cluster::Cluster::connect(url, password.as_deref()).await?)
        }
        None => None,
    };
    let store = connect_store(&data_dir, &config).await?;
    // (This copy is wiped when the node stops. Not every copy is: the one
    // the file was read into, the AES and HMAC states derived from it.)
    let cluster_key = zeroize::Zeroizing::new(
        delivery_ids::load_or_create_key(&data_dir).map_err(|source| ServerError::Io {
            context: format!(
                "reading or making {}",
                data_dir.join(delivery_ids::KEY_FILE).display()
            ),
            source,
        })?,
    );
    let delivery_ids = delivery_ids::PublicIds::new(*cluster_key);
    let tracker = TaskTracker::new();
    let services = Arc::new(Services {
        store,
        registry: Registry::default(),
        delivery_ids,
        send_budget: limits::SendBudget::new(config.delivery_bytes_per_hour),
        anonymous_budget: limits::SendBudget::new(config.anonymous_bytes_per_group_hour),
        blob_read_budget: limits::SendBudget::new(config.blob_read_bytes_per_hour),
        blob_upload_budget: limits::SendBudget::new(config.blob_upload_bytes_per_hour),
        payers: spending::Pseudonyms::new(&cluster_key),
        blob_fetched_in_flight: Arc::new(tokio::sync::Semaphore::new(
            service::BLOB_FETCHED_IN_FLIGHT,
        )),
        rendezvous: Arc::new(rendezvous::Rendezvous::new(config.max_rendezvous_bytes)),
        rendezvous_keys: Arc::new(rendezvous::across::Keys::new(&cluster_key)),
        rendezvous_holders: rendezvous::across::Holders {
            tasks: tracker.clone(),
            stop: shutdown.clone(),
        },
        clock: options.clock,
        limits: Limits {
            pin: tls::fingerprint(&data_dir.join(&config.cert)).unwrap_or(CertFingerprint([0; 32])),
            push_window: options.push_window,
            config: config.clone(),
        },
        tokens: service::TokenKeys::default(),
        metrics: metrics::Metrics::default(),
    });
    info!(%local, tls = config.tls, "umbra-server listening");

    if let Some(cluster) = cluster {
        services.registry.join(Arc::clone(&cluster));
        tracker.spawn(spending::share(
            Arc::clone(&services),
            Arc::clone(&cluster),
            Arc::new(spending::seals(&cluster_key)),
            shutdown.clone(),
        ));
        tracker.spawn(keep_in_step(
            Arc::clone(&services),
            cluster,
            shutdown.clone(),
        ));
    }
    if let Some(away) = services.store.away() {
        tracker.spawn(read_again_when_back(
            Arc::clone(&services),
            away,
            shutdown.clone(),
        ));
    }
    if let Some((_, identity)) = &acceptor {
        tracker.spawn(present_tls(
            Arc::clone(&services),
            Arc::clone(identity),
            Arc::clone(&options.reload_tls),
            shutdown.clone(),
        ));
    }
    tracker.spawn(sweep_expired(
        Arc::clone(&services),
        config.expiry_sweep_interval,
        shutdown.clone(),
    ));
    if let Some(address) = config.metrics_listen {
        let listener = TcpListener::bind(address)
            .await
            .map_err(|source| ServerError::Io {
                context: format!("listening for metrics on {address}"),
                source,
            })?;
        let bound = listener.local_addr().map_err(|source| ServerError::Io {
            context: "reading the metrics address".into(),
            source,
        })?;
        if let Some(slot) = &options.metrics_bound {
            let _ = slot.set(bound);
        }
        info!(%bound, "metrics and health checks served over HTTP");
        tracker.spawn(metrics::serve(
            listener,
            Arc::clone(&services),
            shutdown.clone(),
        ));
    }
    let permits = Arc::new(Semaphore::new(config.max_connections.max(1)));
    let per_address = limits::AddressSlots::new(config.max_connections_per_address);
    let next_id = AtomicU64::new(1);
    loop {
        let permit = tokio::select! {
            _ = shutdown.cancelled() => break,
            permit = Arc::clone(&permits).acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => break,
            },
        };
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(error) => {
                // Typically EMFILE: back off briefly instead of spinning.
                warn!(%error, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let slot = per_address.take(peer.ip());
        let refused = slot.is_none().then(|| {
            umbra_proto::ErrorReply::new(
                umbra_proto::ErrorCode::TooManyConnections,
                format!(
                    "this address has {} connections open, the most allowed",
                    config.max_connections_per_address
                ),
            )
        });
        let connection = Connection {
            refused,
            services: Arc::clone(&services),
            id: next_id.fetch_add(1, Ordering::Relaxed),
            shutdown: shutdown.clone(),
            tap: options.tap.clone(),
            max_malformed_frames: config.max_malformed_frames,
        };
        let acceptor = acceptor.as_ref().map(|(acceptor, _)| acceptor.clone());
        tracker.spawn(async move {
            let _permit = permit;
            let _slot = slot;
            match acceptor {
                // The TLS state is boxed once and kept on the heap for the
                // connection's life, rather than sized into its task.
                Some(acceptor) => {
                    let accept = Box::pin(acceptor.accept(stream));
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, accept).await {
                        Ok(Ok(tls)) => connection.serve(Box::new(tls)).await,
                        Ok(Err(error)) => debug!(%peer, %error, "TLS handshake failed"),
                        Err(_) => debug!(%peer, "TLS handshake timed out"),
                    }
                }
                None => connection.serve(stream).await,
            }
        });
    }
    drop(listener);
    tracker.close();
    info!(
        connections = tracker.len(),
        "shutting down: draining connections"
    );
    tracker.wait().await;
    info!("umbra-server stopped");
    Ok(())
}

/// Draws `len` characters uniformly from the account-ID alphabet (used for
/// account IDs and activation codes).
pub(crate) fn random_string(len: usize) -> Result<String, getrandom::Error> {
    let alphabet = umbra_proto::AccountId::ALPHABET;
    let mut out = String::with_capacity(len);
    let mut bytes = [0u8; 32];
    while out.len() < len {
        getrandom::getrandom(&mut bytes)?;
        // Rejection sampling: 248 is the largest multiple of 31 below 256,
        // so every character is equally likely.
        for byte in bytes.iter().filter(|b| **b < 248) {
            if out.len() == len {
                break;
            }
            if let Some(c) = alphabet.get(usize::from(*byte) % alphabet.len()) {
                out.push(char::from(*c));
            }
        }
    }
    Ok(out)
}

/// Keeps this node's connections in step with the others': while NATS is
/// away every connection reads its mailbox every
/// [`cluster::POLL_WHILE_AWAY`]; once it is back (or after wake-ups may
/// have been lost anywhere) every node is asked to have its connections
/// read theirs; and every connection reads once every
/// [`cluster::SAFETY_POLL`] anyway (a share of them at each tick, so the
/// reads are spread), for wake-ups lost with a node that died before
/// sending them.
async fn keep_in_step(
    services: Arc<Services>,
    cluster: Arc<cluster::Cluster>,
    shutdown: CancellationToken,
) {
    use futures_util::StreamExt;
    match cluster.polls().await {
        Ok(mut polls) => {
            let (services, shutdown) = (Arc::clone(&services), shutdown.clone());
            tokio::spawn(async move {
                // However many nodes ask, and however often, every
                // connection reads its mailbox at most once a second.
                let mut coalesce = cluster::Coalesce::default();
                loop {
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        () = coalesce.due() => {
                            services.metrics.cluster_polls.inc();
                            services.registry.wake_all();
                        }
                        poll = polls.next() => match poll {
                            Some(_) => {
                                if coalesce.asked() {
                                    services.metrics.cluster_polls.inc();
                                    services.registry.wake_all();
                                }
                            }
                            None => return,
                        },
                    }
                }
            });
        }
        Err(error) => warn!(%error, "cannot hear the other nodes' requests to poll"),
    }
    let mut every = tokio::time::interval(cluster::POLL_WHILE_AWAY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let safety = (cluster::SAFETY_POLL.as_secs() / cluster::POLL_WHILE_AWAY.as_secs()).max(1);
    let (mut ticks, mut away) = (0u64, false);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = every.tick() => {}
        }
        ticks += 1;
        if !cluster.connected() {
            away = true;
            services.registry.wake_all();
        } else if std::mem::take(&mut away) | cluster.take_missed() {
            cluster.ask_all_to_poll().await;
            services.registry.wake_all();
        } else {
            // A share each tick: every connection reads once a period,
            // and a node's reads are spread over it.
            services.registry.wake_share(ticks % safety, safety);
        }
    }
}

/// When the store's database returns after being away, every connection
/// of this node reads its mailbox: a request cut off while the database
/// went away may have stored copies nobody was told of.
async fn read_again_when_back(
    services: Arc<Services>,
    mut away: tokio::sync::watch::Receiver<bool>,
    shutdown: CancellationToken,
) {
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            changed = away.changed() => {
                if changed.is_err() {
                    return;
                }
            }
        }
        if !*away.borrow_and_update() {
            services.registry.wake_all();
        }
    }
}

/// Reads the TLS certificate again when told to, and says (in the log
/// and the metrics) when the one presented expires: a warning from two
/// weeks before, an error once it has, when devices refuse it.
async fn present_tls(
    services: Arc<Services>,
    identity: Arc<tls::Identity>,
    reload: Arc<tokio::sync::Notify>,
    shutdown: CancellationToken,
) {
    const WARN_BEFORE: u64 = 14 * 86_400;
    let mut daily = tokio::time::interval(Duration::from_secs(86_400));
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = daily.tick() => {}
            _ = reload.notified() => {
                match identity.reload(services.clock.now()) {
                    Ok(presented) => info!(
                        not_after = presented.not_after,
                        "read the TLS certificate again: new connections are shown the new one"
                    ),
                    Err(error) => error!(%error, "kept the TLS certificate presented so far"),
                }
            }
        }
        let Some(not_after) = identity.presented().not_after else {
            continue;
        };
        services
            .metrics
            .tls_expiry
            .set(i64::try_from(not_after).unwrap_or(i64::MAX));
        let now = services.clock.now();
        if not_after <= now {
            error!(
                not_after,
                "the TLS certificate has expired and devices refuse it: \
                 run `umbra-server admin rotate-tls`, then send this process SIGHUP"
            );
        } else if not_after - now < WARN_BEFORE {
            warn!(
                not_after,
                days_left = (not_after - now) / 86_400,
                "the TLS certificate expires soon: run `umbra-server admin rotate-tls`, \
                 then send this process SIGHUP"
            );
        }
    }
}

async fn sweep_expired(services: Arc<Services>, every: Duration, shutdown: CancellationToken) {
    let mut ticks = tokio::time::interval(every.max(Duration::from_secs(1)));
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = ticks.tick() => {}
        }
        match services.store.expire(services.clock.now()).await {
            Ok(0) => {}
            Ok(removed) => info!(removed, "expired undelivered messages"),
            Err(error) => warn!(%error, "expiring mailboxes failed"),
        }
        let now = services.clock.now();
        let idle = services.limits.config.blob_upload_idle.as_secs();
        match services
            .store
            .expire_blobs(now, now.saturating_sub(idle))
            .await
        {
            Ok(0) => {}
            Ok(removed) => info!(removed, "deleted expired or abandoned attachments"),
            Err(error) => warn!(%error, "expiring attachments failed"),
        }
        services.send_budget.prune(tokio::time::Instant::now());
        services.anonymous_budget.prune(tokio::time::Instant::now());
        services.blob_read_budget.prune(tokio::time::Instant::now());
        services
            .blob_upload_budget
            .prune(tokio::time::Instant::now());
        match services.purge_lapsed_lines().await {
            Ok(0) => {}
            Ok(ended) => info!(ended, "ended lines whose subscription lapsed"),
            Err(error) => warn!(%error, "ending lapsed lines failed"),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    /// A new data directory is its owner's alone: it holds the TLS key,
    /// the delivery-ID key and the database.
    #[cfg(unix)]
    #[test]
    fn a_new_data_directory_is_readable_by_its_owner_only() {
        use std::os::unix::fs::PermissionsExt as _;
        let parent = tempfile::tempdir().unwrap();
        let data = parent.path().join("data");
        super::init(&data, "127.0.0.1:0").unwrap();
        let mode = std::fs::metadata(&data).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700, "{mode:o}");
    }
}
