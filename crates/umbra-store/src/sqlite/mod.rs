//! The embedded backend: SQLite in WAL mode with `synchronous=FULL`, so a
//! delivery is on disk before the sender is told it was accepted.
//!
//! Two connections, each behind a mutex: the writer thread's (SQLite
//! allows one writer at a time anyway) and one for reads, used from
//! tokio's blocking pool, which WAL lets read while the writer commits (an
//! in-memory database has just the one). Readers might gain from a pool;
//! that can come when a benchmark shows it matters.

mod blobs;
mod devices;
mod mailbox_bytes;
mod tokens;

use std::cell::RefCell;
use std::collections::HashMap;
use std::path::Path;
use std::sync::mpsc::RecvTimeoutError;
use std::sync::{Arc, Mutex, MutexGuard, RwLock, RwLockWriteGuard};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use rusqlite::{Connection, OptionalExtension, Transaction, params};
use umbra_proto::tokens::DELIVERY_KEY_BYTES;
use umbra_proto::{AccountId, DeliveryKind, DeviceAddr, DeviceId, GroupId, IdentityKey};

use crate::staging::{DueCopy, Staging};
use crate::{
    Account, Accounts, CodeHash, CodeKind, CommitOutcome, CommitRecord, ContactAcceptOutcome,
    ContactRequestOutcome, Contacts, DAY, Distributor, Distributors, FanOutOutcome, GroupState,
    Groups, KeyPackageStock, KeyPackages, LineStatus, Mailboxes, Notice, Registration, Renewal,
    Result, Sender, StoreError, StoreLimits, StoredDelivery, Timestamp,
};
use mailbox_bytes::MailboxBytes;

/// Numbered migrations, applied in order; `PRAGMA user_version` records the
/// last one applied.
const MIGRATIONS: &[(u32, &str)] = &[
    (1, include_str!("../../migrations/0001_init.sql")),
    (2, include_str!("../../migrations/0002_lines.sql")),
    (3, include_str!("../../migrations/0003_delivery_ids.sql")),
    (4, include_str!("../../migrations/0004_public_state.sql")),
    (5, include_str!("../../migrations/0005_wipe_replay.sql")),
    (6, include_str!("../../migrations/0006_group_info.sql")),
    (7, include_str!("../../migrations/0007_quotas.sql")),
    (8, include_str!("../../migrations/0008_device_log.sql")),
    (
        9,
        include_str!("../../migrations/0009_key_packages_per_device.sql"),
    ),
    (
        10,
        include_str!("../../migrations/0010_commit_hash_age.sql"),
    ),
    (
        11,
        include_str!("../../migrations/0011_mailboxes_per_device.sql"),
    ),
    (12, include_str!("../../migrations/0012_wipe_command.sql")),
    (
        13,
        include_str!("../../migrations/0013_key_packages_per_suite.sql"),
    ),
    (
        14,
        include_str!("../../migrations/0014_no_sender_of_group_traffic.sql"),
    ),
    (
        15,
        include_str!("../../migrations/0015_declined_requests.sql"),
    ),
    (
        16,
        include_str!("../../migrations/0016_anonymous_sending.sql"),
    ),
    (17, include_str!("../../migrations/0017_blobs.sql")),
    (
        18,
        include_str!("../../migrations/0018_mailbox_full_notices.sql"),
    ),
];

/// Most writes committed together by one fsync.
const MAX_GROUP_COMMIT: usize = 1024;

/// One write, run inside the group's transaction. It returns what to do
/// once the transaction's fate is known: hand its result to the caller if
/// the commit succeeded, or the commit's error if it did not.
type Job = Box<dyn FnOnce(&Tx<'_>) -> Completion + Send>;
type Completion = Box<dyn FnOnce(Result<()>) + Send>;

/// What the writer thread is sent.
enum Work {
    Job(Job),
    /// Copies were staged outside the writer and their sweep is due before
    /// it planned to look: look again.
    Wake,
}

/// Server storage in one SQLite database file.
///
/// Writes are group-committed: a dedicated thread takes every write queued
/// while the previous commit was syncing, runs each in its own savepoint
/// inside one transaction, commits once (one fsync for the lot), and only
/// then answers each caller. So a caller is told "done" only when its write
/// is durable, and a thousand concurrent senders cost one fsync, not a
/// thousand. A write that fails rolls back to its savepoint without
/// touching the others.
///
/// Fan-out copies take a shortcut (see the `staging` module): their rows
/// wait in memory for [`crate::ACK_WINDOW`], so a copy its recipient
/// acknowledges in time is never written at all. Their check (membership,
/// the sender's line) and IDs need no write either: when the writer has
/// what they need in memory ([`Checked`]) and no open batch is using it, a
/// fan-out is checked and staged on the caller's thread without waiting
/// for it.
#[derive(Clone)]
pub struct SqliteStore {
    /// Reads: a second connection to a database file (WAL lets it read
    /// while the writer commits), the writer thread's own for an in-memory
    /// one.
    reader: Arc<Mutex<Connection>>,
    /// One turn at the reader: a read waits for it as a task, before it
    /// takes a blocking thread, so concurrent reads (a reconnect storm's
    /// mailbox reads) queue here instead of each holding a thread blocked
    /// on the connection's lock.
    read_turn: Arc<tokio::sync::Semaphore>,
    writes: std::sync::mpsc::Sender<Work>,
    staging: Arc<Mutex<Staging>>,
    /// Held (for writing) by the writer from just before a commit until
    /// that commit's copies are staged, and (for reading) by a mailbox
    /// read: so a read never sees a committed delivery without the staged
    /// copies that took lower IDs in the same commit.
    visible: Arc<RwLock<()>>,
    /// What the writer knows that lets a fan-out skip it.
    checked: Arc<Mutex<Checked>>,
    /// Where blobs' bytes are: files beside the database (in memory for
    /// an in-memory store).
    blobs: Arc<blobs::BlobFiles>,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding a lock would poison it; the data is still
    // consistent (SQLite rolls back an open transaction, and the staging
    // map is changed in single steps), so carry on with it.
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SqliteStore")
    }
}

/// A backend error as the store reports it: a full disk (or database at
/// its configured size) is [`StoreError::Full`], so callers can say so.
fn backend<E: std::fmt::Display + 'static>(error: E) -> StoreError {
    let sqlite = (&error as &dyn std::any::Any).downcast_ref::<rusqlite::Error>();
    if sqlite.and_then(rusqlite::Error::sqlite_error_code) == Some(rusqlite::ErrorCode::DiskFull) {
        return StoreError::Full;
    }
    StoreError::Backend(error.to_string())
}

impl SqliteStore {
    /// Opens (creating if needed) the database at `path` and migrates it.
    pub fn open(path: &Path) -> Result<Self> {
        Self::open_limited(path, StoreLimits::default())
    }

    /// Writes a consistent copy of the database at `source` to
    /// `destination` (a file that must not exist yet) while the server
    /// goes on reading and writing it: SQLite's `VACUUM INTO`, which reads
    /// the whole database in one read transaction (the WAL lets writers go
    /// on meanwhile) and writes a compacted copy. The copy is checked with
    /// `PRAGMA integrity_check` before this returns.
    pub fn backup(source: &Path, destination: &Path) -> Result<()> {
        // Readable by its owner only, like the database (VACUUM INTO
        // writes into an empty file it is given).
        let mut create = std::fs::OpenOptions::new();
        create.write(true).create_new(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut create, 0o600);
        create
            .open(destination)
            .map_err(|e| StoreError::Backend(format!("creating the backup: {e}")))?;
        let destination = destination
            .to_str()
            .ok_or_else(|| StoreError::Backend("the backup path is not UTF-8".into()))?;
        let connection = Connection::open_with_flags(
            source,
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(backend)?;
        connection
            .busy_timeout(std::time::Duration::from_secs(30))
            .map_err(backend)?;
        connection
            .execute("VACUUM INTO ?1", [destination])
            .map_err(backend)?;
        let copy = Connection::open_with_flags(
            destination,
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(backend)?;
        let verdict: String = copy
            .query_row("PRAGMA integrity_check", [], |row| row.get(0))
            .map_err(backend)?;
        if verdict != "ok" {
            return Err(StoreError::Corrupt(format!(
                "the backup fails SQLite's integrity check: {verdict}"
            )));
        }
        Ok(())
    }

    /// The IDs of the blobs a database (a backup, say) holds rows of:
    /// their bytes are the files of the same names under `blobs/` beside
    /// it.
    pub fn blob_ids(database: &Path) -> Result<Vec<umbra_proto::BlobId>> {
        let connection = Connection::open_with_flags(
            database,
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(backend)?;
        let mut statement = connection
            .prepare("SELECT blob_id FROM blobs")
            .map_err(backend)?;
        let ids = statement
            .query_map([], |row| row.get::<_, Vec<u8>>(0))
            .map_err(backend)?
            .map(|id| {
                let id = id.map_err(backend)?;
                umbra_proto::BlobId::from_slice(&id)
                    .map_err(|_| StoreError::Corrupt("a blob's ID".into()))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(ids)
    }

    /// Like [`SqliteStore::open`], within `limits`.
    pub fn open_limited(path: &Path, limits: StoreLimits) -> Result<Self> {
        let max_bytes = limits.database_bytes;
        let writer = Connection::open(path).map_err(backend)?;
        if max_bytes > 0 {
            let page_size: u64 = writer
                .query_row("PRAGMA page_size", [], |row| row.get(0))
                .map_err(backend)?;
            let pages = (max_bytes / page_size.max(1)).max(1);
            writer
                .query_row(&format!("PRAGMA max_page_count = {pages}"), [], |_| Ok(()))
                .map_err(backend)?;
        }
        let store = Self::setup(writer, limits)?;
        let reader = Connection::open(path).map_err(backend)?;
        reader
            .execute_batch("PRAGMA busy_timeout = 5000; PRAGMA foreign_keys = ON;")
            .map_err(backend)?;
        let blobs = blobs::BlobFiles::beside(path)?;
        Ok(SqliteStore {
            reader: Arc::new(Mutex::new(reader)),
            blobs: Arc::new(blobs),
            ..store
        })
    }

    /// A private in-memory database, for tests.
    pub fn open_in_memory() -> Result<Self> {
        Self::open_in_memory_limited(StoreLimits::default())
    }

    /// A private in-memory database within `limits`, for tests.
    pub fn open_in_memory_limited(limits: StoreLimits) -> Result<Self> {
        Self::setup(Connection::open_in_memory().map_err(backend)?, limits)
    }

    fn setup(mut connection: Connection, limits: StoreLimits) -> Result<Self> {
        // secure_delete: what is deleted (a delivered message, a handed-out
        // KeyPackage) is overwritten with zeros in the file, not left in
        // free space for whoever reads the disk later.
        connection
            .execute_batch(
                "PRAGMA secure_delete = ON;
                 PRAGMA busy_timeout = 5000;
                 PRAGMA journal_mode = WAL;
                 PRAGMA synchronous = FULL;
                 PRAGMA foreign_keys = ON;",
            )
            .map_err(backend)?;
        // Migrate under the write lock, so that two processes opening a new
        // database at once (the server and an admin command) do not both
        // apply the same migration.
        let tx = connection
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
            .map_err(backend)?;
        let applied: u32 = tx
            .query_row("PRAGMA user_version", [], |row| row.get(0))
            .map_err(backend)?;
        crate::refuse_newer_schema(
            i64::from(applied),
            MIGRATIONS.last().map_or(0, |(v, _)| i64::from(*v)),
        )?;
        for (version, sql) in MIGRATIONS.iter().filter(|(v, _)| *v > applied) {
            tx.execute_batch(sql).map_err(backend)?;
            if *version == 11 {
                devices::fill_in_devices(&tx)?;
            }
            tx.pragma_update(None, "user_version", version)
                .map_err(backend)?;
        }
        tx.commit().map_err(backend)?;
        let connection = Arc::new(Mutex::new(connection));
        let staging = Arc::new(Mutex::new(Staging::default()));
        let (writes, queue) = std::sync::mpsc::channel();
        let writer = Arc::clone(&connection);
        let staged = Arc::clone(&staging);
        let visible = Arc::new(RwLock::new(()));
        let gate = Arc::clone(&visible);
        let checked = Arc::new(Mutex::new(Checked::default()));
        let known = Arc::clone(&checked);
        std::thread::Builder::new()
            .name("umbra-store-writer".into())
            .spawn(move || {
                let mailboxes = RefCell::new(MailboxBytes::new(limits.mailbox_bytes));
                let writer = Writer {
                    connection: &writer,
                    staging: &staged,
                    visible: &gate,
                    checked: &known,
                    mailboxes: &mailboxes,
                };
                group_commit(writer, &queue)
            })
            .map_err(backend)?;
        Ok(SqliteStore {
            reader: connection,
            read_turn: Arc::new(tokio::sync::Semaphore::new(1)),
            writes,
            staging,
            visible,
            checked,
            blobs: Arc::new(blobs::BlobFiles::in_memory()),
        })
    }

    async fn run<T, F>(&self, work: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> Result<T> + Send + 'static,
    {
        let connection = Arc::clone(&self.reader);
        let failed =
            |e: &dyn std::fmt::Display| StoreError::Backend(format!("storage task failed: {e}"));
        // Held until the read is done, even if its caller stops waiting.
        let turn = Arc::clone(&self.read_turn)
            .acquire_owned()
            .await
            .map_err(|e| failed(&e))?;
        tokio::task::spawn_blocking(move || {
            let _turn = turn;
            work(&mut lock(&connection))
        })
        .await
        .map_err(|e| failed(&e))?
    }

    /// Runs `work` atomically (in its own savepoint) within the next group
    /// commit, and returns its result once that commit is durable.
    async fn write<T, F>(&self, work: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Tx<'_>) -> Result<T> + Send + 'static,
    {
        self.write_then(work, |value| value).await
    }

    /// Like [`SqliteStore::write`], and then, on the writer thread once the
    /// commit is durable (so before any later write runs), turns the
    /// result into the answer with `committed`.
    async fn write_then<T, U, F, C>(&self, work: F, committed: C) -> Result<U>
    where
        T: Send + 'static,
        U: Send + 'static,
        F: FnOnce(&Tx<'_>) -> Result<T> + Send + 'static,
        C: FnOnce(T) -> U + Send + 'static,
    {
        let (answer, answered) = tokio::sync::oneshot::channel();
        let job: Job = Box::new(move |tx| {
            let value = in_savepoint(tx, work);
            Box::new(move |outcome| {
                let _ = answer.send(match outcome {
                    Ok(()) => value.map(committed),
                    Err(error) => Err(error),
                });
            })
        });
        self.writes
            .send(Work::Job(job))
            .map_err(|_| StoreError::Backend("the storage writer stopped".into()))?;
        answered.await.map_err(|_| {
            StoreError::Backend("the write could not be run (see the server log)".into())
        })?
    }
}

/// Runs `work` between SAVEPOINT and RELEASE, rolling back to the savepoint
/// if it fails, so one failed write leaves the rest of its group intact.
fn in_savepoint<T>(tx: &Tx<'_>, work: impl FnOnce(&Tx<'_>) -> Result<T>) -> Result<T> {
    let run = |sql: &str| {
        tx.prepare_cached(sql)
            .and_then(|mut s| s.execute([]))
            .map_err(backend)
    };
    run("SAVEPOINT job")?;
    let reservations = lock(tx.checked).ids.reservations;
    let value = work(tx);
    if value.is_ok() {
        run("RELEASE job")?;
    } else {
        if let Err(error) = &value {
            tx.failure.replace(Some(error.clone()));
        }
        // After a disk-full or I/O error SQLite may have rolled the whole
        // transaction back, savepoint included: the batch notices (see
        // `run_batch`); this write failed either way.
        if run("ROLLBACK TO job").is_ok() {
            run("RELEASE job")?;
        }
        // What the failed write changed is undone: forget what it read,
        // and the mailbox sizes it counted as it went.
        tx.mailboxes.borrow_mut().forget_all();
        let mut checked = lock(tx.checked);
        checked.forget_all();
        if checked.ids.reservations != reservations {
            // The block reserved in the rolled-back savepoint is not
            // reserved any more.
            checked.ids.forget();
        }
    }
    value
}

/// A group commit's transaction, and what the writer knows beside it.
struct Tx<'c> {
    tx: Transaction<'c>,
    checked: &'c Mutex<Checked>,
    /// Mailbox sizes, for the per-device cap (the writer's alone).
    mailboxes: &'c RefCell<MailboxBytes>,
    /// The error of the batch's last failed write.
    failure: std::cell::RefCell<Option<StoreError>>,
}

/// What a fan-out's check needs, as the writer last read it: group
/// memberships, senders' lines, and delivery IDs reserved and not handed
/// out. The writer keeps it; [`SqliteStore::fan_out`] uses it to check and
/// stage a fan-out on the caller's thread, without a round trip through
/// the writer, when everything it needs is here and no open batch is
/// using it.
///
/// Outside an open batch, an entry is what the committed database holds:
/// only the writer changes memberships and lines, and every change forgets
/// the entry; a failed write or commit forgets everything. The exception
/// is another process's commit (an admin command), which the writer
/// notices through `PRAGMA data_version` at its next batch, at most
/// [`EXTERNAL_CHECK`] later, and then forgets everything.
#[derive(Default)]
struct Checked {
    /// Each group's epoch and member devices (the leaves of current
    /// devices: those a fan-out goes to).
    members: HashMap<GroupId, Group>,
    lines: HashMap<AccountId, Line>,
    ids: IdBlock,
    /// The writer's open batch has used this (see [`Tx::checked`]), from
    /// then until its copies are staged: entries it read may still roll
    /// back, and IDs it took are not in the mailbox yet (a fan-out staged
    /// now could make a higher ID visible before them). Fan-outs go
    /// through the writer meanwhile.
    writing: bool,
    /// The database's `data_version` when the writer last looked.
    data_version: Option<i64>,
}

/// A group as a fan-out checks it: its epoch and the leaves it goes to.
type Group = (u64, Arc<[DeviceAddr]>);

/// What decides whether a line may send.
#[derive(Clone, Copy)]
struct Line {
    status: LineStatus,
    subscription_expires_at: Timestamp,
}

/// Entries remembered per map at most; past that the map starts again
/// empty.
const CACHED: usize = 1 << 16;

/// How long the writer goes without checking for another process's
/// commit (an admin command) when it has nothing else to do.
const EXTERNAL_CHECK: Duration = Duration::from_secs(1);

impl Checked {
    fn forget_all(&mut self) {
        self.members.clear();
        self.lines.clear();
    }
}

/// Remembers `value` under `key`, starting the map afresh when it is full.
fn remember<K: std::hash::Hash + Eq, V>(map: &mut HashMap<K, V>, key: K, value: V) {
    if map.len() >= CACHED {
        map.clear();
    }
    map.insert(key, value);
}

impl Tx<'_> {
    /// The shared state, for a job that reads or changes it, or takes IDs:
    /// from now until the batch's copies are staged, fan-outs go through
    /// the writer. (A batch that only writes staged copies and deletes
    /// acknowledged ones never calls this, unless a mailbox at its cap
    /// needs a `MailboxFull` notice, so fan-outs go on meanwhile.)
    fn checked(&self) -> MutexGuard<'_, Checked> {
        let mut checked = lock(self.checked);
        checked.writing = true;
        checked
    }

    /// `group`'s epoch and members, or `None` if there is no such group.
    fn members_of(&self, group: &GroupId) -> Result<Option<Group>> {
        if let Some((epoch, members)) = self.checked().members.get(group) {
            return Ok(Some((*epoch, Arc::clone(members))));
        }
        let epoch: Option<u64> = self
            .prepare_cached("SELECT epoch FROM groups WHERE group_id = ?1")
            .and_then(|mut s| s.query_row([group.as_bytes()], |row| row.get(0)).optional())
            .map_err(backend)?;
        let Some(epoch) = epoch else {
            return Ok(None);
        };
        let members: Arc<[DeviceAddr]> = routable(self, group)?.into();
        remember(
            &mut self.checked().members,
            group.clone(),
            (epoch, Arc::clone(&members)),
        );
        Ok(Some((epoch, members)))
    }

    /// `group`'s membership is about to change.
    fn forget_members(&self, group: &GroupId) {
        self.checked().members.remove(group);
    }

    /// `account`'s line, or `None` if there is no such account.
    fn line(&self, account: &AccountId) -> Result<Option<Line>> {
        if let Some(line) = self.checked().lines.get(account) {
            return Ok(Some(*line));
        }
        let Some(row) = account_row(self, account)? else {
            return Ok(None);
        };
        let line = Line {
            status: row.status,
            subscription_expires_at: row.subscription_expires_at,
        };
        remember(&mut self.checked().lines, account.clone(), line);
        Ok(Some(line))
    }

    /// `account`'s line is about to change.
    fn forget_line(&self, account: &AccountId) {
        self.checked().lines.remove(account);
    }

    /// The first of `count` consecutive delivery IDs.
    fn take_ids(&self, count: usize) -> Result<u64> {
        self.checked().ids.take(self, count)
    }
}

impl<'c> std::ops::Deref for Tx<'c> {
    type Target = Transaction<'c>;
    fn deref(&self) -> &Transaction<'c> {
        &self.tx
    }
}

/// Delivery IDs reserved in the mailbox's AUTOINCREMENT sequence and not
/// handed out yet. Every delivery ID comes from here, so IDs follow the
/// order writes ran in (which is each mailbox's order), and an ID is never
/// used twice, even for a staged copy that was never written: the
/// reservation commits before any ID from it leaves the writer.
/// Reserving a block at a time keeps a batch of staged copies free of
/// writes, so it needs no fsync.
#[derive(Default)]
struct IdBlock {
    next: u64,
    end: u64,
    /// Blocks reserved so far (to notice one inside a failed savepoint).
    reservations: u64,
}

/// Delivery IDs reserved at a time; a restart skips what was left.
const ID_BLOCK: u64 = 1 << 16;

impl IdBlock {
    /// The first of `count` consecutive IDs.
    fn take(&mut self, tx: &Transaction<'_>, count: usize) -> Result<u64> {
        if let Some(first) = self.take_reserved(count) {
            return Ok(first);
        }
        let size = (count as u64).max(ID_BLOCK);
        let last: i64 = tx
            .prepare_cached(
                "UPDATE sqlite_sequence SET seq = seq + ?1 WHERE name = 'mailbox' RETURNING seq",
            )
            .and_then(|mut s| s.query_row([size as i64], |row| row.get(0)))
            .map_err(backend)?;
        self.end = last as u64 + 1;
        self.next = self.end - size;
        self.reservations += 1;
        self.take_reserved(count)
            .ok_or_else(|| StoreError::Backend("a reserved ID block was too small".into()))
    }

    /// The first of `count` consecutive IDs if the block has them, without
    /// reserving another.
    fn take_reserved(&mut self, count: usize) -> Option<u64> {
        let count = count as u64;
        if self.end - self.next < count {
            return None;
        }
        let first = self.next;
        self.next += count;
        Some(first)
    }

    /// Drops the block (its reservation did not commit).
    fn forget(&mut self) {
        self.next = self.end;
    }
}

/// What the writer thread works with.
#[derive(Clone, Copy)]
struct Writer<'w> {
    connection: &'w Mutex<Connection>,
    staging: &'w Mutex<Staging>,
    visible: &'w RwLock<()>,
    checked: &'w Mutex<Checked>,
    mailboxes: &'w RefCell<MailboxBytes>,
}

/// The writer thread: one transaction and one commit per batch of queued
/// writes, until every [`SqliteStore`] handle is gone. Each batch first
/// writes the staged copies whose sweep is due, then runs the queued
/// writes; when nothing is queued it still wakes for a sweep, and at
/// least every [`EXTERNAL_CHECK`] to notice another process's commit.
fn group_commit(writer: Writer<'_>, queue: &std::sync::mpsc::Receiver<Work>) {
    let Writer {
        staging,
        checked,
        mailboxes,
        ..
    } = writer;
    let mut open = true;
    // Writes a rolled-back batch did not run: first in the next one.
    let mut carried: Vec<Job> = Vec::new();
    while open || !carried.is_empty() {
        let wait = {
            let mut staging = lock(staging);
            let now = Instant::now();
            let wait = staging.next_sweep().map_or(EXTERNAL_CHECK, |at| {
                at.saturating_duration_since(now).min(EXTERNAL_CHECK)
            });
            staging.writer_wakes_at(now + wait);
            wait
        };
        let first = if !carried.is_empty() || !open {
            None
        } else {
            match queue.recv_timeout(wait) {
                Ok(Work::Job(job)) => Some(job),
                Ok(Work::Wake) => continue,
                Err(RecvTimeoutError::Timeout) => None,
                Err(RecvTimeoutError::Disconnected) => {
                    open = false;
                    None
                }
            }
        };
        let mut jobs: Vec<Job> = std::mem::take(&mut carried);
        jobs.extend(first);
        while open && jobs.len() < MAX_GROUP_COMMIT {
            match queue.try_recv() {
                Ok(Work::Job(job)) => jobs.push(job),
                Ok(Work::Wake) => {}
                Err(_) => break,
            }
        }
        let Some((committed, written, failed, completions, visibility)) =
            run_batch(writer, jobs, &mut carried, open)
        else {
            lock(checked).writing = false;
            std::thread::sleep(std::time::Duration::from_millis(10));
            continue;
        };
        if let Err(error) = &committed {
            tracing::warn!(%error, "a group commit failed");
            // A block reserved in this batch was not reserved after all,
            // and what was read in it may be undone.
            let mut checked = lock(checked);
            checked.ids.forget();
            checked.forget_all();
            mailboxes.borrow_mut().forget_all();
        }
        {
            let mut staging = lock(staging);
            let now = Instant::now();
            staging.written(&written, &committed, now);
            for (id, error) in failed {
                staging.written(&[id], &Err(error), now);
            }
        }
        for completion in completions {
            completion(committed.clone());
        }
        // The commit's copies are staged: mailbox reads may look again,
        // and fan-outs may be checked outside the writer.
        lock(checked).writing = false;
        drop(visibility);
    }
}

type Batch<'g> = (
    Result<()>,
    Vec<u64>,
    Vec<(u64, StoreError)>,
    Vec<Completion>,
    RwLockWriteGuard<'g, ()>,
);

/// Runs one batch in one transaction: the staged copies whose sweep is
/// due, then `jobs`. Returns the commit's outcome, the copies written and
/// failed, and each job's completion; `None` if no transaction could be
/// begun (nothing ran; dropping the jobs fails each caller's write, and
/// staged copies stay staged for the next attempt).
fn run_batch<'g>(
    writer: Writer<'g>,
    jobs: Vec<Job>,
    carried: &mut Vec<Job>,
    open: bool,
) -> Option<Batch<'g>> {
    let Writer {
        connection,
        staging,
        visible,
        checked,
        mailboxes,
    } = writer;
    let mut guard = lock(connection);
    let tx = match guard.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate) {
        Ok(tx) => Tx {
            tx,
            checked,
            mailboxes,
            failure: std::cell::RefCell::new(None),
        },
        Err(error) => {
            tracing::warn!(%error, "cannot begin a write transaction");
            return None;
        }
    };
    // Another process (an admin command) committed since the last batch:
    // what the writer remembers may be stale.
    let version = tx
        .query_row("PRAGMA data_version", [], |row| row.get::<_, i64>(0))
        .ok();
    {
        let mut checked = lock(checked);
        if version.is_none() || checked.data_version != version {
            checked.forget_all();
            mailboxes.borrow_mut().forget_all();
            checked.data_version = version;
        }
    }
    // Copies first, so that an acknowledgement queued meanwhile (which
    // found its copy being written, and so went to the database) runs
    // after the insert it deletes.
    // Taken under the staging lock, inserted without it: connections
    // stage, acknowledge and read meanwhile.
    let due = {
        let mut staging = lock(staging);
        if open {
            staging.sweep(Instant::now())
        } else {
            staging.take_all()
        }
    };
    let (written, failed) = write_staged(&tx, due);
    if let Some((_, error)) = failed.first() {
        tx.failure.replace(Some(error.clone()));
    }
    // SQLite may roll the whole transaction back on its own (SQLITE_FULL,
    // IOERR, NOMEM, some BUSY cases), savepoints and all. A write run after
    // that would run outside the batch, committed by its own RELEASE while
    // the batch's COMMIT fails: so none is run, and the rest wait for the
    // next batch, while every write already run here shares the batch's
    // true outcome (nothing of it was written).
    let mut completions: Vec<Completion> = Vec::with_capacity(jobs.len());
    let mut jobs = jobs.into_iter();
    for job in jobs.by_ref() {
        if tx.tx.is_autocommit() {
            carried.push(job);
            break;
        }
        completions.push(job(&tx));
    }
    carried.extend(jobs);
    // Taken after the connection (as mailbox reads do), before the commit
    // makes anything visible; released once the completions have staged.
    let visibility = visible.write().unwrap_or_else(|p| p.into_inner());
    let committed = if tx.tx.is_autocommit() {
        let cause = tx.failure.take();
        tracing::warn!(?cause, "SQLite rolled back a group commit's transaction");
        Err(match cause {
            Some(StoreError::Full) => StoreError::Full,
            _ => StoreError::Backend(
                "the database rolled the write back (I/O error); nothing of it was written".into(),
            ),
        })
    } else {
        tx.tx.commit().map_err(backend)
    };
    Some((committed, written, failed, completions, visibility))
}

/// Inserts the staged copies `due` inside the batch's transaction; returns
/// the IDs settled and those that failed (which fail their sender's write,
/// like a failed commit would).
///
/// An application message for a mailbox already at its cap is settled
/// without being written: the mailbox's device is told how many it missed
/// by one `MailboxFull` notice (which replaces the one before it, adding
/// its count), and the sender is not told (that would say how long the
/// recipient has been away). Handshake messages, notices and contact
/// requests are always kept, past the cap: without them a device could not
/// follow its groups.
fn write_staged(tx: &Tx<'_>, due: Vec<DueCopy>) -> (Vec<u64>, Vec<(u64, StoreError)>) {
    let mut written = Vec::with_capacity(due.len());
    let mut failed = Vec::new();
    let mut rolled_back: Option<StoreError> = None;
    let mut dropped: HashMap<DeviceAddr, (u64, Timestamp, Timestamp)> = HashMap::new();
    for copy in due {
        let id = copy.delivery.id;
        // After SQLite rolled the transaction back by itself, an insert
        // would run outside it (and be committed at once while its sender
        // is told the batch failed): the rest fail with the batch instead.
        if let Some(error) = &rolled_back {
            failed.push((id, error.clone()));
            continue;
        }
        let size = copy.delivery.payload.len() as u64;
        let capped = copy.delivery.kind == DeliveryKind::Application;
        let outcome = if capped {
            tx.mailboxes
                .borrow_mut()
                .has_room(tx, &copy.recipient, size)
        } else {
            Ok(true)
        };
        let outcome = outcome.and_then(|room| {
            if room {
                insert_staged(tx, &copy)?;
                tx.mailboxes.borrow_mut().grew(&copy.recipient, size);
            } else {
                // The notice lives as long as the longest-lived copy it counts.
                let entry = dropped.entry(copy.recipient.clone()).or_default();
                *entry = (
                    entry.0 + 1,
                    copy.delivery.sent_at,
                    entry.2.max(copy.expires_at),
                );
            }
            Ok(())
        });
        match outcome {
            Ok(()) => written.push(id),
            Err(error) => {
                tracing::warn!(%error, "writing a staged copy failed");
                if tx.is_autocommit() {
                    rolled_back = Some(error.clone());
                }
                failed.push((id, error));
            }
        }
    }
    if rolled_back.is_none() {
        for (recipient, (count, now, expires_at)) in dropped {
            let noted = in_savepoint(tx, |tx| {
                note_mailbox_full(tx, &recipient, count, now, expires_at)
            });
            if let Err(error) = noted {
                // The copies were not kept either way; the notice waiting
                // (if any) stays as it was, without this count.
                tracing::warn!(%error, "noting a full mailbox failed");
            }
        }
    }
    (written, failed)
}

/// Tells `recipient`'s device that `count` more messages were not kept
/// because its mailbox was full: one notice carrying the total since the
/// device last acknowledged one (a big-endian u64), under a new ID so that
/// a device which already read the previous one reads this one too. It
/// lives as long as the longest-lived copy it counts, so a short-lived
/// message dropped later cannot make it expire early. Run in its own
/// savepoint: the old notice is replaced or kept, never just lost.
fn note_mailbox_full(
    tx: &Tx<'_>,
    recipient: &DeviceAddr,
    count: u64,
    now: Timestamp,
    expires_at: Timestamp,
) -> Result<()> {
    let earlier: Option<(Vec<u8>, Timestamp)> = tx
        .query_row(
            DELETE_FULL_NOTICE,
            params![recipient.account.as_str(), recipient.device.0],
            |row| Ok((row.get(0)?, row.get(1)?)),
        )
        .optional()
        .map_err(backend)?;
    let (earlier, expires_at) = match earlier {
        Some((payload, until)) => {
            tx.mailboxes
                .borrow_mut()
                .shrank(recipient, payload.len() as u64);
            let count = <[u8; 8]>::try_from(payload.as_slice()).map_or(0, u64::from_be_bytes);
            (count, until.max(expires_at))
        }
        None => (0, expires_at),
    };
    let total = earlier.saturating_add(count);
    enqueue(
        tx,
        recipient,
        Some(&recipient.account),
        DeliveryKind::MailboxFull,
        None,
        &total.to_be_bytes(),
        now,
        expires_at,
    )
    .map(drop)
}

/// Deletes a device's `MailboxFull` notice, returning it, through the
/// partial index `mailbox_full_notices`. The kind is written out as the
/// index names it (as the PostgreSQL store must: its generic plans use a
/// partial index only then), so the plan cannot depend on a binding.
const DELETE_FULL_NOTICE: &str = "DELETE FROM mailbox WHERE recipient = ?1 AND device = ?2
                                  AND kind = 10 RETURNING payload, expires_at";
const _: () = assert!(DeliveryKind::MailboxFull as i32 == 10);

fn insert_staged(tx: &Transaction<'_>, row: &DueCopy) -> Result<()> {
    let delivery = &row.delivery;
    insert_row(
        tx,
        delivery.id,
        &row.recipient,
        delivery.sender.as_ref(),
        delivery.kind,
        delivery.group_id.as_ref(),
        &delivery.payload,
        delivery.sent_at,
        row.expires_at,
    )
}

/// The mailbox's one INSERT: a delivery row under a given ID. A delivery
/// without a sender (what members send a group) keeps the empty string
/// in its place.
#[allow(clippy::too_many_arguments)] // one row of the mailbox table, named field by field
fn insert_row(
    tx: &Transaction<'_>,
    id: u64,
    recipient: &DeviceAddr,
    sender: Option<&AccountId>,
    kind: DeliveryKind,
    group: Option<&GroupId>,
    payload: &[u8],
    sent_at: Timestamp,
    expires_at: Timestamp,
) -> Result<()> {
    tx.prepare_cached(
        "INSERT INTO mailbox (id, recipient, device, sender, kind, group_id, payload, sent_at,
                              expires_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
    )
    .and_then(|mut statement| {
        statement.execute(params![
            id,
            recipient.account.as_str(),
            recipient.device.0,
            sender.map_or("", AccountId::as_str),
            kind as i32,
            group.map(GroupId::as_bytes),
            payload,
            sent_at,
            expires_at
        ])
    })
    .map(drop)
    .map_err(backend)
}

fn account_id(text: String) -> Result<AccountId> {
    AccountId::parse(&text).map_err(|e| StoreError::Corrupt(e.to_string()))
}

/// Stores one delivery, with the next delivery ID, and returns that ID.
#[allow(clippy::too_many_arguments)] // one row of the mailbox table, named field by field
fn enqueue(
    tx: &Tx<'_>,
    recipient: &DeviceAddr,
    sender: Option<&AccountId>,
    kind: DeliveryKind,
    group: Option<&GroupId>,
    payload: &[u8],
    now: Timestamp,
    expires_at: Timestamp,
) -> Result<u64> {
    let id = tx.take_ids(1)?;
    insert_row(
        tx, id, recipient, sender, kind, group, payload, now, expires_at,
    )?;
    tx.mailboxes
        .borrow_mut()
        .grew(recipient, payload.len() as u64);
    Ok(id)
}

/// Stores one delivery for each current device of `recipient`, with
/// consecutive delivery IDs; returns the devices.
#[allow(clippy::too_many_arguments)] // one row of the mailbox table, named field by field
fn enqueue_for_account(
    tx: &Tx<'_>,
    recipient: &AccountId,
    sender: &AccountId,
    kind: DeliveryKind,
    group: Option<&GroupId>,
    payload: &[u8],
    now: Timestamp,
    expires_at: Timestamp,
) -> Result<Vec<DeviceAddr>> {
    let devices = devices::current(tx, recipient)?;
    for device in &devices {
        enqueue(
            tx,
            device,
            Some(sender),
            kind,
            group,
            payload,
            now,
            expires_at,
        )?;
    }
    Ok(devices)
}

/// Every leaf of the group: each member device, ordered by account and
/// device.
fn members(tx: &Connection, group: &GroupId) -> Result<Vec<DeviceAddr>> {
    leaves(
        tx,
        group,
        "SELECT account_id, device FROM group_members WHERE group_id = ?1
         ORDER BY account_id, device",
    )
}

/// The leaves a delivery to the group goes to: those of devices still
/// current in their account (a removed device's leaf stays in the tree
/// until a member commits its removal, but gets nothing meanwhile).
fn routable(tx: &Connection, group: &GroupId) -> Result<Vec<DeviceAddr>> {
    leaves(
        tx,
        group,
        "SELECT m.account_id, m.device FROM group_members m
         JOIN devices d ON d.account_id = m.account_id AND d.device = m.device
         WHERE m.group_id = ?1 ORDER BY m.account_id, m.device",
    )
}

fn leaves(tx: &Connection, group: &GroupId, sql: &str) -> Result<Vec<DeviceAddr>> {
    let mut statement = tx.prepare_cached(sql).map_err(backend)?;
    let rows = statement
        .query_map([group.as_bytes()], |row| {
            Ok((row.get::<_, String>(0)?, row.get::<_, u32>(1)?))
        })
        .map_err(backend)?;
    rows.map(|row| {
        let (account, device) = row.map_err(backend)?;
        Ok(DeviceAddr::new(account_id(account)?, DeviceId(device)))
    })
    .collect()
}

/// The group's current epoch, if the group exists.
fn group_epoch(tx: &Connection, group: &GroupId) -> Result<Option<u64>> {
    tx.query_row(
        "SELECT epoch FROM groups WHERE group_id = ?1",
        [group.as_bytes()],
        |row| row.get(0),
    )
    .optional()
    .map_err(backend)
}

fn is_member(tx: &Connection, group: &GroupId, leaf: &DeviceAddr) -> Result<bool> {
    tx.prepare_cached(
        "SELECT 1 FROM group_members WHERE group_id = ?1 AND account_id = ?2 AND device = ?3",
    )
    .and_then(|mut s| {
        s.exists(params![
            group.as_bytes(),
            leaf.account.as_str(),
            leaf.device.0
        ])
    })
    .map_err(backend)
}

#[async_trait]
impl Accounts for SqliteStore {
    async fn issue_codes(&self, codes: &[CodeHash], days: u32, now: Timestamp) -> Result<()> {
        let codes = codes.to_vec();
        self.write(move |tx| {
            let mut insert = tx
                .prepare(
                    "INSERT INTO activation_codes (code_hash, days, issued_at) VALUES (?1, ?2, ?3)",
                )
                .map_err(backend)?;
            for code in codes {
                insert
                    .execute(params![&code.0[..], days, now])
                    .map_err(backend)?;
            }
            Ok(())
        })
        .await
    }

    async fn register(
        &self,
        code: CodeHash,
        id: &AccountId,
        identity_key: &IdentityKey,
        now: Timestamp,
    ) -> Result<Registration> {
        let (id, identity_key) = (id.clone(), *identity_key);
        self.write(move |tx| {
            let row: Option<(u32, Option<String>, Option<u64>)> = tx
                .query_row(
                    "SELECT days, used_by, distributor_id FROM activation_codes
                     WHERE code_hash = ?1 AND kind = 'activation'",
                    [&code.0[..]],
                    |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)),
                )
                .optional()
                .map_err(backend)?;
            let (days, distributor) = match row {
                None => return Ok(Registration::UnknownCode),
                Some((_, Some(_), _)) => return Ok(Registration::CodeUsed),
                Some((days, None, distributor)) => (days, distributor),
            };
            let exists = |sql: &str, value: &dyn rusqlite::ToSql| {
                tx.prepare(sql)
                    .and_then(|mut s| s.exists([value]))
                    .map_err(backend)
            };
            if exists("SELECT 1 FROM accounts WHERE account_id = ?1", &id.as_str())? {
                return Ok(Registration::IdTaken);
            }
            if exists(
                "SELECT 1 FROM accounts WHERE identity_key = ?1",
                &&identity_key.as_bytes()[..],
            )? {
                return Ok(Registration::KeyTaken);
            }
            let expires = now + u64::from(days) * DAY;
            tx.forget_line(&id);
            tx.execute(
                "INSERT INTO accounts (account_id, identity_key, created_at, subscription_expires_at, distributor_id)
                 VALUES (?1, ?2, ?3, ?4, ?5)",
                params![id.as_str(), &identity_key.as_bytes()[..], now, expires, distributor],
            )
            .map_err(backend)?;
            tx.execute(
                "UPDATE activation_codes SET used_by = ?1, used_at = ?2 WHERE code_hash = ?3",
                params![id.as_str(), now, &code.0[..]],
            )
            .map_err(backend)?;
            devices::add(tx, &id, DeviceId::FIRST, &identity_key)?;
            Ok(Registration::Registered(Account {
                id,
                identity_key,
                created_at: now,
                subscription_expires_at: expires,
                wipe_key: None,
                status: LineStatus::Active,
                distributor,
                last_seen_day: None,
                last_wipe_command: None,
            }))
        })
        .await
    }

    async fn account(&self, id: &AccountId) -> Result<Option<Account>> {
        let id = id.clone();
        self.run(move |connection| account_row(connection, &id))
            .await
    }

    async fn set_wipe_key(&self, id: &AccountId, key: &IdentityKey) -> Result<()> {
        let (id, key) = (id.clone(), *key);
        self.write(move |tx| {
            tx.execute(
                "UPDATE accounts SET wipe_key = ?2 WHERE account_id = ?1 AND wipe_key IS NULL",
                params![id.as_str(), &key.as_bytes()[..]],
            )
            .map_err(backend)?;
            Ok(())
        })
        .await
    }

    async fn queue_wipe_command(
        &self,
        notice: Notice,
        issued_at: u64,
        now: Timestamp,
        expires_at: Timestamp,
    ) -> Result<Option<Vec<DeviceAddr>>> {
        self.write(move |tx| {
            let Ok(issued_at) = i64::try_from(issued_at) else {
                return Ok(None);
            };
            let newer = tx
                .execute(
                    "UPDATE accounts SET last_wipe_issued_at = ?2, last_wipe_command = ?3
                     WHERE account_id = ?1
                       AND (last_wipe_issued_at IS NULL OR last_wipe_issued_at < ?2)",
                    params![notice.recipient.as_str(), issued_at, &notice.payload],
                )
                .map_err(backend)?;
            if newer != 1 {
                return Ok(None);
            }
            // One waiting command is enough, and they never expire: the
            // newer replaces any still waiting, so they cannot pile up.
            tx.execute(
                "DELETE FROM mailbox WHERE recipient = ?1 AND kind = ?2",
                params![notice.recipient.as_str(), notice.kind as i32],
            )
            .map_err(backend)?;
            tx.mailboxes.borrow_mut().forget_account(&notice.recipient);
            enqueue_for_account(
                tx,
                &notice.recipient,
                &notice.sender,
                notice.kind,
                notice.group_id.as_ref(),
                &notice.payload,
                now,
                expires_at,
            )
            .map(Some)
        })
        .await
    }

    async fn touch(&self, id: &AccountId, day: u64) -> Result<()> {
        let id = id.clone();
        self.write(move |tx| {
            tx.execute(
                "UPDATE accounts SET last_seen_day = ?2 WHERE account_id = ?1",
                params![id.as_str(), day],
            )
            .map_err(backend)?;
            Ok(())
        })
        .await
    }

    async fn revoke(
        &self,
        id: &AccountId,
        proof: Option<&umbra_proto::Signature>,
        now: Timestamp,
        expires_at: Timestamp,
    ) -> Result<Vec<DeviceAddr>> {
        let id = id.clone();
        let mut notice = id.as_str().as_bytes().to_vec();
        if let Some(proof) = proof {
            notice.extend_from_slice(proof.as_bytes());
        }
        let staging = Arc::clone(&self.staging);
        let revoked = id.clone();
        self.write_then(
            move |tx| revoke_in(tx, &id, &notice, now, expires_at),
            move |told| {
                lock(&staging).drop_recipient(&revoked, None);
                told
            },
        )
        .await
    }
}

/// Ends a line inside an open transaction (see [`Accounts::revoke`]).
fn revoke_in(
    tx: &Tx<'_>,
    id: &AccountId,
    notice: &[u8],
    now: Timestamp,
    expires_at: Timestamp,
) -> Result<Vec<DeviceAddr>> {
    let groups: Vec<Vec<u8>> = tx
        .prepare("SELECT DISTINCT group_id FROM group_members WHERE account_id = ?1")
        .and_then(|mut s| {
            s.query_map([id.as_str()], |row| row.get(0))?
                .collect::<rusqlite::Result<_>>()
        })
        .map_err(backend)?;
    let mut told = Vec::new();
    for group in groups {
        let group = GroupId::new(group).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        tx.forget_members(&group);
        tx.execute(
            "DELETE FROM group_members WHERE group_id = ?1 AND account_id = ?2",
            params![group.as_bytes(), id.as_str()],
        )
        .map_err(backend)?;
        // The line's devices know the epoch's delivery key: nobody sends
        // anonymously with it once they are out (the members' next commit
        // states a new one).
        tx.execute(
            "UPDATE groups SET delivery_key = NULL WHERE group_id = ?1",
            [group.as_bytes()],
        )
        .map_err(backend)?;
        for member in routable(tx, &group)? {
            enqueue(
                tx,
                &member,
                Some(id),
                DeliveryKind::MemberRevoked,
                Some(&group),
                notice,
                now,
                expires_at,
            )?;
            told.push(member);
        }
    }
    tx.mailboxes.borrow_mut().forget_account(id);
    for sql in [
        "DELETE FROM devices WHERE account_id = ?1",
        "DELETE FROM key_packages WHERE account_id = ?1",
        "DELETE FROM last_resort_key_packages WHERE account_id = ?1",
        "DELETE FROM mailbox WHERE recipient = ?1",
        "DELETE FROM contacts WHERE requester = ?1 OR addressee = ?1",
        "DELETE FROM device_log WHERE account_id = ?1",
        "UPDATE accounts SET status = 'revoked', wipe_key = NULL WHERE account_id = ?1",
    ] {
        tx.forget_line(id);
        tx.execute(sql, [id.as_str()]).map_err(backend)?;
    }
    told.sort();
    told.dedup();
    Ok(told)
}

fn account_row(connection: &Connection, id: &AccountId) -> Result<Option<Account>> {
    type Row = (
        Vec<u8>,
        u64,
        u64,
        Option<Vec<u8>>,
        String,
        Option<u64>,
        Option<u64>,
        Option<Vec<u8>>,
    );
    let row: Option<Row> = connection
        .prepare_cached(
            "SELECT identity_key, created_at, subscription_expires_at, wipe_key, status,
                    distributor_id, last_seen_day, last_wipe_command
             FROM accounts WHERE account_id = ?1",
        )
        .and_then(|mut s| {
            s.query_row([id.as_str()], |row| {
                Ok((
                    row.get(0)?,
                    row.get(1)?,
                    row.get(2)?,
                    row.get(3)?,
                    row.get(4)?,
                    row.get(5)?,
                    row.get(6)?,
                    row.get(7)?,
                ))
            })
            .optional()
        })
        .map_err(backend)?;
    let corrupt = |e: umbra_proto::DecodeError| StoreError::Corrupt(e.to_string());
    row.map(
        |(
            key,
            created_at,
            expires,
            wipe_key,
            status,
            distributor,
            last_seen_day,
            last_wipe_command,
        )| {
            Ok(Account {
                id: id.clone(),
                identity_key: IdentityKey::from_slice(&key).map_err(corrupt)?,
                created_at,
                subscription_expires_at: expires,
                wipe_key: wipe_key
                    .map(|k| IdentityKey::from_slice(&k).map_err(corrupt))
                    .transpose()?,
                status: LineStatus::parse(&status)
                    .ok_or_else(|| StoreError::Corrupt(format!("line status {status:?}")))?,
                distributor,
                last_seen_day,
                last_wipe_command,
            })
        },
    )
    .transpose()
}

/// (accepted?) for the contact row between a and b in either direction,
/// with the requester first.
/// The row between `a` and `b`: its requester, whether accepted, and
/// whether declined.
fn contact_row(
    tx: &Connection,
    a: &AccountId,
    b: &AccountId,
) -> Result<Option<(String, bool, bool)>> {
    tx.prepare_cached(
        "SELECT requester, accepted, declined FROM contacts
         WHERE (requester = ?1 AND addressee = ?2) OR (requester = ?2 AND addressee = ?1)",
    )
    .and_then(|mut s| {
        s.query_row(params![a.as_str(), b.as_str()], |row| {
            Ok((row.get(0)?, row.get::<_, bool>(1)?, row.get::<_, bool>(2)?))
        })
        .optional()
    })
    .map_err(backend)
}

#[async_trait]
impl Contacts for SqliteStore {
    async fn request_contact(
        &self,
        from: &AccountId,
        to: &AccountId,
        now: Timestamp,
        expires_at: Timestamp,
    ) -> Result<(ContactRequestOutcome, Vec<DeviceAddr>)> {
        let (from, to) = (from.clone(), to.clone());
        self.write(move |tx| {
            // Checked again in the writer, in order with revocations: a
            // revoked line's contacts are gone, and none may come after.
            let live: i64 = tx
                .query_row(
                    "SELECT COUNT(*) FROM accounts
                     WHERE account_id IN (?1, ?2) AND status != 'revoked'",
                    params![from.as_str(), to.as_str()],
                    |row| row.get(0),
                )
                .map_err(backend)?;
            if live != if from == to { 1 } else { 2 } {
                return Ok((ContactRequestOutcome::LineGone, Vec::new()));
            }
            match contact_row(tx, &from, &to)? {
                Some((_, true, _)) => {
                    return Ok((ContactRequestOutcome::AlreadyContacts, Vec::new()));
                }
                // Pending, or declined: the same answer, and nothing sent
                // (a declined requester learns nothing, and cannot insist).
                Some((requester, false, _)) if requester == from.as_str() => {
                    return Ok((ContactRequestOutcome::AlreadyRequested, Vec::new()));
                }
                // `from` had declined `to`'s request and now asks itself:
                // the old request goes, this one is sent.
                Some((_, false, true)) => {
                    tx.execute(
                        "DELETE FROM contacts WHERE requester = ?1 AND addressee = ?2",
                        params![to.as_str(), from.as_str()],
                    )
                    .map_err(backend)?;
                }
                // `to` had asked `from` already: the request stands as it is;
                // `from` accepts it with AcceptContact.
                Some(_) => return Ok((ContactRequestOutcome::AlreadyRequested, Vec::new())),
                None => {}
            }
            tx.execute(
                "INSERT INTO contacts (requester, addressee, accepted, created_at) VALUES (?1, ?2, 0, ?3)",
                params![from.as_str(), to.as_str(), now],
            )
            .map_err(backend)?;
            let told = enqueue_for_account(
                tx,
                &to,
                &from,
                DeliveryKind::ContactRequest,
                None,
                &[],
                now,
                expires_at,
            )?;
            Ok((ContactRequestOutcome::Sent, told))
        })
        .await
    }

    async fn accept_contact(
        &self,
        acceptor: &AccountId,
        requester: &AccountId,
        now: Timestamp,
        expires_at: Timestamp,
    ) -> Result<(ContactAcceptOutcome, Vec<DeviceAddr>)> {
        let (acceptor, requester) = (acceptor.clone(), requester.clone());
        self.write(move |tx| {
            match contact_row(tx, &acceptor, &requester)? {
                Some((_, true, _)) => {
                    return Ok((ContactAcceptOutcome::AlreadyContacts, Vec::new()));
                }
                Some((from, false, false)) if from == requester.as_str() => {}
                _ => return Ok((ContactAcceptOutcome::NoRequest, Vec::new())),
            }
            tx.execute(
                "UPDATE contacts SET accepted = 1 WHERE requester = ?1 AND addressee = ?2",
                params![requester.as_str(), acceptor.as_str()],
            )
            .map_err(backend)?;
            let told = enqueue_for_account(
                tx,
                &requester,
                &acceptor,
                DeliveryKind::ContactAccepted,
                None,
                &[],
                now,
                expires_at,
            )?;
            Ok((ContactAcceptOutcome::Accepted, told))
        })
        .await
    }

    async fn contact_requests_since(&self, from: &AccountId, since: Timestamp) -> Result<u64> {
        let from = from.clone();
        self.run(move |connection| {
            connection
                .prepare_cached(
                    "SELECT COUNT(*) FROM contacts WHERE requester = ?1 AND created_at >= ?2",
                )
                .and_then(|mut s| s.query_row(params![from.as_str(), since], |row| row.get(0)))
                .map_err(backend)
        })
        .await
    }

    async fn decline_contact(&self, decliner: &AccountId, requester: &AccountId) -> Result<bool> {
        let (decliner, requester) = (decliner.clone(), requester.clone());
        self.write(move |tx| {
            let declined = tx
                .execute(
                    "UPDATE contacts SET declined = 1
                     WHERE requester = ?1 AND addressee = ?2 AND accepted = 0 AND declined = 0",
                    params![requester.as_str(), decliner.as_str()],
                )
                .map_err(backend)?;
            let waiting = tx
                .execute(
                    "DELETE FROM mailbox WHERE recipient = ?1 AND kind = ?2 AND sender = ?3",
                    params![
                        decliner.as_str(),
                        DeliveryKind::ContactRequest as i32,
                        requester.as_str()
                    ],
                )
                .map_err(backend)?;
            if waiting > 0 {
                tx.mailboxes.borrow_mut().forget_all();
            }
            Ok(declined > 0)
        })
        .await
    }

    async fn are_contacts(&self, a: &AccountId, b: &AccountId) -> Result<bool> {
        let (a, b) = (a.clone(), b.clone());
        self.run(move |connection| {
            Ok(matches!(
                contact_row(connection, &a, &b)?,
                Some((_, true, _))
            ))
        })
        .await
    }
}

fn stock(
    connection: &Connection,
    account: &AccountId,
    device: DeviceId,
    suite: u16,
) -> Result<KeyPackageStock> {
    let device = device.0;
    let one_time: u32 = connection
        .prepare_cached(
            "SELECT COUNT(*) FROM key_packages WHERE account_id = ?1 AND device = ?2 AND suite = ?3",
        )
        .and_then(|mut s| {
            s.query_row(params![account.as_str(), device, suite], |row| row.get(0))
        })
        .map_err(backend)?;
    let has_last_resort = connection
        .prepare_cached(
            "SELECT 1 FROM last_resort_key_packages
             WHERE account_id = ?1 AND device = ?2 AND suite = ?3",
        )
        .and_then(|mut s| s.exists(params![account.as_str(), device, suite]))
        .map_err(backend)?;
    Ok(KeyPackageStock {
        one_time,
        has_last_resort,
    })
}

#[async_trait]
impl KeyPackages for SqliteStore {
    async fn add_key_packages(
        &self,
        account: &AccountId,
        device: DeviceId,
        suite: u16,
        one_time: Vec<Vec<u8>>,
        last_resort: Option<Vec<u8>>,
    ) -> Result<KeyPackageStock> {
        let account = account.clone();
        self.write(move |tx| {
            let mut insert = tx
                .prepare_cached(
                    "INSERT INTO key_packages (account_id, device, suite, key_package)
                     VALUES (?1, ?2, ?3, ?4)",
                )
                .map_err(backend)?;
            for key_package in &one_time {
                insert
                    .execute(params![account.as_str(), device.0, suite, key_package])
                    .map_err(backend)?;
            }
            if let Some(key_package) = &last_resort {
                tx.execute(
                    "INSERT INTO last_resort_key_packages (account_id, device, suite, key_package)
                     VALUES (?1, ?2, ?3, ?4)
                     ON CONFLICT (account_id, device, suite)
                     DO UPDATE SET key_package = excluded.key_package",
                    params![account.as_str(), device.0, suite, key_package],
                )
                .map_err(backend)?;
            }
            stock(tx, &account, device, suite)
        })
        .await
    }

    async fn take_key_package(
        &self,
        account: &AccountId,
        device: DeviceId,
        suite: u16,
    ) -> Result<Option<(Vec<u8>, bool)>> {
        let account = account.clone();
        self.write(move |tx| {
            let one_time: Option<(i64, Vec<u8>)> = tx
                .query_row(
                    "SELECT id, key_package FROM key_packages
                     WHERE account_id = ?1 AND device = ?2 AND suite = ?3
                     ORDER BY id LIMIT 1",
                    params![account.as_str(), device.0, suite],
                    |row| Ok((row.get(0)?, row.get(1)?)),
                )
                .optional()
                .map_err(backend)?;
            if let Some((id, key_package)) = one_time {
                tx.execute("DELETE FROM key_packages WHERE id = ?1", [id])
                    .map_err(backend)?;
                return Ok(Some((key_package, false)));
            }
            let last_resort: Option<Vec<u8>> = tx
                .query_row(
                    "SELECT key_package FROM last_resort_key_packages
                     WHERE account_id = ?1 AND device = ?2 AND suite = ?3",
                    params![account.as_str(), device.0, suite],
                    |row| row.get(0),
                )
                .optional()
                .map_err(backend)?;
            Ok(last_resort.map(|key_package| (key_package, true)))
        })
        .await
    }

    async fn key_package_stock(
        &self,
        account: &AccountId,
        device: DeviceId,
        suite: u16,
    ) -> Result<KeyPackageStock> {
        let account = account.clone();
        self.run(move |connection| stock(connection, &account, device, suite))
            .await
    }

    async fn withdraw_key_packages(&self, account: &AccountId, device: DeviceId) -> Result<u64> {
        let account = account.clone();
        self.write(move |tx| {
            let mut withdrawn = 0;
            for table in ["key_packages", "last_resort_key_packages"] {
                withdrawn += tx
                    .execute(
                        &format!("DELETE FROM {table} WHERE account_id = ?1 AND device = ?2"),
                        params![account.as_str(), device.0],
                    )
                    .map_err(backend)? as u64;
            }
            Ok(withdrawn)
        })
        .await
    }
}

#[async_trait]
impl Groups for SqliteStore {
    async fn create_group(
        &self,
        group: &GroupId,
        creator: &DeviceAddr,
        public_state: &[u8],
        group_info: &[u8],
        delivery_key: Option<&[u8; DELIVERY_KEY_BYTES]>,
        now: Timestamp,
    ) -> Result<bool> {
        let (group, creator) = (group.clone(), creator.clone());
        let (public_state, group_info) = (public_state.to_vec(), group_info.to_vec());
        let delivery_key = delivery_key.map(|key| key.to_vec());
        self.write(move |tx| {
            let inserted = tx
                .execute(
                    "INSERT INTO groups (group_id, epoch, created_at, public_state, group_info, created_by, delivery_key)
                     VALUES (?1, 0, ?2, ?3, ?4, ?5, ?6)
                     ON CONFLICT DO NOTHING",
                    params![
                        group.as_bytes(),
                        now,
                        public_state,
                        group_info,
                        creator.account.as_str(),
                        delivery_key
                    ],
                )
                .map_err(backend)?;
            if inserted == 0 {
                return Ok(false);
            }
            tx.forget_members(&group);
            tx.execute(
                "INSERT INTO group_members (group_id, account_id, device) VALUES (?1, ?2, ?3)",
                params![group.as_bytes(), creator.account.as_str(), creator.device.0],
            )
            .map_err(backend)?;
            Ok(true)
        })
        .await
    }

    async fn group(&self, group: &GroupId) -> Result<Option<GroupState>> {
        let group = group.clone();
        self.run(move |connection| {
            let row: Option<(u64, Option<Vec<u8>>)> = connection
                .query_row(
                    "SELECT epoch, public_state FROM groups WHERE group_id = ?1",
                    [group.as_bytes()],
                    |row| Ok((row.get(0)?, row.get(1)?)),
                )
                .optional()
                .map_err(backend)?;
            row.map(|(epoch, public_state)| {
                let proposals = connection
                    .prepare_cached(
                        "SELECT message FROM group_proposals
                         WHERE group_id = ?1 AND epoch = ?2 ORDER BY seq",
                    )
                    .and_then(|mut statement| {
                        statement
                            .query_map(params![group.as_bytes(), epoch], |row| row.get(0))?
                            .collect::<rusqlite::Result<Vec<Vec<u8>>>>()
                    })
                    .map_err(backend)?;
                Ok(GroupState {
                    epoch,
                    members: members(connection, &group)?,
                    public_state,
                    proposals,
                })
            })
            .transpose()
        })
        .await
    }

    async fn delivery_key(
        &self,
        group: &GroupId,
    ) -> Result<Option<(u64, Option<[u8; DELIVERY_KEY_BYTES]>)>> {
        let group = group.clone();
        self.run(move |connection| {
            let row: Option<(u64, Option<Vec<u8>>)> = connection
                .prepare_cached("SELECT epoch, delivery_key FROM groups WHERE group_id = ?1")
                .and_then(|mut s| {
                    s.query_row([group.as_bytes()], |row| Ok((row.get(0)?, row.get(1)?)))
                        .optional()
                })
                .map_err(backend)?;
            Ok(row.map(|(epoch, key)| (epoch, key.and_then(|key| key.try_into().ok()))))
        })
        .await
    }

    async fn groups_created(&self, creator: &AccountId) -> Result<u64> {
        let creator = creator.clone();
        self.run(move |connection| {
            connection
                .prepare_cached("SELECT COUNT(*) FROM groups WHERE created_by = ?1")
                .and_then(|mut s| s.query_row([creator.as_str()], |row| row.get(0)))
                .map_err(backend)
        })
        .await
    }

    async fn group_info(&self, group: &GroupId) -> Result<Option<Vec<u8>>> {
        let group = group.clone();
        self.run(move |connection| {
            connection
                .query_row(
                    "SELECT group_info FROM groups WHERE group_id = ?1",
                    [group.as_bytes()],
                    |row| row.get(0),
                )
                .optional()
                .map_err(backend)
        })
        .await
    }

    async fn accept_commit(
        &self,
        commit: &CommitRecord,
        now: Timestamp,
        expires_at: Timestamp,
    ) -> Result<CommitOutcome> {
        let commit = commit.clone();
        self.write(move |tx| {
            let Some(epoch) = group_epoch(tx, &commit.group_id)? else {
                return Ok(CommitOutcome::UnknownGroup);
            };
            if i64::try_from(commit.epoch).is_err() {
                // No group ever gets there; SQLite integers stop at i64::MAX.
                return Ok(CommitOutcome::Stale {
                    current_epoch: epoch,
                });
            }
            let hash = commit.hash();
            let accepted: Option<Vec<u8>> = tx
                .query_row(
                    "SELECT hash FROM group_commits WHERE group_id = ?1 AND epoch = ?2",
                    params![commit.group_id.as_bytes(), commit.epoch],
                    |row| row.get(0),
                )
                .optional()
                .map_err(backend)?;
            if accepted.as_deref() == Some(&hash[..]) {
                return Ok(CommitOutcome::Duplicate {
                    epoch: commit.epoch.saturating_add(1),
                });
            }
            if !is_member(tx, &commit.group_id, &commit.sender)? {
                return Ok(CommitOutcome::NotAMember);
            }
            if epoch != commit.epoch {
                return Ok(CommitOutcome::Stale {
                    current_epoch: epoch,
                });
            }
            let before = routable(tx, &commit.group_id)?;
            // Checked again here, where no removal or revocation can come
            // between the check and the leaf's membership.
            for added in &commit.adds {
                if !devices::is_current(tx, added)? {
                    return Ok(CommitOutcome::AddsFormerDevice {
                        device: added.clone(),
                    });
                }
            }
            tx.forget_members(&commit.group_id);
            for leaf in &commit.removed {
                tx.execute(
                    "DELETE FROM group_members WHERE group_id = ?1 AND account_id = ?2 AND device = ?3",
                    params![commit.group_id.as_bytes(), leaf.account.as_str(), leaf.device.0],
                )
                .map_err(backend)?;
            }
            for leaf in &commit.added {
                tx.execute(
                    "INSERT INTO group_members (group_id, account_id, device) VALUES (?1, ?2, ?3)
                     ON CONFLICT DO NOTHING",
                    params![commit.group_id.as_bytes(), leaf.account.as_str(), leaf.device.0],
                )
                .map_err(backend)?;
            }
            tx.execute(
                "UPDATE groups SET epoch = ?1, public_state = ?3, group_info = ?4, delivery_key = ?5
                 WHERE group_id = ?2",
                params![
                    epoch + 1,
                    commit.group_id.as_bytes(),
                    commit.public_state,
                    commit.group_info,
                    commit.delivery_key.map(|key| key.to_vec())
                ],
            )
            .map_err(backend)?;
            tx.execute(
                "DELETE FROM group_proposals WHERE group_id = ?1",
                [commit.group_id.as_bytes()],
            )
            .map_err(backend)?;
            tx.execute(
                "INSERT INTO group_commits (group_id, epoch, hash, committed_at)
                 VALUES (?1, ?2, ?3, ?4)",
                params![commit.group_id.as_bytes(), epoch, &hash[..], now],
            )
            .map_err(backend)?;
            let mut recipients = Vec::new();
            let mut welcomed = 0;
            for member in before.iter().filter(|m| **m != commit.sender) {
                enqueue(
                    tx,
                    member,
                    None,
                    DeliveryKind::Commit,
                    Some(&commit.group_id),
                    &commit.commit,
                    now,
                    expires_at,
                )?;
                recipients.push(member.clone());
            }
            if let Some(welcome) = &commit.welcome {
                for added in commit.added.iter().filter(|a| !before.contains(a)) {
                    // A leaf left in the tree by a line that ended (or a
                    // removed device) gets nothing: no one would read it.
                    if !devices::is_current(tx, added)? {
                        continue;
                    }
                    enqueue(
                        tx,
                        added,
                        None,
                        DeliveryKind::Welcome,
                        Some(&commit.group_id),
                        welcome,
                        now,
                        expires_at,
                    )?;
                    recipients.push(added.clone());
                    welcomed += 1;
                }
            }
            Ok(CommitOutcome::Accepted {
                epoch: epoch + 1,
                recipients,
                welcomed,
            })
        })
        .await
    }

    async fn add_proposal(&self, group: &GroupId, epoch: u64, message: &[u8]) -> Result<bool> {
        let group = group.clone();
        let message = message.to_vec();
        self.write(move |tx| {
            if group_epoch(tx, &group)? != Some(epoch) {
                return Ok(false);
            }
            tx.execute(
                "INSERT INTO group_proposals (group_id, seq, epoch, message)
                 VALUES (?1, (SELECT COALESCE(MAX(seq), 0) + 1 FROM group_proposals
                              WHERE group_id = ?1), ?2, ?3)",
                params![group.as_bytes(), epoch, message],
            )
            .map_err(backend)?;
            Ok(true)
        })
        .await
    }

    async fn fan_out(
        &self,
        group: &GroupId,
        sender: &DeviceAddr,
        kind: DeliveryKind,
        payload: &[u8],
        epoch: u64,
        now: Timestamp,
        expires_at: Timestamp,
    ) -> Result<FanOutOutcome> {
        let message = Message {
            group: group.clone(),
            sender: Sender::Device(sender.clone()),
            kind,
            payload: payload.to_vec(),
            epoch,
            now,
        };
        self.fan_out_message(message, expires_at).await
    }

    async fn fan_out_anonymous(
        &self,
        group: &GroupId,
        payload: &[u8],
        epoch: u64,
        delivery_key: &[u8; DELIVERY_KEY_BYTES],
        now: Timestamp,
        expires_at: Timestamp,
    ) -> Result<FanOutOutcome> {
        let message = Message {
            group: group.clone(),
            sender: Sender::Anonymous(*delivery_key),
            kind: DeliveryKind::Application,
            payload: payload.to_vec(),
            epoch,
            now,
        };
        self.fan_out_message(message, expires_at).await
    }
}

impl SqliteStore {
    async fn fan_out_message(
        &self,
        message: Message,
        expires_at: Timestamp,
    ) -> Result<FanOutOutcome> {
        // An anonymous message's key is checked by the writer, in order
        // with the writes that withdraw keys (the remembered state does
        // not hold keys).
        let message = match message.sender {
            Sender::Anonymous(_) => message,
            Sender::Device(_) => match self.fan_out_now(message, expires_at) {
                Ok(outcome) => return Ok(outcome),
                Err(message) => message,
            },
        };
        let staging = Arc::clone(&self.staging);
        self.write_then(
            move |tx| {
                // Ok(Err(..)): refused; the copies are staged only after
                // the commit (below).
                let Some((epoch, members)) = tx.members_of(&message.group)? else {
                    return Ok(Err(FanOutOutcome::UnknownGroup));
                };
                let line = match message.sender.device() {
                    Some(sender) => Some(tx.line(&sender.account)?),
                    None => None,
                };
                if let Err(refused) = check(epoch, &members, &message, line) {
                    return Ok(Err(refused));
                }
                if let Sender::Anonymous(key) = &message.sender {
                    let current: Option<Vec<u8>> = tx
                        .prepare_cached("SELECT delivery_key FROM groups WHERE group_id = ?1")
                        .and_then(|mut s| s.query_row([message.group.as_bytes()], |row| row.get(0)))
                        .map_err(backend)?;
                    if current.as_deref() != Some(&key[..]) {
                        return Ok(Err(FanOutOutcome::KeyWithdrawn));
                    }
                }
                let count = message.copy_count(&members);
                let first = tx.take_ids(count)?;
                Ok(Ok(message.copies(&members, first)))
            },
            move |checked| match checked {
                Ok(deliveries) => {
                    let durable = lock(&staging).stage(&deliveries, expires_at, Instant::now());
                    FanOutOutcome::Stored {
                        deliveries,
                        durable,
                    }
                }
                Err(refused) => refused,
            },
        )
        .await
    }
}

/// A message to fan out.
struct Message {
    group: GroupId,
    sender: Sender,
    kind: DeliveryKind,
    payload: Vec<u8>,
    /// The epoch its MLS header names.
    epoch: u64,
    now: Timestamp,
}

impl Message {
    /// A copy for each member but the sender, with consecutive IDs from
    /// `first`. The copies are staged, not inserted; their IDs come from
    /// the mailbox's sequence, so they sort with everything else stored
    /// and are never handed out twice.
    fn copy_count(&self, members: &[DeviceAddr]) -> usize {
        match self.sender {
            Sender::Device(_) => members.len().saturating_sub(1),
            Sender::Anonymous(_) => members.len(),
        }
    }

    fn copies(self, members: &[DeviceAddr], first: u64) -> Vec<(DeviceAddr, StoredDelivery)> {
        (first..)
            .zip(members.iter().filter(|m| Some(*m) != self.sender.device()))
            .map(|(id, recipient)| {
                let delivery = StoredDelivery {
                    id,
                    sender: None,
                    kind: self.kind,
                    group_id: Some(self.group.clone()),
                    payload: self.payload.clone(),
                    sent_at: self.now,
                };
                (recipient.clone(), delivery)
            })
            .collect()
    }
}

/// Whether the sender may send to the group ([`crate::check_fan_out`]).
/// `line` is the sender's: `Some(None)` for an account that does not
/// exist, `None` for an anonymous message.
fn check(
    epoch: u64,
    members: &[DeviceAddr],
    message: &Message,
    line: Option<Option<Line>>,
) -> std::result::Result<(), FanOutOutcome> {
    let sender = line.map(|line| {
        let member = message.sender.device().is_some_and(|s| members.contains(s));
        (member, line.map(|l| (l.status, l.subscription_expires_at)))
    });
    crate::check_fan_out(epoch, message.epoch, message.kind, message.now, sender)
}

impl SqliteStore {
    /// Checks and stages a fan-out on the caller's thread, without the
    /// writer: only when no open batch uses [`Checked`], the group's members and the
    /// sender's line are remembered, and the reserved block has the IDs
    /// (nothing is written, so nothing waits for a commit). Otherwise
    /// hands the message back for the writer.
    fn fan_out_now(
        &self,
        message: Message,
        expires_at: Timestamp,
    ) -> std::result::Result<FanOutOutcome, Message> {
        let mut checked = lock(&self.checked);
        if checked.writing {
            return Err(message);
        }
        let Some((epoch, members)) = checked.members.get(&message.group).cloned() else {
            return Err(message);
        };
        let line = match message.sender.device() {
            Some(sender) => match checked.lines.get(&sender.account).copied() {
                Some(line) => Some(Some(line)),
                None => return Err(message),
            },
            None => None,
        };
        if let Err(refused) = check(epoch, &members, &message, line) {
            return Ok(refused);
        }
        let count = message.copy_count(&members);
        let Some(first) = checked.ids.take_reserved(count) else {
            return Err(message);
        };
        let deliveries = message.copies(&members, first);
        // Staged before the writer can take a higher ID, which it does
        // only with this lock.
        let (durable, wake) = {
            let mut staging = lock(&self.staging);
            let durable = staging.stage(&deliveries, expires_at, Instant::now());
            (durable, staging.wake_writer())
        };
        drop(checked);
        if wake {
            // The writer may be gone only when the store is: then nothing
            // is left to sweep for.
            let _ = self.writes.send(Work::Wake);
        }
        Ok(FanOutOutcome::Stored {
            deliveries,
            durable,
        })
    }
}

#[async_trait]
impl Mailboxes for SqliteStore {
    async fn depth(&self) -> Result<crate::MailboxDepth> {
        let staging = Arc::clone(&self.staging);
        self.run(move |connection| {
            let (copies, bytes): (i64, i64) = connection
                .query_row(
                    "SELECT COUNT(*), COALESCE(SUM(length(payload)), 0) FROM mailbox",
                    [],
                    |row| Ok((row.get(0)?, row.get(1)?)),
                )
                .map_err(backend)?;
            let (staged, staged_bytes) = lock(&staging).staged();
            Ok(crate::MailboxDepth {
                copies: u64::try_from(copies).unwrap_or(0) + staged,
                bytes: u64::try_from(bytes).unwrap_or(0) + staged_bytes,
            })
        })
        .await
    }

    fn ack_window(&self) -> Option<crate::AckWindow> {
        let staging = lock(&self.staging);
        Some(crate::AckWindow {
            width: staging.window(),
            copies: staging.staged().0,
        })
    }

    async fn pending(
        &self,
        recipient: &DeviceAddr,
        after: u64,
        limit: usize,
        now: Timestamp,
    ) -> Result<Vec<StoredDelivery>> {
        let recipient = recipient.clone();
        let (staging, visible) = (Arc::clone(&self.staging), Arc::clone(&self.visible));
        let (staged, mut stored) = self
            .run(move |connection| {
                // Not between a commit and the staging of its copies (the
                // connection first, as the writer takes them). Staged
                // copies first: one that leaves staging meanwhile was
                // written (and committed) before it left, so the read below
                // finds it; the merge drops the copy seen twice.
                let _visible = visible.read().unwrap_or_else(|p| p.into_inner());
                let staged = lock(&staging).pending(&recipient, after, now);
                let mut statement = connection
                    .prepare_cached(
                        "SELECT id, sender, kind, group_id, payload, sent_at FROM mailbox
                     WHERE recipient = ?1 AND device = ?2 AND id > ?3 AND expires_at > ?4
                     ORDER BY id LIMIT ?5",
                    )
                    .map_err(backend)?;
                let rows = statement
                    .query_map(
                        params![
                            recipient.account.as_str(),
                            recipient.device.0,
                            after,
                            now,
                            limit as i64
                        ],
                        |row| {
                            Ok((
                                row.get::<_, u64>(0)?,
                                row.get::<_, String>(1)?,
                                row.get::<_, i32>(2)?,
                                row.get::<_, Option<Vec<u8>>>(3)?,
                                row.get::<_, Vec<u8>>(4)?,
                                row.get::<_, u64>(5)?,
                            ))
                        },
                    )
                    .map_err(backend)?;
                rows.map(|row| {
                    let (id, sender, kind, group, payload, sent_at) = row.map_err(backend)?;
                    Ok(StoredDelivery {
                        id,
                        sender: if sender.is_empty() {
                            None
                        } else {
                            Some(account_id(sender)?)
                        },
                        kind: DeliveryKind::try_from(kind)
                            .map_err(|_| StoreError::Corrupt(format!("delivery kind {kind}")))?,
                        group_id: group
                            .map(|g| {
                                GroupId::new(g).map_err(|e| StoreError::Corrupt(e.to_string()))
                            })
                            .transpose()?,
                        payload,
                        sent_at,
                    })
                })
                .collect::<Result<Vec<_>>>()
                .map(|stored| (staged, stored))
            })
            .await?;
        if !staged.is_empty() {
            stored.extend(staged);
            stored.sort_by_key(|d| d.id);
            stored.dedup_by_key(|d| d.id);
            stored.truncate(limit);
        }
        Ok(stored)
    }

    async fn notice(
        &self,
        notice: Notice,
        now: Timestamp,
        expires_at: Timestamp,
    ) -> Result<Vec<(DeviceAddr, u64)>> {
        self.write(move |tx| {
            let devices = match notice.device {
                Some(device) => vec![DeviceAddr::new(notice.recipient.clone(), device)],
                None => devices::current(tx, &notice.recipient)?,
            };
            let mut stored = Vec::with_capacity(devices.len());
            for recipient in devices {
                // A device removed meanwhile gets nothing.
                if !devices::is_current(tx, &recipient)? {
                    continue;
                }
                let id = enqueue(
                    tx,
                    &recipient,
                    Some(&notice.sender),
                    notice.kind,
                    notice.group_id.as_ref(),
                    &notice.payload,
                    now,
                    expires_at,
                )?;
                stored.push((recipient, id));
            }
            Ok(stored)
        })
        .await
    }

    async fn ack(&self, recipient: &DeviceAddr, ids: &[u64]) -> Result<usize> {
        // A staged copy acknowledged in its window is simply forgotten:
        // never written, so nothing to delete.
        let (forgotten, ids) = lock(&self.staging).ack(recipient, ids, Instant::now());
        if ids.is_empty() {
            return Ok(forgotten);
        }
        let recipient = recipient.clone();
        let deleted = self
            .write(move |tx| {
                let mut delete = tx
                    .prepare_cached(
                        "DELETE FROM mailbox WHERE id = ?1 AND recipient = ?2 AND device = ?3
                         RETURNING length(payload)",
                    )
                    .map_err(backend)?;
                let mut removed = 0;
                // IDs beyond SQLite's integer range name nothing stored.
                for id in ids.into_iter().filter(|id| i64::try_from(*id).is_ok()) {
                    let size: Option<u64> = delete
                        .query_row(
                            params![id, recipient.account.as_str(), recipient.device.0],
                            |row| row.get(0),
                        )
                        .optional()
                        .map_err(backend)?;
                    if let Some(size) = size {
                        tx.mailboxes.borrow_mut().shrank(&recipient, size);
                        removed += 1;
                    }
                }
                Ok(removed)
            })
            .await?;
        Ok(forgotten + deleted)
    }

    fn no_reader(&self, ids: &[u64]) {
        let wake = {
            let mut staging = lock(&self.staging);
            staging.no_reader(ids, Instant::now());
            staging.wake_writer()
        };
        if wake {
            let _ = self.writes.send(Work::Wake);
        }
    }

    async fn expire(&self, now: Timestamp) -> Result<usize> {
        self.write(move |tx| {
            let removed = tx
                .execute("DELETE FROM mailbox WHERE expires_at <= ?1", [now])
                .map_err(backend)?;
            tx.execute(
                "DELETE FROM group_commits WHERE committed_at <= ?1",
                [now.saturating_sub(crate::COMMIT_HASH_LIFETIME)],
            )
            .map_err(backend)?;
            tx.execute(
                "DELETE FROM contacts WHERE accepted = 0 AND created_at <= ?1",
                [now.saturating_sub(crate::CONTACT_REQUEST_LIFETIME)],
            )
            .map_err(backend)?;
            tx.execute("DELETE FROM token_allowance WHERE day < ?1", [now / 86_400])
                .map_err(backend)?;
            if removed > 0 {
                tx.mailboxes.borrow_mut().forget_all();
            }
            Ok(removed)
        })
        .await
    }
}

fn insert_codes(
    tx: &Transaction<'_>,
    codes: &[CodeHash],
    kind: CodeKind,
    days: u32,
    distributor: Option<u64>,
    now: Timestamp,
) -> Result<()> {
    let mut insert = tx
        .prepare_cached(
            "INSERT INTO activation_codes (code_hash, days, issued_at, kind, distributor_id)
             VALUES (?1, ?2, ?3, ?4, ?5)",
        )
        .map_err(backend)?;
    for code in codes {
        insert
            .execute(params![&code.0[..], days, now, kind.as_str(), distributor])
            .map_err(backend)?;
    }
    Ok(())
}

#[async_trait]
impl Distributors for SqliteStore {
    async fn add_distributor(
        &self,
        name: &str,
        public_key: &IdentityKey,
        quota: u32,
        now: Timestamp,
    ) -> Result<Option<u64>> {
        let (name, key) = (name.to_owned(), *public_key);
        self.write(move |tx| {
            let inserted = tx
                .execute(
                    "INSERT INTO distributors (name, public_key, quota, created_at) VALUES (?1, ?2, ?3, ?4)
                     ON CONFLICT DO NOTHING",
                    params![name, &key.as_bytes()[..], quota, now],
                )
                .map_err(backend)?;
            Ok((inserted == 1).then(|| tx.last_insert_rowid() as u64))
        })
        .await
    }

    async fn distributors(&self) -> Result<Vec<Distributor>> {
        self.run(|connection| {
            let mut statement = connection
                .prepare("SELECT id, name, public_key, quota FROM distributors ORDER BY id")
                .map_err(backend)?;
            let rows = statement
                .query_map([], |row| {
                    Ok((
                        row.get::<_, u64>(0)?,
                        row.get::<_, String>(1)?,
                        row.get::<_, Vec<u8>>(2)?,
                        row.get::<_, u32>(3)?,
                    ))
                })
                .map_err(backend)?;
            rows.map(|row| {
                let (id, name, key, quota) = row.map_err(backend)?;
                Ok(Distributor {
                    id,
                    name,
                    public_key: IdentityKey::from_slice(&key)
                        .map_err(|e| StoreError::Corrupt(e.to_string()))?,
                    quota,
                })
            })
            .collect()
        })
        .await
    }

    async fn issue_distributor_codes(
        &self,
        distributor: u64,
        codes: &[CodeHash],
        kind: CodeKind,
        days: u32,
        now: Timestamp,
    ) -> Result<bool> {
        let codes = codes.to_vec();
        self.write(move |tx| {
            let taken = tx
                .execute(
                    "UPDATE distributors SET quota = quota - ?2 WHERE id = ?1 AND quota >= ?2",
                    params![distributor, codes.len() as u64],
                )
                .map_err(backend)?;
            if taken == 0 {
                return Ok(false);
            }
            insert_codes(tx, &codes, kind, days, Some(distributor), now)?;
            Ok(true)
        })
        .await
    }

    async fn issue_renewal_codes(
        &self,
        codes: &[CodeHash],
        days: u32,
        now: Timestamp,
    ) -> Result<()> {
        let codes = codes.to_vec();
        self.write(move |tx| insert_codes(tx, &codes, CodeKind::Renewal, days, None, now))
            .await
    }

    async fn lines(&self, distributor: u64) -> Result<Vec<Account>> {
        self.run(move |connection| {
            let ids: Vec<String> = connection
                .prepare(
                    "SELECT account_id FROM accounts WHERE distributor_id = ?1 ORDER BY account_id",
                )
                .and_then(|mut s| s.query_map([distributor], |row| row.get(0))?.collect())
                .map_err(backend)?;
            let mut lines = Vec::with_capacity(ids.len());
            for id in ids {
                if let Some(account) = account_row(connection, &account_id(id)?)? {
                    lines.push(account);
                }
            }
            Ok(lines)
        })
        .await
    }

    async fn set_line_status(&self, account: &AccountId, status: LineStatus) -> Result<()> {
        let account = account.clone();
        self.write(move |tx| {
            tx.forget_line(&account);
            tx.execute(
                "UPDATE accounts SET status = ?2 WHERE account_id = ?1 AND status != 'revoked'",
                params![account.as_str(), status.as_str()],
            )
            .map_err(backend)?;
            Ok(())
        })
        .await
    }

    async fn redeem_renewal(
        &self,
        account: &AccountId,
        code: CodeHash,
        now: Timestamp,
    ) -> Result<Renewal> {
        let account = account.clone();
        self.write(move |tx| {
            let row: Option<(u32, Option<String>, Option<u64>)> = tx
                .query_row(
                    "SELECT days, used_by, distributor_id FROM activation_codes
                     WHERE code_hash = ?1 AND kind = 'renewal'",
                    [&code.0[..]],
                    |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)),
                )
                .optional()
                .map_err(backend)?;
            let (days, code_distributor) = match row {
                None => return Ok(Renewal::UnknownCode),
                Some((_, Some(_), _)) => return Ok(Renewal::CodeUsed),
                Some((days, None, distributor)) => (days, distributor),
            };
            let Some(line) = account_row(tx, &account)? else {
                return Ok(Renewal::UnknownCode);
            };
            if code_distributor.is_some() && code_distributor != line.distributor {
                return Ok(Renewal::WrongDistributor);
            }
            let expires = line.subscription_expires_at.max(now) + u64::from(days) * DAY;
            tx.forget_line(&account);
            tx.execute(
                "UPDATE accounts SET subscription_expires_at = ?2 WHERE account_id = ?1",
                params![account.as_str(), expires],
            )
            .map_err(backend)?;
            tx.execute(
                "UPDATE activation_codes SET used_by = ?1, used_at = ?2 WHERE code_hash = ?3",
                params![account.as_str(), now, &code.0[..]],
            )
            .map_err(backend)?;
            Ok(Renewal::Renewed {
                subscription_expires_at: expires,
            })
        })
        .await
    }

    async fn revoke_lapsed(
        &self,
        cutoff: Timestamp,
        now: Timestamp,
        expires_at: Timestamp,
    ) -> Result<Vec<(AccountId, Vec<DeviceAddr>)>> {
        let staging = Arc::clone(&self.staging);
        self.write_then(move |tx| {
            let ids: Vec<String> = tx
                .prepare(
                    "SELECT account_id FROM accounts
                     WHERE subscription_expires_at < ?1 AND status != 'revoked' ORDER BY account_id",
                )
                .and_then(|mut s| s.query_map([cutoff], |row| row.get(0))?.collect())
                .map_err(backend)?;
            let mut ended = Vec::with_capacity(ids.len());
            for id in ids {
                let id = account_id(id)?;
                let told = revoke_in(tx, &id, id.as_str().as_bytes(), now, expires_at)?;
                ended.push((id, told));
            }
            Ok(ended)
        }, move |ended: Vec<(AccountId, Vec<DeviceAddr>)>| {
            let mut staging = lock(&staging);
            for (id, _) in &ended {
                staging.drop_recipient(id, None);
            }
            ended
        })
        .await
    }

    async fn lapsed_lines(&self, cutoff: Timestamp) -> Result<Vec<AccountId>> {
        self.run(move |connection| {
            let ids: Vec<String> = connection
                .prepare(
                    "SELECT account_id FROM accounts
                     WHERE subscription_expires_at < ?1 AND status != 'revoked' ORDER BY account_id",
                )
                .and_then(|mut s| s.query_map([cutoff], |row| row.get(0))?.collect())
                .map_err(backend)?;
            ids.into_iter().map(account_id).collect()
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::DeviceLogs;

    #[tokio::test]
    async fn sqlite_passes_the_conformance_suite() {
        crate::conformance::run_all(|| async {
            SqliteStore::open_in_memory().unwrap_or_else(|e| panic!("{e}"))
        })
        .await;
    }

    /// On disk too: blobs' bytes are files then, not memory.
    #[tokio::test]
    async fn sqlite_on_disk_passes_the_conformance_suite() {
        let dirs = Mutex::new(Vec::new());
        crate::conformance::run_all(|| {
            let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
            let store = SqliteStore::open(&dir.path().join("umbra.db"));
            lock(&dirs).push(dir);
            async move { store.unwrap_or_else(|e| panic!("{e}")) }
        })
        .await;
    }

    /// A device's `MailboxFull` notice is found through the notices' own
    /// index, not by reading its mailbox: a full mailbox holds as many
    /// copies as its cap allows, and every write that meets it full looks
    /// the notice up (on the one writer every other write waits for).
    #[tokio::test]
    async fn a_full_mailbox_notice_is_found_without_reading_the_mailbox() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let path = dir.path().join("umbra.db");
        let _store = SqliteStore::open(&path).unwrap_or_else(|e| panic!("{e}"));
        let connection = Connection::open(&path).unwrap_or_else(|e| panic!("{e}"));
        let mut plan = connection
            .prepare(&format!("EXPLAIN QUERY PLAN {DELETE_FULL_NOTICE}"))
            .unwrap_or_else(|e| panic!("{e}"));
        let steps: Vec<String> = plan
            .query_map(params!["AAAAAAAA", 1], |row| row.get(3))
            .unwrap_or_else(|e| panic!("{e}"))
            .collect::<std::result::Result<_, _>>()
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(
            steps.iter().any(|s| s.contains("mailbox_full_notices")),
            "{steps:?}"
        );
    }

    /// A server upgraded from before KeyPackages were per device keeps
    /// every account's packages, as device 1's (whose key is the account
    /// key).
    #[tokio::test]
    async fn key_packages_stored_before_version_9_belong_to_device_1() {
        let dir = std::env::temp_dir().join(format!("umbra-store-v9-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{e}"));
        let path = dir.join("server.db");
        {
            let connection = Connection::open(&path).unwrap_or_else(|e| panic!("{e}"));
            for (version, sql) in MIGRATIONS.iter().filter(|(v, _)| *v <= 8) {
                connection
                    .execute_batch(sql)
                    .unwrap_or_else(|e| panic!("migration {version}: {e}"));
            }
            connection
                .execute_batch(
                    "INSERT INTO accounts (account_id, identity_key, created_at, subscription_expires_at)
                         VALUES ('AAAAAAAA', x'01', 0, 0);
                     INSERT INTO key_packages (account_id, key_package) VALUES ('AAAAAAAA', x'0a');
                     INSERT INTO last_resort_key_packages (account_id, key_package)
                         VALUES ('AAAAAAAA', x'0b');
                     PRAGMA user_version = 8;",
                )
                .unwrap_or_else(|e| panic!("{e}"));
        }
        let store = SqliteStore::open(&path).unwrap_or_else(|e| panic!("{e}"));
        let alice = AccountId::parse("AAAAAAAA").unwrap_or_else(|e| panic!("{e}"));
        let taken = |device| {
            let store = store.clone();
            let alice = alice.clone();
            async move {
                store
                    .take_key_package(&alice, device, umbra_proto::CLASSICAL_SUITE)
                    .await
                    .unwrap_or_else(|e| panic!("{e}"))
            }
        };
        assert_eq!(taken(DeviceId(2)).await, None);
        assert_eq!(taken(DeviceId::FIRST).await, Some((vec![0x0a], false)));
        assert_eq!(taken(DeviceId::FIRST).await, Some((vec![0x0b], true)));
        drop(store);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A commit hash kept before hashes had an age counts from the
    /// upgrade: the first sweep after it (at the server's start, when
    /// replies were just lost) keeps it.
    #[tokio::test]
    async fn commit_hashes_from_before_version_10_survive_the_first_sweep() {
        let dir = std::env::temp_dir().join(format!("umbra-store-v10-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{e}"));
        let path = dir.join("server.db");
        {
            let connection = Connection::open(&path).unwrap_or_else(|e| panic!("{e}"));
            for (version, sql) in MIGRATIONS.iter().filter(|(v, _)| *v <= 9) {
                connection
                    .execute_batch(sql)
                    .unwrap_or_else(|e| panic!("migration {version}: {e}"));
            }
            connection
                .execute_batch(
                    "INSERT INTO groups (group_id, epoch, created_at) VALUES (x'01', 1, 0);
                     INSERT INTO group_commits (group_id, epoch, hash) VALUES (x'01', 0, x'aa');
                     PRAGMA user_version = 9;",
                )
                .unwrap_or_else(|e| panic!("{e}"));
        }
        let store = SqliteStore::open(&path).unwrap_or_else(|e| panic!("{e}"));
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_else(|e| panic!("{e}"))
            .as_secs();
        store.expire(now).await.unwrap_or_else(|e| panic!("{e}"));
        drop(store);
        let kept: i64 = Connection::open(&path)
            .and_then(|c| c.query_row("SELECT COUNT(*) FROM group_commits", [], |r| r.get(0)))
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(kept, 1);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// Version 11 gives each device its own mailbox and leaf: what was
    /// stored before belongs to device 1, and the devices that logs
    /// written before it added are current (read from the entries); an
    /// account whose old log removed device 1 keeps its mail, on its
    /// lowest current device.
    #[tokio::test]
    async fn mailboxes_and_leaves_from_before_version_11_belong_to_device_1() {
        let dir = std::env::temp_dir().join(format!("umbra-store-v11-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{e}"));
        let path = dir.join("server.db");
        {
            let connection = Connection::open(&path).unwrap_or_else(|e| panic!("{e}"));
            for (version, sql) in MIGRATIONS.iter().filter(|(v, _)| *v <= 10) {
                connection
                    .execute_batch(sql)
                    .unwrap_or_else(|e| panic!("migration {version}: {e}"));
            }
            connection
                .execute_batch(&format!(
                    "INSERT INTO accounts (account_id, identity_key, created_at, subscription_expires_at)
                         VALUES ('AAAAAAAA', x'{a}', 0, 0), ('BBBBBBBB', x'{b}', 0, 0),
                                ('CCCCCCCC', x'{c}', 0, 0), ('DDDDDDDD', x'{c}04', 0, 0);
                     UPDATE accounts SET status = 'revoked' WHERE account_id = 'CCCCCCCC';
                     INSERT INTO groups (group_id, epoch, created_at) VALUES (x'01', 1, 0);
                     INSERT INTO group_members (group_id, account_id)
                         VALUES (x'01', 'AAAAAAAA'), (x'01', 'BBBBBBBB');
                     INSERT INTO mailbox (recipient, sender, kind, payload, sent_at, expires_at)
                         VALUES ('BBBBBBBB', 'AAAAAAAA', 1, x'0c', 0, 9999999999),
                                ('DDDDDDDD', 'AAAAAAAA', 1, x'0d', 0, 9999999999);
                     PRAGMA user_version = 10;",
                    a = "01".repeat(32),
                    b = "02".repeat(32),
                    c = "03".repeat(31),
                ))
                .unwrap_or_else(|e| panic!("{e}"));
            let remove_first = crate::conformance::entry(
                2,
                umbra_proto::DeviceChange::Remove {
                    device: DeviceId::FIRST,
                },
            );
            let logs = [
                ("AAAAAAAA", 0u64, crate::conformance::add_device(0, 1)),
                ("AAAAAAAA", 1, crate::conformance::add_device(1, 2)),
                ("DDDDDDDD", 0, crate::conformance::add_device(0, 1)),
                ("DDDDDDDD", 1, crate::conformance::add_device(1, 2)),
                ("DDDDDDDD", 2, remove_first),
            ];
            for (account, seq, entry) in logs {
                connection
                    .execute(
                        "INSERT INTO device_log (account_id, seq, entry, appended_at)
                         VALUES (?1, ?2, ?3, 0)",
                        params![account, seq, entry],
                    )
                    .unwrap_or_else(|e| panic!("{e}"));
            }
        }
        let store = SqliteStore::open(&path).unwrap_or_else(|e| panic!("{e}"));
        let id = |text| AccountId::parse(text).unwrap_or_else(|e| panic!("{e}"));
        let (alice, bob) = (id("AAAAAAAA"), id("BBBBBBBB"));
        let devices = |account: AccountId| {
            let store = store.clone();
            async move {
                store
                    .devices(&account)
                    .await
                    .unwrap_or_else(|e| panic!("{e}"))
                    .into_iter()
                    .map(|(device, _)| device.0)
                    .collect::<Vec<_>>()
            }
        };
        assert_eq!(devices(alice.clone()).await, [1, 2], "from her log");
        assert_eq!(
            devices(bob.clone()).await,
            [1],
            "device 1 of a line without a log"
        );
        assert!(
            devices(id("CCCCCCCC")).await.is_empty(),
            "none for a revoked line"
        );
        let group = GroupId::new(vec![1]).unwrap_or_else(|e| panic!("{e}"));
        let state = store.group(&group).await.unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            state.map(|state| state.members),
            Some(vec![
                DeviceAddr::first(alice.clone()),
                DeviceAddr::first(bob.clone())
            ])
        );
        let held = store
            .pending(&DeviceAddr::first(bob.clone()), 0, 10, 0)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(held.len(), 1, "Bob's stored delivery is device 1's");
        let dave = id("DDDDDDDD");
        assert_eq!(
            devices(dave.clone()).await,
            [2],
            "device 1 removed in the old log"
        );
        let held = store
            .pending(&DeviceAddr::new(dave, DeviceId(2)), 0, 10, 0)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(held.len(), 1, "the shared mail stays, on device 2");
        drop(store);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// What the store deletes is gone from the files, not left in free
    /// space: a KeyPackage handed out (deleted as it goes) leaves no byte
    /// of itself in the database once the store is closed.
    #[tokio::test]
    async fn deleted_rows_leave_no_trace_in_the_files() {
        let dir = std::env::temp_dir().join(format!("umbra-store-erase-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{e}"));
        let path = dir.join("server.db");
        let marker: Vec<u8> = b"umbra-secure-delete-marker-"
            .iter()
            .copied()
            .chain((0..200u8).map(|i| i.wrapping_mul(37)))
            .collect();
        let found = |path: &Path| {
            let bytes = std::fs::read(path).unwrap_or_default();
            bytes.windows(27).any(|w| w == &marker[..27])
        };
        {
            let store = SqliteStore::open(&path).unwrap_or_else(|e| panic!("{e}"));
            let alice = crate::conformance::registered(&store, "AAAAAAAA", 1).await;
            store
                .add_key_packages(
                    &alice,
                    DeviceId::FIRST,
                    umbra_proto::CLASSICAL_SUITE,
                    vec![marker.clone()],
                    None,
                )
                .await
                .unwrap_or_else(|e| panic!("{e}"));
            let taken = store
                .take_key_package(&alice, DeviceId::FIRST, umbra_proto::CLASSICAL_SUITE)
                .await
                .unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(taken, Some((marker.clone(), false)));
        }
        // Closing the last connection checkpoints the WAL into the file.
        let connection = Connection::open(&path).unwrap_or_else(|e| panic!("{e}"));
        connection
            .execute_batch("PRAGMA wal_checkpoint(TRUNCATE);")
            .unwrap_or_else(|e| panic!("{e}"));
        drop(connection);
        for file in ["server.db", "server.db-wal"] {
            assert!(
                !found(&dir.join(file)),
                "{file} still holds the deleted KeyPackage"
            );
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn sqlite_caps_each_mailbox() {
        let limits = StoreLimits {
            mailbox_bytes: crate::conformance::MAILBOX_CAP,
            ..StoreLimits::default()
        };
        let store = SqliteStore::open_in_memory_limited(limits).unwrap_or_else(|e| panic!("{e}"));
        crate::conformance::mailbox_cap(&store).await;
    }

    /// SQLite may roll a whole transaction back on its own (disk full, I/O
    /// error), savepoints and all. Writes of the batch run before it must
    /// be told they failed, and one queued after it must not run outside
    /// the batch (committed by its own RELEASE while its caller is told the
    /// batch failed): it runs in the next batch, and is told the truth.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_automatic_rollback_fails_its_batch_and_later_writes_run_in_the_next() {
        use std::future::Future;
        use std::task::Poll;
        let store = SqliteStore::open_in_memory().unwrap_or_else(|e| panic!("{e}"));
        store
            .write(|tx| {
                tx.execute_batch("CREATE TABLE t (v INTEGER)")
                    .map_err(backend)
            })
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let insert = |v: i64| {
            store.write(move |tx| {
                tx.execute("INSERT INTO t VALUES (?1)", [v])
                    .map(drop)
                    .map_err(backend)
            })
        };
        // Hold the writer, so the next three writes share one batch.
        let (started, running) = std::sync::mpsc::channel();
        let (release, held) = std::sync::mpsc::channel::<()>();
        let holder = tokio::spawn({
            let store = store.clone();
            async move {
                store
                    .write(move |_| {
                        let _ = started.send(());
                        let _ = held.recv();
                        Ok(())
                    })
                    .await
            }
        });
        running.recv().unwrap_or_else(|e| panic!("{e}"));
        let mut first = Box::pin(insert(1));
        // What SQLite does on SQLITE_FULL or IOERR in some cases.
        let mut rollback = Box::pin(store.write(|tx| {
            tx.execute_batch("ROLLBACK").map_err(backend)?;
            Err::<(), _>(StoreError::Full)
        }));
        let mut after = Box::pin(insert(3));
        // Queue the three, in this order (each is queued on its first poll).
        std::future::poll_fn(|cx| {
            let _ = first.as_mut().poll(cx);
            let _ = rollback.as_mut().poll(cx);
            let _ = after.as_mut().poll(cx);
            Poll::Ready(())
        })
        .await;
        release.send(()).unwrap_or_else(|e| panic!("{e}"));
        holder
            .await
            .unwrap_or_else(|e| panic!("{e}"))
            .unwrap_or_else(|e| panic!("{e}"));
        let (first, rollback, after) = (first.await, rollback.await, after.await);
        let rows: Vec<i64> = store
            .run(|c| {
                let mut statement = c.prepare("SELECT v FROM t ORDER BY v").map_err(backend)?;
                let rows = statement.query_map([], |row| row.get(0)).map_err(backend)?;
                rows.collect::<std::result::Result<_, _>>().map_err(backend)
            })
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(matches!(first, Err(StoreError::Full)), "{first:?}");
        assert!(matches!(rollback, Err(StoreError::Full)), "{rollback:?}");
        assert!(after.is_ok(), "{after:?}");
        assert_eq!(
            rows,
            vec![3],
            "each caller is told what happened to its write"
        );
    }

    /// A write that fails halfway (a commit whose copy for one member
    /// cannot be inserted) is undone to its savepoint; the mailbox sizes it
    /// counted for the members before must be undone with it, or their
    /// mailboxes look fuller than they are and their messages are dropped.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failed_write_leaves_no_mailbox_bytes_counted() {
        use crate::{Groups as _, Mailboxes as _};
        let limits = StoreLimits {
            mailbox_bytes: 3500,
            ..StoreLimits::default()
        };
        let store = SqliteStore::open_in_memory_limited(limits).unwrap_or_else(|e| panic!("{e}"));
        let (g, [alice, bob, carol]) = crate::conformance::group_of_three(&store).await;
        let now = 1_800_000_000;
        let send = |n: u8| {
            let (store, g, alice) = (store.clone(), g.clone(), alice.clone());
            async move {
                let outcome = store
                    .fan_out(
                        &g,
                        &DeviceAddr::first(alice.clone()),
                        DeliveryKind::Application,
                        &[n; 1000],
                        1,
                        now,
                        now + 3600,
                    )
                    .await
                    .unwrap_or_else(|e| panic!("{e}"));
                let crate::FanOutOutcome::Stored { durable, .. } = outcome else {
                    panic!("{outcome:?}");
                };
                durable.wait().await.unwrap_or_else(|e| panic!("{e}"));
            }
        };
        send(1).await;
        send(2).await;
        let poison = format!(
            "CREATE TEMP TRIGGER poison BEFORE INSERT ON mailbox
             WHEN NEW.recipient = '{}' AND NEW.kind = {}
             BEGIN SELECT RAISE(ABORT, 'simulated failure'); END;",
            carol.as_str(),
            DeliveryKind::Commit as i32
        );
        store
            .write(move |tx| tx.execute_batch(&poison).map_err(backend))
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let failed = store
            .accept_commit(
                &crate::conformance::commit(&g, 1, &alice, &[0; 1000], &[], &[]),
                now,
                now + 3600,
            )
            .await;
        assert!(failed.is_err(), "{failed:?}");
        store
            .write(|tx| tx.execute_batch("DROP TRIGGER poison").map_err(backend))
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        // Bob holds 2,000 bytes, not 3,000: a third message fits.
        send(3).await;
        let held = store
            .pending(&DeviceAddr::first(bob.clone()), 0, 100, now)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let kinds: Vec<_> = held.iter().map(|d| (d.kind, d.payload[0])).collect();
        assert_eq!(
            kinds,
            [
                (DeliveryKind::Application, 1),
                (DeliveryKind::Application, 2),
                (DeliveryKind::Application, 3)
            ]
        );
    }

    /// The same, when the rollback happens while the batch writes staged
    /// copies (a copy's insert hits SQLITE_FULL, say; here a trigger raises
    /// the rollback): the copies after it must not be inserted outside the
    /// transaction while their senders are told they failed.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_rollback_while_writing_staged_copies_tells_every_sender_the_truth() {
        use crate::{FanOutOutcome, Mailboxes as _};
        let store = SqliteStore::open_in_memory().unwrap_or_else(|e| panic!("{e}"));
        let (g, alice, bob) = crate::conformance::group_of_two(&store).await;
        store
            .write(|tx| {
                tx.execute_batch(
                    "CREATE TEMP TRIGGER poison BEFORE INSERT ON mailbox
                     WHEN NEW.payload = x'dead'
                     BEGIN SELECT RAISE(ROLLBACK, 'simulated rollback'); END;",
                )
                .map_err(backend)
            })
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let now = 1_800_000_000;
        let mut sent = Vec::new();
        for payload in [&b"one"[..], &[0xde, 0xad], b"three"] {
            match store
                .fan_out(
                    &g,
                    &DeviceAddr::first(bob.clone()),
                    DeliveryKind::Application,
                    payload,
                    1,
                    now,
                    now + 3600,
                )
                .await
                .unwrap_or_else(|e| panic!("{e}"))
            {
                FanOutOutcome::Stored {
                    deliveries,
                    durable,
                } => sent.push((payload.to_vec(), deliveries[0].1.id, durable)),
                other => panic!("{other:?}"),
            }
        }
        // Alice has no connection: the three are written at the next sweep,
        // in one batch.
        let ids: Vec<u64> = sent.iter().map(|(_, id, _)| *id).collect();
        store.no_reader(&ids);
        let mut told = Vec::new();
        for (payload, _, durable) in sent {
            told.push((payload, durable.wait().await.is_ok()));
        }
        let stored: Vec<Vec<u8>> = store
            .pending(&DeviceAddr::first(alice.clone()), 0, 10, now)
            .await
            .unwrap_or_else(|e| panic!("{e}"))
            .into_iter()
            .map(|delivery| delivery.payload)
            .collect();
        for (payload, accepted) in told {
            assert_eq!(
                accepted,
                stored.contains(&payload),
                "{payload:?}: told {accepted}, stored {stored:?}"
            );
        }
    }

    #[tokio::test]
    async fn a_file_database_survives_reopening() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let path = dir.path().join("umbra.db");
        let store = SqliteStore::open(&path).unwrap_or_else(|e| panic!("{e}"));
        let highest = crate::conformance::survives_reopen_part_one(&store).await;
        drop(store);
        let store = SqliteStore::open(&path).unwrap_or_else(|e| panic!("{e}"));
        crate::conformance::survives_reopen_part_two(&store, highest).await;
    }

    #[tokio::test]
    async fn another_process_commit_is_seen() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let path = dir.path().join("umbra.db");
        let server = SqliteStore::open(&path).unwrap_or_else(|e| panic!("{e}"));
        let admin = SqliteStore::open(&path).unwrap_or_else(|e| panic!("{e}"));
        crate::conformance::sees_another_writer(&server, &admin).await;
    }

    /// A database a newer server migrated (an upgrade rolled back, or a
    /// newer backup restored) is refused, not used with a schema this
    /// build does not know.
    #[test]
    fn a_database_from_a_newer_server_is_refused() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let path = dir.path().join("umbra.db");
        drop(SqliteStore::open(&path).unwrap_or_else(|e| panic!("{e}")));
        let newer = MIGRATIONS.last().map_or(0, |(v, _)| *v) + 1;
        Connection::open(&path)
            .and_then(|c| c.pragma_update(None, "user_version", newer))
            .unwrap_or_else(|e| panic!("{e}"));
        let refused = SqliteStore::open(&path).map(|_| ());
        assert!(
            matches!(&refused, Err(StoreError::Backend(m)) if m.contains("newer")),
            "{refused:?}"
        );
    }
}
