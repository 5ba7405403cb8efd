//! The clustered backend: every store trait over one PostgreSQL database,
//! which several server nodes may share.
//!
//! Each trait method is one transaction (READ COMMITTED), retried from the
//! start when PostgreSQL aborts it for a deadlock, a serialization failure
//! or a unique-key race with another node, so the outcome is always one
//! that a single node could have produced. What must happen one at a time
//! is serialised by a row lock, never by a lock the nodes keep themselves:
//!
//! - one commit per epoch: the group's row, `FOR UPDATE`;
//! - a mailbox's delivery IDs: its row in `mailbox_heads`, updated in the
//!   transaction that stores the copy, so each mailbox's IDs are dense,
//!   increase in commit order and are never reused (a connection that has
//!   seen ID n never later finds n - 1 appear). A transaction locks every
//!   head row it will touch in one sorted statement, before it deletes
//!   any copy (`mailboxes::lock_heads_where`); a removed device's row is
//!   closed;
//! - a message's check and copies: the sender's line and the group's row,
//!   shared, so no commit or revocation lands between them;
//! - a device log's next position, a redeemed code, a line's state: their
//!   rows, `FOR UPDATE`;
//! - a contact pair and the token keys: transaction-scoped advisory locks.
//!
//! A group's row and a line's are taken after their *turns* (`turns.rs`),
//! advisory locks that PostgreSQL queues fairly, where row locks are not.
//!
//! A node killed in the middle of a transaction leaves no lock behind:
//! PostgreSQL aborts the transaction when its connection drops.
//!
//! While the database does not answer (down, stopped, cut off), requests
//! fail at once with [`StoreError::Unavailable`] instead of each waiting
//! out [`TRANSACTION_TIMEOUT`]: a probe on a connection of its own asks the
//! database every [`PROBE_INTERVAL`] and holds it away after two probes in
//! a row without an answer; the store serves again as soon as it answers.
//! A transaction already past its statements (sending COMMIT) is never
//! cut off this way, so what the database commits is what the node says.
//!
//! There is no ack window here: every copy is written before its sender is
//! told "accepted" ([`crate::Durable::ready`]).

mod accounts;
mod batch;
mod blobs;
mod contacts;
mod groups;
mod keys;
mod mailboxes;
mod queue;
pub mod testing;
mod turns;

pub use crate::BatchStats;
pub(crate) use batch::FanOut;
pub(crate) use mailboxes::Ack;

use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use tokio_postgres::NoTls;
use tokio_postgres::error::SqlState;
use umbra_proto::{AccountId, DeviceAddr, DeviceId, GroupId};

use crate::{Result, StoreError, StoreLimits};

/// The migrations run outside a transaction, statement by statement (an
/// index built `CONCURRENTLY`, without stopping the writes of the old
/// nodes still serving, cannot be built inside one), with the table each
/// indexes and the indexes it builds. Each must be safe to run again from
/// the start: a node may die half way. An index its attempt finished is
/// kept (it is built with `IF NOT EXISTS`); one it left invalid, its
/// build cut short, is dropped before the migration runs again; and the
/// version is recorded only once every index is there and valid.
const ALONE: &[(i32, &str, &[&str])] = &[(3, "mailbox", &["mailbox_full_notices"])];

/// How often a node starting while another migrates tries for the lock.
const MIGRATION_POLL: Duration = Duration::from_millis(100);
/// How often a node waiting for another's migration says so in its log.
const MIGRATION_NOTE: Duration = Duration::from_secs(10);
/// How often the database checks, during a migration's long statement,
/// that the node running it is still there: a node killed while it builds
/// an index would otherwise hold the migration lock until the build ends.
const MIGRATION_ALIVE: &str = "1s";

/// The statements of a migration to run alone: split at semicolons (such
/// a migration has none inside a statement), comment lines dropped.
fn statements(sql: &str) -> impl Iterator<Item = &str> {
    sql.split(';').map(str::trim).filter(|statement| {
        statement
            .lines()
            .any(|line| !line.trim().is_empty() && !line.trim().starts_with("--"))
    })
}

/// Numbered migrations, applied in order; `schema_migrations` records each.
const MIGRATIONS: &[(i32, &str)] = &[
    (1, include_str!("../../migrations/postgres/0001_init.sql")),
    (2, include_str!("../../migrations/postgres/0002_blobs.sql")),
    (
        3,
        include_str!("../../migrations/postgres/0003_mailbox_full_notices.sql"),
    ),
];

/// Connections each node keeps to the database at most.
const POOL_SIZE: usize = 16;
/// How long a request waits for a connection, or for one to be made,
/// before it fails (with a retryable error) instead of hanging while the
/// database is away.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long one transaction may take, retries included. Past it the
/// request fails; its connection is closed, so whatever it left open is
/// rolled back by the database.
const TRANSACTION_TIMEOUT: Duration = Duration::from_secs(15);
/// Times a transaction is run again after a deadlock, serialization
/// failure or unique-key race.
const RETRIES: u32 = 8;
/// How often the probe asks the database whether it answers.
const PROBE_INTERVAL: Duration = Duration::from_secs(1);
/// How long the probe waits for an answer (a connection made, `SELECT 1`
/// answered). Two probes in a row without one (the second at once after
/// the first) and the database is held to be away.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);
/// Key of the advisory lock that serialises migrations across nodes.
const MIGRATION_LOCK: i64 = 0x756d_6272_615f_6d67; // "umbra_mg"

/// Server storage in a PostgreSQL database, shared by every node of a
/// cluster.
#[derive(Clone)]
pub struct PgStore {
    pool: Pool,
    limits: StoreLimits,
    /// Whether the probe finds the database away (see [`probe`]).
    away: tokio::sync::watch::Receiver<bool>,
    /// The node's fan-outs and acknowledgements, batched (see [`queue`]);
    /// `None` on the dispatchers' own handle, which runs them.
    queues: Option<std::sync::Arc<Queues>>,
}

impl std::fmt::Debug for PgStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The URL may carry a password: never shown.
        f.write_str("PgStore")
    }
}

/// A node's batching queues.
struct Queues {
    fan_outs: queue::Queue<batch::FanOut>,
    acks: queue::Queue<mailboxes::Ack>,
}

/// A failure inside a transaction: a database error (which may be worth a
/// retry) or the store's own.
#[derive(Debug)]
pub(crate) enum Failure {
    Db(tokio_postgres::Error),
    Store(StoreError),
}

impl From<tokio_postgres::Error> for Failure {
    fn from(error: tokio_postgres::Error) -> Self {
        Failure::Db(error)
    }
}

impl From<StoreError> for Failure {
    fn from(error: StoreError) -> Self {
        Failure::Store(error)
    }
}

impl Failure {
    /// Whether running the transaction again may succeed: PostgreSQL chose
    /// it as a deadlock's or serialization's victim, or another node
    /// inserted the same key first (run again, the transaction sees that
    /// row and answers accordingly).
    fn retryable(&self) -> bool {
        let Failure::Db(error) = self else {
            return false;
        };
        matches!(
            error.code(),
            Some(code) if *code == SqlState::T_R_DEADLOCK_DETECTED
                || *code == SqlState::T_R_SERIALIZATION_FAILURE
                || *code == SqlState::UNIQUE_VIOLATION
                || *code == SqlState::FOREIGN_KEY_VIOLATION
        )
    }

    fn into_store(self) -> StoreError {
        match self {
            Failure::Store(error) => error,
            Failure::Db(error) => backend(error),
        }
    }
}

/// A database error as the store reports it: a full disk is
/// [`StoreError::Full`], a connection that failed or closed
/// [`StoreError::Unavailable`]. The text names the SQLSTATE and the
/// server's message, never a parameter (which could be a ciphertext or a
/// key).
pub(crate) fn backend(error: tokio_postgres::Error) -> StoreError {
    match error.code() {
        Some(code) if *code == SqlState::DISK_FULL => StoreError::Full,
        Some(code) => StoreError::Backend(format!(
            "PostgreSQL refused ({}): {}",
            code.code(),
            error
                .as_db_error()
                .map_or_else(|| error.to_string(), |db| db.message().to_owned())
        )),
        None if error.is_closed() || io_error(&error) => {
            StoreError::Unavailable(format!("PostgreSQL: {error}"))
        }
        None => StoreError::Backend(format!("PostgreSQL client: {error}")),
    }
}

/// Whether `error` is a failure of the connection itself (refused, reset,
/// timed out) rather than of something asked on it.
fn io_error(error: &tokio_postgres::Error) -> bool {
    std::error::Error::source(error).is_some_and(|source| source.is::<std::io::Error>())
}

/// A pool's failure: every connection busy is the node's own load, not an
/// outage; a connection that cannot be made is.
fn pool_error(error: deadpool_postgres::PoolError) -> StoreError {
    match error {
        deadpool_postgres::PoolError::Timeout(deadpool_postgres::TimeoutType::Wait) => {
            StoreError::Backend(format!(
                "PostgreSQL: {error} (every pooled connection busy)"
            ))
        }
        deadpool_postgres::PoolError::Backend(error) => backend(error),
        error => StoreError::Unavailable(format!("PostgreSQL: {error}")),
    }
}

/// What a request is told while the probe finds the database away.
pub(crate) fn away() -> StoreError {
    StoreError::Unavailable("PostgreSQL does not answer".into())
}

/// Runs `$body` in a transaction on a pooled connection, committing if it
/// returns `Ok`, and runs it again (from a fresh transaction) when
/// PostgreSQL aborted it for a reason a retry can cure. `$tx` names the
/// transaction inside the body, whose `?` takes database and store errors
/// alike. The whole, retries included, is bounded by
/// [`TRANSACTION_TIMEOUT`], and given up at once (or not started) while
/// the probe finds the database away.
macro_rules! transaction {
    ($store:expr, $tx:ident => $body:expr) => {
        $crate::postgres::transaction!($store, ReadCommitted, false, $tx => $body)
    };
    (read $store:expr, $tx:ident => $body:expr) => {
        $crate::postgres::transaction!($store, RepeatableRead, true, $tx => $body)
    };
    ($store:expr, $level:ident, $read_only:expr, $tx:ident => $body:expr) => {{
        let store: &$crate::postgres::PgStore = $store;
        let work = async {
            let mut attempt = 0u32;
            loop {
                // While the database is away: refused at once, or let go
                // while waiting for a connection.
                let mut client = tokio::select! {
                    biased;
                    () = store.gone_away() => break Err($crate::postgres::away()),
                    client = store.client() => client?,
                };
                let mut abandoned = false;
                let outcome: std::result::Result<_, $crate::postgres::Failure> = async {
                    // Let go if the database goes away before COMMIT is
                    // sent (rolled back when the connection closes); from
                    // COMMIT on, the answer is waited for (within the
                    // bound below), so a commit the database made is never
                    // reported as failed because of the probe.
                    let ($tx, value) = tokio::select! {
                        biased;
                        () = store.gone_away() => {
                            return Err($crate::postgres::Failure::Store($crate::postgres::away()));
                        }
                        done = async {
                            let $tx = client
                                .build_transaction()
                                .isolation_level(tokio_postgres::IsolationLevel::$level)
                                .read_only($read_only)
                                .start()
                                .await?;
                            let value = async { $body }.await?;
                            Ok::<_, $crate::postgres::Failure>(($tx, value))
                        } => done?,
                    };
                    // A COMMIT the database refused (a serialization
                    // failure) may be retried; one whose answer was lost
                    // with the connection may have been applied, and is
                    // reported as such, not as "nothing stored". So is
                    // one still unanswered when the probe finds the
                    // database away: waiting out the whole bound would
                    // hold the requests queued behind it for nothing.
                    tokio::select! {
                        biased;
                        committed = $tx.commit() => {
                            committed.map_err(|error| match error.code() {
                                Some(_) => $crate::postgres::Failure::Db(error),
                                None => $crate::postgres::Failure::Store(
                                    $crate::StoreError::Backend(format!(
                                        "PostgreSQL did not confirm the commit: {error}"
                                    )),
                                ),
                            })?;
                        }
                        () = store.gone_away() => {
                            abandoned = true;
                            // A read-only transaction changed nothing: it
                            // is simply refused, as before COMMIT.
                            return Err($crate::postgres::Failure::Store(if $read_only {
                                $crate::postgres::away()
                            } else {
                                $crate::StoreError::Backend(
                                    "PostgreSQL did not confirm the commit before it stopped \
                                     answering (it may have been applied)"
                                        .into(),
                                )
                            }));
                        }
                    }
                    Ok(value)
                }
                .await;
                // A connection whose COMMIT is still unanswered leaves the
                // pool, never handed to another request (it closes once
                // PostgreSQL answers or its socket fails).
                if !abandoned {
                    client.finished();
                }
                match outcome {
                    Ok(value) => break Ok(value),
                    Err(failure) if failure.retryable() && attempt < $crate::postgres::RETRIES => {
                        attempt += 1;
                        $crate::postgres::back_off(attempt).await;
                    }
                    Err(failure) => break Err(failure.into_store()),
                }
            }
        };
        tokio::time::timeout($crate::postgres::TRANSACTION_TIMEOUT, work)
            .await
            .unwrap_or_else(|_| Err($crate::StoreError::Backend(
                "PostgreSQL did not finish the transaction in time".into(),
            )))
    }};
}
pub(crate) use transaction;

/// A short random wait before a retry, growing with each attempt, so two
/// transactions that deadlocked do not meet again at once.
pub(crate) async fn back_off(attempt: u32) {
    let mut noise = [0u8; 2];
    let _ = getrandom::getrandom(&mut noise);
    let micros = u64::from(u16::from_le_bytes(noise)) % (1000 << attempt.min(6));
    tokio::time::sleep(Duration::from_micros(micros)).await;
}

/// A pooled connection that goes back to the pool only when the
/// transaction on it finished: one dropped half way (its caller gave up,
/// or the timeout fired) is closed instead, so the database rolls back
/// whatever it left open and no later request inherits it.
pub(crate) struct Pooled {
    client: Option<deadpool_postgres::Object>,
    finished: bool,
}

impl Pooled {
    fn finished(&mut self) {
        self.finished = true;
    }
}

impl std::ops::Deref for Pooled {
    type Target = deadpool_postgres::Object;
    fn deref(&self) -> &Self::Target {
        #[allow(clippy::expect_used)] // taken only in drop
        self.client.as_ref().expect("a pooled connection")
    }
}

impl std::ops::DerefMut for Pooled {
    fn deref_mut(&mut self) -> &mut Self::Target {
        #[allow(clippy::expect_used)] // taken only in drop
        self.client.as_mut().expect("a pooled connection")
    }
}

impl Drop for Pooled {
    fn drop(&mut self) {
        if !self.finished
            && let Some(client) = self.client.take()
        {
            drop(deadpool_postgres::Object::take(client));
        }
    }
}

impl PgStore {
    /// Connects to the database at `url` (`postgres://user@host:port/db`)
    /// and brings its schema up to date. Several nodes may do this at once:
    /// migrations run one node at a time.
    pub async fn connect(url: &str, limits: StoreLimits) -> Result<Self> {
        Self::connect_with_password(url, None, limits).await
    }

    /// Like [`PgStore::connect`], with the password given apart: a URL
    /// that carries one is refused, so that it is never written in a
    /// configuration file or shown where the URL is.
    pub async fn connect_with_password(
        url: &str,
        password: Option<&str>,
        limits: StoreLimits,
    ) -> Result<Self> {
        // The parser's message may quote the URL: not repeated.
        let mut config: tokio_postgres::Config = url.parse().map_err(|_| {
            StoreError::Backend(
                "the database URL is not a valid postgres://user@host:port/dbname".into(),
            )
        })?;
        if config.get_password().is_some() {
            return Err(StoreError::Backend(
                "the database URL carries a password: remove it, and give it in the \
                 environment variable UMBRA_DATABASE_PASSWORD instead"
                    .into(),
            ));
        }
        if let Some(password) = password {
            config.password(password);
        }
        config.connect_timeout(CONNECT_TIMEOUT);
        config.application_name("umbra-server");
        // The database gives up too, a little before the node does: a
        // transaction whose node stopped waiting (or died) does not keep
        // its locks while it waits behind another.
        config.options(
            "-c statement_timeout=14000 -c lock_timeout=14000 \
             -c idle_in_transaction_session_timeout=15000",
        );
        config.keepalives_idle(Duration::from_secs(30));
        let manager = Manager::from_config(
            config.clone(),
            NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(POOL_SIZE)
            .wait_timeout(Some(CONNECT_TIMEOUT))
            .create_timeout(Some(CONNECT_TIMEOUT))
            .recycle_timeout(Some(CONNECT_TIMEOUT))
            .runtime(Runtime::Tokio1)
            .build()
            .map_err(|error| StoreError::Backend(format!("PostgreSQL pool: {error}")))?;
        let (state, away) = tokio::sync::watch::channel(false);
        let mut store = PgStore {
            pool,
            limits,
            away,
            queues: None,
        };
        store.migrate().await?;
        tokio::spawn(probe(config, state, store.pool.clone()));
        store.queues = Some(std::sync::Arc::new(Queues {
            fan_outs: queue::Queue::start(store.clone()),
            acks: queue::Queue::start(store.clone()),
        }));
        Ok(store)
    }

    /// How this node's fan-outs were batched into transactions so far.
    pub fn fan_out_stats(&self) -> BatchStats {
        self.queues
            .as_ref()
            .map_or_else(BatchStats::default, |queues| queues.fan_outs.stats())
    }

    /// How this node's acknowledgements were batched into transactions so
    /// far.
    pub fn ack_stats(&self) -> BatchStats {
        self.queues
            .as_ref()
            .map_or_else(BatchStats::default, |queues| queues.acks.stats())
    }

    /// Resolves once the probe finds the database away (at once if it is
    /// now); never if there is no probe.
    async fn gone_away(&self) {
        let mut away = self.away.clone();
        if away.wait_for(|away| *away).await.is_err() {
            std::future::pending::<()>().await;
        }
    }

    async fn client(&self) -> Result<Pooled> {
        let client = self.pool.get().await.map_err(pool_error)?;
        Ok(Pooled {
            client: Some(client),
            finished: false,
        })
    }

    /// Applies the migrations the database lacks, one node at a time:
    /// under the migration lock, held by a connection of its own for its
    /// session (closed after, never pooled, so the lock goes with it
    /// whatever happened). The lock is taken by trying, not by waiting: a
    /// node waiting in a statement holds a snapshot, and an index built
    /// `CONCURRENTLY` waits for every older snapshot, so the two would
    /// wait for each other.
    async fn migrate(&self) -> Result<()> {
        let mut client = self.client().await?;
        let waiting = std::time::Instant::now();
        let mut noted = waiting;
        loop {
            let locked: bool = client
                .query_one("SELECT pg_try_advisory_lock($1)", &[&MIGRATION_LOCK])
                .await
                .map_err(backend)?
                .get(0);
            if locked {
                break;
            }
            if noted.elapsed() >= MIGRATION_NOTE {
                noted = std::time::Instant::now();
                // Which session holds it, for the operator to look at (or
                // end): a node's, or one an operator opened.
                // Best effort: the log line matters, not the pid.
                let holder: Option<i32> = client
                    .query_opt(
                        "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted
                           AND objsubid = 1 AND (classid::bigint << 32 | objid::bigint) = $1
                           AND database = (SELECT oid FROM pg_database
                                           WHERE datname = current_database())
                         LIMIT 1",
                        &[&MIGRATION_LOCK],
                    )
                    .await
                    .ok()
                    .flatten()
                    .and_then(|row| row.try_get(0).ok().flatten());
                tracing::warn!(
                    waited_secs = waiting.elapsed().as_secs(),
                    holder_pid = holder,
                    "another session is migrating the database schema; waiting for it"
                );
            }
            tokio::time::sleep(MIGRATION_POLL).await;
        }
        client
            .batch_execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations (
                     version INTEGER PRIMARY KEY,
                     applied_at TIMESTAMPTZ NOT NULL DEFAULT now()
                 )",
            )
            .await
            .map_err(backend)?;
        let applied: i32 = client
            .query_one(
                "SELECT COALESCE(MAX(version), 0) FROM schema_migrations",
                &[],
            )
            .await
            .map_err(backend)?
            .get(0);
        crate::refuse_newer_schema(
            i64::from(applied),
            MIGRATIONS.last().map_or(0, |(v, _)| i64::from(*v)),
        )?;
        let mut watched = false;
        for (version, sql) in MIGRATIONS.iter().filter(|(v, _)| *v > applied) {
            if let Some((_, table, indexes)) = ALONE.iter().find(|(v, _, _)| v == version) {
                // No time limit: the index is built from the whole table
                // while the old nodes' writes go on.
                client
                    .batch_execute("SET statement_timeout = 0; SET lock_timeout = 0")
                    .await
                    .map_err(backend)?;
                if !watched {
                    watched = true;
                    watch_client(&client).await;
                }
                drop_invalid(&client, table, indexes).await?;
                for statement in statements(sql) {
                    client.batch_execute(statement).await.map_err(backend)?;
                }
                let valid = valid_indexes(&client, table, indexes).await?;
                if valid != indexes.len() {
                    return Err(StoreError::Backend(format!(
                        "migration {version} left {} of its {} indexes on {table} missing or \
                         invalid; not recorded (the next start builds them again)",
                        indexes.len() - valid,
                        indexes.len()
                    )));
                }
                client
                    .execute(
                        "INSERT INTO schema_migrations (version) VALUES ($1)",
                        &[version],
                    )
                    .await
                    .map_err(backend)?;
            } else {
                let tx = client.transaction().await.map_err(backend)?;
                tx.batch_execute(sql).await.map_err(backend)?;
                tx.execute(
                    "INSERT INTO schema_migrations (version) VALUES ($1)",
                    &[version],
                )
                .await
                .map_err(backend)?;
                tx.commit().await.map_err(backend)?;
            }
        }
        // Dropped unfinished: the connection closes, the lock with it.
        drop(client);
        Ok(())
    }

    /// The newest schema version this build knows, and the one the
    /// database is at.
    pub async fn schema_versions(&self) -> Result<(i32, i32)> {
        let newest = MIGRATIONS.last().map_or(0, |(v, _)| *v);
        let at = transaction!(read self, tx => {
            let row = tx
                .query_one("SELECT COALESCE(MAX(version), 0) FROM schema_migrations", &[])
                .await?;
            Ok::<i32, Failure>(row.get(0))
        })?;
        Ok((newest, at))
    }
}

/// Asks PostgreSQL to check, during the migration's long statements,
/// that this node is still there ([`MIGRATION_ALIVE`]): a node killed
/// while it builds an index then lets the migration lock go within about
/// a second instead of when the build ends. Not every server can (before
/// PostgreSQL 14, or where the platform cannot tell a closed socket): it
/// is then only said in the log.
async fn watch_client(client: &Pooled) {
    let set = format!("SET client_connection_check_interval = '{MIGRATION_ALIVE}'");
    if let Err(error) = client.batch_execute(&set).await {
        tracing::warn!(
            %error,
            "PostgreSQL cannot watch the migrating node's connection: a node killed during \
             the migration holds its lock until the statement ends"
        );
    }
}

/// The indexes of `table` among `names` (as the table's own schema holds
/// them, wherever the search path points), schema-qualified and quoted by
/// PostgreSQL; `$3` picks those whose build finished, or the others.
const INDEXES_OF: &str = "SELECT format('%I.%I', n.nspname, c.relname)
     FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid
     JOIN pg_namespace n ON n.oid = c.relnamespace
     WHERE i.indrelid = $1::text::regclass AND c.relname = ANY($2) AND i.indisvalid = $3";

/// Drops those of `indexes` on `table` that an attempt at their migration
/// left invalid (its build cut short: the node died, or the database
/// went away); a valid one, its build finished, is kept.
async fn drop_invalid(client: &Pooled, table: &str, indexes: &[&str]) -> Result<()> {
    let rows = client
        .query(INDEXES_OF, &[&table, &indexes, &false])
        .await
        .map_err(backend)?;
    for row in rows {
        let name: &str = row.get(0);
        tracing::info!(
            index = name,
            "dropping an index an earlier migration left unfinished"
        );
        client
            .batch_execute(&format!("DROP INDEX CONCURRENTLY IF EXISTS {name}"))
            .await
            .map_err(backend)?;
    }
    Ok(())
}

/// How many of `indexes` on `table` are there and valid.
async fn valid_indexes(client: &Pooled, table: &str, indexes: &[&str]) -> Result<usize> {
    Ok(client
        .query(INDEXES_OF, &[&table, &indexes, &true])
        .await
        .map_err(backend)?
        .len())
}

/// A `u64` the protocol carries, as a BIGINT: values past its range are
/// kept at its end (no stored time, count or epoch gets there).
pub(crate) fn big(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

/// A BIGINT read back as the `u64` it was stored from.
pub(crate) fn unsigned(value: i64) -> Result<u64> {
    u64::try_from(value).map_err(|_| StoreError::Corrupt(format!("a negative count {value}")))
}

pub(crate) fn account_id(text: &str) -> Result<AccountId> {
    AccountId::parse(text).map_err(|e| StoreError::Corrupt(e.to_string()))
}

pub(crate) fn group_id(bytes: Vec<u8>) -> Result<GroupId> {
    GroupId::new(bytes).map_err(|e| StoreError::Corrupt(e.to_string()))
}

pub(crate) fn device_addr(account: &str, device: i64) -> Result<DeviceAddr> {
    let device = u32::try_from(device)
        .map_err(|_| StoreError::Corrupt(format!("device number {device}")))?;
    Ok(DeviceAddr::new(account_id(account)?, DeviceId(device)))
}

/// The advisory-lock key for something named by `parts` (a contact pair,
/// the token keys): the first 8 bytes of their SHA-256.
pub(crate) fn lock_key(parts: &[&[u8]]) -> i64 {
    use sha2::{Digest, Sha256};
    let mut hash = Sha256::new();
    for part in parts {
        hash.update((part.len() as u64).to_be_bytes());
        hash.update(part);
    }
    let digest = hash.finalize();
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    i64::from_be_bytes(first)
}

/// Asks the database every [`PROBE_INTERVAL`], on a connection of its own
/// (so a pool taken up by slow requests does not look like an outage),
/// whether it answers, and tells the stores through `state`: away after
/// two probes in a row without an answer, back at the first answer (then
/// the pool's connections are dropped, since one cut off by a network
/// fault may look open and cost a request its whole bound). Ends when the
/// last store (clone) is dropped.
async fn probe(
    config: tokio_postgres::Config,
    state: tokio::sync::watch::Sender<bool>,
    pool: Pool,
) {
    let mut link = None;
    let mut silent = 0u32;
    let mut tick = tokio::time::interval(PROBE_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        // After one probe without an answer, the next goes at once.
        if silent != 1 {
            tick.tick().await;
        }
        if state.is_closed() {
            return;
        }
        let silence = match tokio::time::timeout(PROBE_TIMEOUT, ask(&config, &mut link)).await {
            Ok(Ok(())) => None,
            // The database replied, if with an error (too many
            // connections, a role refused): it is there, and requests get
            // its own errors.
            Ok(Err(error)) if replied(&error) => None,
            Ok(Err(error)) => Some(error.to_string()),
            Err(_) => Some(format!("no answer within {PROBE_TIMEOUT:?}")),
        };
        let Some(why) = silence else {
            silent = 0;
            if state.send_if_modified(|away| std::mem::replace(away, false)) {
                pool.retain(|_, _| false);
                tracing::info!("PostgreSQL answers again: requests are served");
            }
            continue;
        };
        // A connection that did not answer is given up (its socket
        // closed), not kept waiting for a database that may never answer
        // on it.
        if let Some((_, connection)) = link.take() {
            connection.abort();
        }
        silent = silent.saturating_add(1);
        if silent >= 2 && state.send_if_modified(|away| !std::mem::replace(away, true)) {
            tracing::warn!(
                %why,
                "PostgreSQL does not answer: requests fail at once (retryable) until it does"
            );
        }
    }
}

/// Whether the database itself sent `error` (so it is there), other than
/// to say that it is shutting down or starting.
fn replied(error: &tokio_postgres::Error) -> bool {
    error.code().is_some_and(|code| {
        *code != SqlState::ADMIN_SHUTDOWN
            && *code != SqlState::CRASH_SHUTDOWN
            && *code != SqlState::CANNOT_CONNECT_NOW
    })
}

/// One probe: a connection if there is none, then `SELECT 1`.
async fn ask(
    config: &tokio_postgres::Config,
    link: &mut Option<(tokio_postgres::Client, tokio::task::JoinHandle<()>)>,
) -> std::result::Result<(), tokio_postgres::Error> {
    if link.as_ref().is_none_or(|(client, _)| client.is_closed()) {
        let (client, connection) = config.connect(NoTls).await?;
        let connection = tokio::spawn(async move {
            let _ = connection.await;
        });
        *link = Some((client, connection));
    }
    if let Some((client, _)) = link.as_ref() {
        client.simple_query("SELECT 1").await?;
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    /// A transaction whose COMMIT went out just as the database stopped
    /// answering is not held for the whole bound: once the probe finds the
    /// database away, it ends as "not confirmed" (it may have been
    /// applied), never as "refused"; meanwhile its connection's other
    /// requests wait behind it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_commit_unanswered_when_the_database_goes_away_ends_unconfirmed_without_the_whole_bound()
     {
        let pg = testing::PrivatePostgres::start(false).unwrap_or_else(|e| panic!("{e}"));
        let store = pg.fresh_store(StoreLimits::default()).await.unwrap();
        let asked = std::time::Instant::now();
        let pause = || pg.pause().unwrap();
        let outcome: Result<()> = transaction!(&store, tx => {
            tx.execute("SELECT 1", &[]).await?;
            // Stopped between the body and COMMIT: COMMIT is sent to a
            // database that never answers it.
            pause();
            Ok::<(), Failure>(())
        });
        let took = asked.elapsed();
        pg.resume().unwrap();
        let error = outcome.expect_err("an unanswered COMMIT is not a success");
        assert!(
            matches!(&error, StoreError::Backend(reason) if reason.contains("did not confirm")),
            "{error}"
        );
        assert!(
            took < TRANSACTION_TIMEOUT - Duration::from_secs(3),
            "held {took:?}, near the whole bound"
        );
    }
}
