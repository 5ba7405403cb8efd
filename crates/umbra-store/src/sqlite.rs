//! The embedded backend: SQLite in WAL mode with `synchronous=FULL`, so a
//! delivery is on disk before the sender is told it was accepted.
//!
//! One connection behind a mutex, used from tokio's blocking pool. SQLite
//! allows one writer at a time anyway; readers would gain from a pool, which
//! can come when a benchmark shows it matters.

use std::path::Path;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use rusqlite::{Connection, OptionalExtension, Transaction, params};
use umbra_proto::{AccountId, DeliveryKind, GroupId, IdentityKey};

use crate::{
    Account, Accounts, CodeHash, CodeKind, CommitOutcome, CommitRecord, ContactAcceptOutcome,
    ContactRequestOutcome, Contacts, DAY, Distributor, Distributors, FanOutOutcome, GroupState,
    Groups, KeyPackageStock, KeyPackages, LineStatus, Mailboxes, Notice, Registration, Renewal,
    Result, StoreError, StoredDelivery, Timestamp,
};

/// Numbered migrations, applied in order; `PRAGMA user_version` records the
/// last one applied.
const MIGRATIONS: &[(u32, &str)] = &[
    (1, include_str!("../migrations/0001_init.sql")),
    (2, include_str!("../migrations/0002_lines.sql")),
];

/// Most writes committed together by one fsync.
const MAX_GROUP_COMMIT: usize = 1024;

/// One write, run inside the group's transaction. It returns what to do
/// once the transaction's fate is known: hand its result to the caller if
/// the commit succeeded, or the commit's error if it did not.
type Job = Box<dyn FnOnce(&Transaction<'_>) -> Completion + Send>;
type Completion = Box<dyn FnOnce(std::result::Result<(), String>) + Send>;

/// Server storage in one SQLite database file.
///
/// Writes are group-committed: a dedicated thread takes every write queued
/// while the previous commit was syncing, runs each in its own savepoint
/// inside one transaction, commits once (one fsync for the lot), and only
/// then answers each caller. So a caller is told "done" only when its write
/// is durable, and a thousand concurrent senders cost one fsync, not a
/// thousand. A write that fails rolls back to its savepoint without
/// touching the others.
#[derive(Clone)]
pub struct SqliteStore {
    connection: Arc<Mutex<Connection>>,
    writes: std::sync::mpsc::Sender<Job>,
}

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SqliteStore")
    }
}

fn backend(error: impl std::fmt::Display) -> StoreError {
    StoreError::Backend(error.to_string())
}

impl SqliteStore {
    /// Opens (creating if needed) the database at `path` and migrates it.
    pub fn open(path: &Path) -> Result<Self> {
        Self::setup(Connection::open(path).map_err(backend)?)
    }

    /// A private in-memory database, for tests.
    pub fn open_in_memory() -> Result<Self> {
        Self::setup(Connection::open_in_memory().map_err(backend)?)
    }

    fn setup(mut connection: Connection) -> Result<Self> {
        connection
            .execute_batch(
                "PRAGMA busy_timeout = 5000;
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
        for (version, sql) in MIGRATIONS.iter().filter(|(v, _)| *v > applied) {
            tx.execute_batch(sql).map_err(backend)?;
            tx.pragma_update(None, "user_version", version)
                .map_err(backend)?;
        }
        tx.commit().map_err(backend)?;
        let connection = Arc::new(Mutex::new(connection));
        let (writes, queue) = std::sync::mpsc::channel();
        let writer = Arc::clone(&connection);
        std::thread::Builder::new()
            .name("umbra-store-writer".into())
            .spawn(move || group_commit(&writer, &queue))
            .map_err(backend)?;
        Ok(SqliteStore { connection, writes })
    }

    async fn run<T, F>(&self, work: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> Result<T> + Send + 'static,
    {
        let connection = Arc::clone(&self.connection);
        tokio::task::spawn_blocking(move || {
            // A panic while holding the lock would poison it; the connection
            // itself is still consistent (SQLite rolls back the open
            // transaction), so carry on with it.
            let mut guard = connection.lock().unwrap_or_else(|p| p.into_inner());
            work(&mut guard)
        })
        .await
        .map_err(|e| StoreError::Backend(format!("storage task failed: {e}")))?
    }

    /// Runs `work` atomically (in its own savepoint) within the next group
    /// commit, and returns its result once that commit is durable.
    async fn write<T, F>(&self, work: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Transaction<'_>) -> Result<T> + Send + 'static,
    {
        let (answer, answered) = tokio::sync::oneshot::channel();
        let job: Job = Box::new(move |tx| {
            let value = in_savepoint(tx, work);
            Box::new(move |committed| {
                let _ = answer.send(match committed {
                    Ok(()) => value,
                    Err(error) => Err(StoreError::Backend(error)),
                });
            })
        });
        self.writes
            .send(job)
            .map_err(|_| StoreError::Backend("the storage writer stopped".into()))?;
        answered.await.map_err(|_| {
            StoreError::Backend("the write could not be run (see the server log)".into())
        })?
    }
}

/// Runs `work` between SAVEPOINT and RELEASE, rolling back to the savepoint
/// if it fails, so one failed write leaves the rest of its group intact.
fn in_savepoint<T>(
    tx: &Transaction<'_>,
    work: impl FnOnce(&Transaction<'_>) -> Result<T>,
) -> Result<T> {
    tx.execute_batch("SAVEPOINT job").map_err(backend)?;
    let value = work(tx);
    let end = if value.is_ok() {
        "RELEASE job"
    } else {
        "ROLLBACK TO job; RELEASE job"
    };
    tx.execute_batch(end).map_err(backend)?;
    value
}

/// The writer thread: one transaction and one commit per batch of queued
/// writes, until every [`SqliteStore`] handle is gone.
fn group_commit(connection: &Mutex<Connection>, queue: &std::sync::mpsc::Receiver<Job>) {
    while let Ok(first) = queue.recv() {
        let mut jobs = vec![first];
        while jobs.len() < MAX_GROUP_COMMIT {
            match queue.try_recv() {
                Ok(job) => jobs.push(job),
                Err(_) => break,
            }
        }
        let mut guard = connection.lock().unwrap_or_else(|p| p.into_inner());
        let tx = match guard.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate) {
            Ok(tx) => tx,
            Err(error) => {
                // Nothing ran; dropping the jobs fails each caller's write.
                tracing::warn!(%error, "cannot begin a write transaction");
                drop(jobs);
                continue;
            }
        };
        let completions: Vec<Completion> = jobs.into_iter().map(|job| job(&tx)).collect();
        let committed = tx.commit().map_err(|e| e.to_string());
        drop(guard);
        for completion in completions {
            completion(committed.clone());
        }
    }
}

fn account_id(text: String) -> Result<AccountId> {
    AccountId::parse(&text).map_err(|e| StoreError::Corrupt(e.to_string()))
}

#[allow(clippy::too_many_arguments)] // one row of the mailbox table, named field by field
fn enqueue(
    tx: &Transaction<'_>,
    recipient: &AccountId,
    sender: &AccountId,
    kind: DeliveryKind,
    group: Option<&GroupId>,
    payload: &[u8],
    now: Timestamp,
    expires_at: Timestamp,
) -> Result<u64> {
    tx.prepare_cached(
        "INSERT INTO mailbox (recipient, sender, kind, group_id, payload, sent_at, expires_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
    )
    .and_then(|mut statement| {
        statement.execute(params![
            recipient.as_str(),
            sender.as_str(),
            kind as i32,
            group.map(GroupId::as_bytes),
            payload,
            now,
            expires_at
        ])
    })
    .map_err(backend)?;
    Ok(tx.last_insert_rowid() as u64)
}

fn members(tx: &Connection, group: &GroupId) -> Result<Vec<AccountId>> {
    let mut statement = tx
        .prepare_cached(
            "SELECT account_id FROM group_members WHERE group_id = ?1 ORDER BY account_id",
        )
        .map_err(backend)?;
    let rows = statement
        .query_map([group.as_bytes()], |row| row.get::<_, String>(0))
        .map_err(backend)?;
    rows.map(|row| account_id(row.map_err(backend)?)).collect()
}

fn is_member(tx: &Connection, group: &GroupId, account: &AccountId) -> Result<bool> {
    tx.prepare_cached("SELECT 1 FROM group_members WHERE group_id = ?1 AND account_id = ?2")
        .and_then(|mut s| s.exists(params![group.as_bytes(), account.as_str()]))
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
            Ok(Registration::Registered(Account {
                id,
                identity_key,
                created_at: now,
                subscription_expires_at: expires,
                wipe_key: None,
                status: LineStatus::Active,
                distributor,
                last_seen_day: None,
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
                "UPDATE accounts SET wipe_key = ?2 WHERE account_id = ?1",
                params![id.as_str(), &key.as_bytes()[..]],
            )
            .map_err(backend)?;
            Ok(())
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
    ) -> Result<Vec<AccountId>> {
        let id = id.clone();
        let mut notice = id.as_str().as_bytes().to_vec();
        if let Some(proof) = proof {
            notice.extend_from_slice(proof.as_bytes());
        }
        self.write(move |tx| revoke_in(tx, &id, &notice, now, expires_at))
            .await
    }
}

/// Ends a line inside an open transaction (see [`Accounts::revoke`]).
fn revoke_in(
    tx: &Transaction<'_>,
    id: &AccountId,
    notice: &[u8],
    now: Timestamp,
    expires_at: Timestamp,
) -> Result<Vec<AccountId>> {
    let groups: Vec<Vec<u8>> = tx
        .prepare("SELECT group_id FROM group_members WHERE account_id = ?1")
        .and_then(|mut s| {
            s.query_map([id.as_str()], |row| row.get(0))?
                .collect::<rusqlite::Result<_>>()
        })
        .map_err(backend)?;
    let mut told = Vec::new();
    for group in groups {
        let group = GroupId::new(group).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        tx.execute(
            "DELETE FROM group_members WHERE group_id = ?1 AND account_id = ?2",
            params![group.as_bytes(), id.as_str()],
        )
        .map_err(backend)?;
        for member in members(tx, &group)? {
            enqueue(
                tx,
                &member,
                id,
                DeliveryKind::MemberRevoked,
                Some(&group),
                notice,
                now,
                expires_at,
            )?;
            told.push(member);
        }
    }
    for sql in [
        "DELETE FROM key_packages WHERE account_id = ?1",
        "DELETE FROM last_resort_key_packages WHERE account_id = ?1",
        "DELETE FROM mailbox WHERE recipient = ?1",
        "DELETE FROM contacts WHERE requester = ?1 OR addressee = ?1",
        "UPDATE accounts SET status = 'revoked', wipe_key = NULL WHERE account_id = ?1",
    ] {
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
    );
    let row: Option<Row> = connection
        .prepare_cached(
            "SELECT identity_key, created_at, subscription_expires_at, wipe_key, status,
                    distributor_id, last_seen_day
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
                ))
            })
            .optional()
        })
        .map_err(backend)?;
    let corrupt = |e: umbra_proto::DecodeError| StoreError::Corrupt(e.to_string());
    row.map(
        |(key, created_at, expires, wipe_key, status, distributor, last_seen_day)| {
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
            })
        },
    )
    .transpose()
}

/// (accepted?) for the contact row between a and b in either direction,
/// with the requester first.
fn contact_row(tx: &Connection, a: &AccountId, b: &AccountId) -> Result<Option<(String, bool)>> {
    tx.prepare_cached(
        "SELECT requester, accepted FROM contacts
         WHERE (requester = ?1 AND addressee = ?2) OR (requester = ?2 AND addressee = ?1)",
    )
    .and_then(|mut s| {
        s.query_row(params![a.as_str(), b.as_str()], |row| {
            Ok((row.get(0)?, row.get::<_, bool>(1)?))
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
    ) -> Result<(ContactRequestOutcome, Option<u64>)> {
        let (from, to) = (from.clone(), to.clone());
        self.write(move |tx| {
            match contact_row(tx, &from, &to)? {
                Some((_, true)) => return Ok((ContactRequestOutcome::AlreadyContacts, None)),
                Some((requester, false)) if requester == from.as_str() => {
                    return Ok((ContactRequestOutcome::AlreadyRequested, None));
                }
                // `to` had asked `from` already: the request stands as it is;
                // `from` accepts it with AcceptContact.
                Some(_) => return Ok((ContactRequestOutcome::AlreadyRequested, None)),
                None => {}
            }
            tx.execute(
                "INSERT INTO contacts (requester, addressee, accepted, created_at) VALUES (?1, ?2, 0, ?3)",
                params![from.as_str(), to.as_str(), now],
            )
            .map_err(backend)?;
            let id = enqueue(tx, &to, &from, DeliveryKind::ContactRequest, None, &[], now, expires_at)?;
            Ok((ContactRequestOutcome::Sent, Some(id)))
        })
        .await
    }

    async fn accept_contact(
        &self,
        acceptor: &AccountId,
        requester: &AccountId,
        now: Timestamp,
        expires_at: Timestamp,
    ) -> Result<(ContactAcceptOutcome, Option<u64>)> {
        let (acceptor, requester) = (acceptor.clone(), requester.clone());
        self.write(move |tx| {
            match contact_row(tx, &acceptor, &requester)? {
                Some((_, true)) => return Ok((ContactAcceptOutcome::AlreadyContacts, None)),
                Some((from, false)) if from == requester.as_str() => {}
                _ => return Ok((ContactAcceptOutcome::NoRequest, None)),
            }
            tx.execute(
                "UPDATE contacts SET accepted = 1 WHERE requester = ?1 AND addressee = ?2",
                params![requester.as_str(), acceptor.as_str()],
            )
            .map_err(backend)?;
            let id = enqueue(
                tx,
                &requester,
                &acceptor,
                DeliveryKind::ContactAccepted,
                None,
                &[],
                now,
                expires_at,
            )?;
            Ok((ContactAcceptOutcome::Accepted, Some(id)))
        })
        .await
    }

    async fn are_contacts(&self, a: &AccountId, b: &AccountId) -> Result<bool> {
        let (a, b) = (a.clone(), b.clone());
        self.run(move |connection| Ok(matches!(contact_row(connection, &a, &b)?, Some((_, true)))))
            .await
    }
}

fn stock(connection: &Connection, account: &AccountId) -> Result<KeyPackageStock> {
    let one_time: u32 = connection
        .prepare_cached("SELECT COUNT(*) FROM key_packages WHERE account_id = ?1")
        .and_then(|mut s| s.query_row([account.as_str()], |row| row.get(0)))
        .map_err(backend)?;
    let has_last_resort = connection
        .prepare_cached("SELECT 1 FROM last_resort_key_packages WHERE account_id = ?1")
        .and_then(|mut s| s.exists([account.as_str()]))
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
        one_time: Vec<Vec<u8>>,
        last_resort: Option<Vec<u8>>,
    ) -> Result<KeyPackageStock> {
        let account = account.clone();
        self.write(move |tx| {
            let mut insert = tx
                .prepare_cached(
                    "INSERT INTO key_packages (account_id, key_package) VALUES (?1, ?2)",
                )
                .map_err(backend)?;
            for key_package in &one_time {
                insert
                    .execute(params![account.as_str(), key_package])
                    .map_err(backend)?;
            }
            if let Some(key_package) = &last_resort {
                tx.execute(
                    "INSERT INTO last_resort_key_packages (account_id, key_package) VALUES (?1, ?2)
                     ON CONFLICT (account_id) DO UPDATE SET key_package = excluded.key_package",
                    params![account.as_str(), key_package],
                )
                .map_err(backend)?;
            }
            stock(tx, &account)
        })
        .await
    }

    async fn take_key_package(&self, account: &AccountId) -> Result<Option<(Vec<u8>, bool)>> {
        let account = account.clone();
        self.write(move |tx| {
            let one_time: Option<(i64, Vec<u8>)> = tx
                .query_row(
                    "SELECT id, key_package FROM key_packages WHERE account_id = ?1 ORDER BY id LIMIT 1",
                    [account.as_str()],
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
                    "SELECT key_package FROM last_resort_key_packages WHERE account_id = ?1",
                    [account.as_str()],
                    |row| row.get(0),
                )
                .optional()
                .map_err(backend)?;
            Ok(last_resort.map(|key_package| (key_package, true)))
        })
        .await
    }

    async fn key_package_stock(&self, account: &AccountId) -> Result<KeyPackageStock> {
        let account = account.clone();
        self.run(move |connection| stock(connection, &account))
            .await
    }
}

#[async_trait]
impl Groups for SqliteStore {
    async fn create_group(
        &self,
        group: &GroupId,
        creator: &AccountId,
        now: Timestamp,
    ) -> Result<bool> {
        let (group, creator) = (group.clone(), creator.clone());
        self.write(move |tx| {
            let inserted = tx
                .execute(
                    "INSERT INTO groups (group_id, epoch, created_at) VALUES (?1, 0, ?2)
                     ON CONFLICT DO NOTHING",
                    params![group.as_bytes(), now],
                )
                .map_err(backend)?;
            if inserted == 0 {
                return Ok(false);
            }
            tx.execute(
                "INSERT INTO group_members (group_id, account_id) VALUES (?1, ?2)",
                params![group.as_bytes(), creator.as_str()],
            )
            .map_err(backend)?;
            Ok(true)
        })
        .await
    }

    async fn group(&self, group: &GroupId) -> Result<Option<GroupState>> {
        let group = group.clone();
        self.run(move |connection| {
            let epoch: Option<u64> = connection
                .query_row(
                    "SELECT epoch FROM groups WHERE group_id = ?1",
                    [group.as_bytes()],
                    |row| row.get(0),
                )
                .optional()
                .map_err(backend)?;
            epoch
                .map(|epoch| {
                    Ok(GroupState {
                        epoch,
                        members: members(connection, &group)?,
                    })
                })
                .transpose()
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
            let epoch: Option<u64> = tx
                .query_row(
                    "SELECT epoch FROM groups WHERE group_id = ?1",
                    [commit.group_id.as_bytes()],
                    |row| row.get(0),
                )
                .optional()
                .map_err(backend)?;
            let Some(epoch) = epoch else {
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
            let before = members(tx, &commit.group_id)?;
            for account in &commit.removed {
                tx.execute(
                    "DELETE FROM group_members WHERE group_id = ?1 AND account_id = ?2",
                    params![commit.group_id.as_bytes(), account.as_str()],
                )
                .map_err(backend)?;
            }
            for account in &commit.added {
                tx.execute(
                    "INSERT INTO group_members (group_id, account_id) VALUES (?1, ?2)
                     ON CONFLICT DO NOTHING",
                    params![commit.group_id.as_bytes(), account.as_str()],
                )
                .map_err(backend)?;
            }
            tx.execute(
                "UPDATE groups SET epoch = ?1 WHERE group_id = ?2",
                params![epoch + 1, commit.group_id.as_bytes()],
            )
            .map_err(backend)?;
            tx.execute(
                "INSERT INTO group_commits (group_id, epoch, hash) VALUES (?1, ?2, ?3)",
                params![commit.group_id.as_bytes(), epoch, &hash[..]],
            )
            .map_err(backend)?;
            let mut recipients = Vec::new();
            for member in before.iter().filter(|m| **m != commit.sender) {
                enqueue(
                    tx,
                    member,
                    &commit.sender,
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
                    enqueue(
                        tx,
                        added,
                        &commit.sender,
                        DeliveryKind::Welcome,
                        Some(&commit.group_id),
                        welcome,
                        now,
                        expires_at,
                    )?;
                    recipients.push(added.clone());
                }
            }
            Ok(CommitOutcome::Accepted {
                epoch: epoch + 1,
                recipients,
            })
        })
        .await
    }

    async fn fan_out(
        &self,
        group: &GroupId,
        sender: &AccountId,
        kind: DeliveryKind,
        payload: &[u8],
        now: Timestamp,
        expires_at: Timestamp,
    ) -> Result<FanOutOutcome> {
        let (group, sender, payload) = (group.clone(), sender.clone(), payload.to_vec());
        self.write(move |tx| {
            let exists = tx
                .prepare_cached("SELECT 1 FROM groups WHERE group_id = ?1")
                .and_then(|mut s| s.exists([group.as_bytes()]))
                .map_err(backend)?;
            if !exists {
                return Ok(FanOutOutcome::UnknownGroup);
            }
            let members = members(tx, &group)?;
            if !members.contains(&sender) {
                return Ok(FanOutOutcome::NotAMember);
            }
            match account_row(tx, &sender)? {
                Some(account)
                    if account
                        .status
                        .may_send(account.subscription_expires_at, now) => {}
                Some(account) => {
                    return Ok(FanOutOutcome::LineInactive {
                        status: account.status,
                        subscription_expires_at: account.subscription_expires_at,
                    });
                }
                None => {
                    return Ok(FanOutOutcome::LineInactive {
                        status: LineStatus::Revoked,
                        subscription_expires_at: 0,
                    });
                }
            }
            let mut deliveries = Vec::with_capacity(members.len());
            for recipient in members.into_iter().filter(|m| *m != sender) {
                let id = enqueue(
                    tx,
                    &recipient,
                    &sender,
                    kind,
                    Some(&group),
                    &payload,
                    now,
                    expires_at,
                )?;
                let delivery = StoredDelivery {
                    id,
                    sender: sender.clone(),
                    kind,
                    group_id: Some(group.clone()),
                    payload: payload.clone(),
                    sent_at: now,
                };
                deliveries.push((recipient, delivery));
            }
            Ok(FanOutOutcome::Stored { deliveries })
        })
        .await
    }
}

#[async_trait]
impl Mailboxes for SqliteStore {
    async fn pending(
        &self,
        recipient: &AccountId,
        after: u64,
        limit: usize,
        now: Timestamp,
    ) -> Result<Vec<StoredDelivery>> {
        let recipient = recipient.clone();
        self.run(move |connection| {
            let mut statement = connection
                .prepare_cached(
                    "SELECT id, sender, kind, group_id, payload, sent_at FROM mailbox
                     WHERE recipient = ?1 AND id > ?2 AND expires_at > ?3
                     ORDER BY id LIMIT ?4",
                )
                .map_err(backend)?;
            let rows = statement
                .query_map(
                    params![recipient.as_str(), after, now, limit as i64],
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
                    sender: account_id(sender)?,
                    kind: DeliveryKind::try_from(kind)
                        .map_err(|_| StoreError::Corrupt(format!("delivery kind {kind}")))?,
                    group_id: group
                        .map(|g| GroupId::new(g).map_err(|e| StoreError::Corrupt(e.to_string())))
                        .transpose()?,
                    payload,
                    sent_at,
                })
            })
            .collect()
        })
        .await
    }

    async fn notice(&self, notice: Notice, now: Timestamp, expires_at: Timestamp) -> Result<u64> {
        self.write(move |tx| {
            enqueue(
                tx,
                &notice.recipient,
                &notice.sender,
                notice.kind,
                notice.group_id.as_ref(),
                &notice.payload,
                now,
                expires_at,
            )
        })
        .await
    }

    async fn ack(&self, recipient: &AccountId, ids: &[u64]) -> Result<usize> {
        let (recipient, ids) = (recipient.clone(), ids.to_vec());
        self.write(move |tx| {
            let mut delete = tx
                .prepare_cached("DELETE FROM mailbox WHERE id = ?1 AND recipient = ?2")
                .map_err(backend)?;
            let mut removed = 0;
            // IDs beyond SQLite's integer range name nothing stored.
            for id in ids.into_iter().filter(|id| i64::try_from(*id).is_ok()) {
                removed += delete
                    .execute(params![id, recipient.as_str()])
                    .map_err(backend)?;
            }
            Ok(removed)
        })
        .await
    }

    async fn expire(&self, now: Timestamp) -> Result<usize> {
        self.write(move |tx| {
            tx.execute("DELETE FROM mailbox WHERE expires_at <= ?1", [now])
                .map_err(backend)
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
    ) -> Result<Vec<(AccountId, Vec<AccountId>)>> {
        self.write(move |tx| {
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

    #[tokio::test]
    async fn sqlite_passes_the_conformance_suite() {
        crate::conformance::run_all(|| async {
            SqliteStore::open_in_memory().unwrap_or_else(|e| panic!("{e}"))
        })
        .await;
    }

    #[tokio::test]
    async fn a_file_database_survives_reopening() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let path = dir.path().join("umbra.db");
        let store = SqliteStore::open(&path).unwrap_or_else(|e| panic!("{e}"));
        crate::conformance::survives_reopen_part_one(&store).await;
        drop(store);
        let store = SqliteStore::open(&path).unwrap_or_else(|e| panic!("{e}"));
        crate::conformance::survives_reopen_part_two(&store).await;
    }
}
