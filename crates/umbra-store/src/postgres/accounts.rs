//! Lines in PostgreSQL: accounts and their codes, revocation, and the
//! distributors who sell them.

use async_trait::async_trait;
use deadpool_postgres::Transaction;
use tokio_postgres::Row;
use umbra_proto::{AccountId, DeliveryKind, DeviceAddr, DeviceId, IdentityKey};

use super::contacts::delete_contacts;
use super::groups::lock_groups_where;
use super::mailboxes::{
    Copy, close_mailboxes, current_devices, delete_mail, lock_heads_where, open_mailbox,
};
use super::turns::lock_line;
use super::{Failure, PgStore, account_id, big, group_id, transaction, unsigned};
use crate::{
    Account, Accounts, CodeHash, CodeKind, DAY, Distributor, Distributors, LineStatus, Notice,
    Registration, Renewal, Result, StoreError, Timestamp,
};

type Tx<'a> = Transaction<'a>;

/// An account's row locked to change it (see [`account_row`]).
static LINE_ALONE: std::sync::LazyLock<String> =
    std::sync::LazyLock::new(|| super::turns::line_alone(ACCOUNT_COLUMNS, "UPDATE"));

const ACCOUNT_COLUMNS: &str = "account_id, identity_key, created_at, subscription_expires_at,
     wipe_key, status, distributor_id, last_seen_day, last_wipe_command";

fn account_from(row: &Row) -> Result<Account> {
    let corrupt = |e: umbra_proto::DecodeError| StoreError::Corrupt(e.to_string());
    let status: &str = row.get(5);
    Ok(Account {
        id: account_id(row.get(0))?,
        identity_key: IdentityKey::from_slice(row.get(1)).map_err(corrupt)?,
        created_at: unsigned(row.get(2))?,
        subscription_expires_at: unsigned(row.get(3))?,
        wipe_key: row
            .get::<_, Option<&[u8]>>(4)
            .map(|k| IdentityKey::from_slice(k).map_err(corrupt))
            .transpose()?,
        status: LineStatus::parse(status)
            .ok_or_else(|| StoreError::Corrupt(format!("line status {status:?}")))?,
        distributor: row.get::<_, Option<i64>>(6).map(unsigned).transpose()?,
        last_seen_day: row.get::<_, Option<i64>>(7).map(unsigned).transpose()?,
        last_wipe_command: row.get(8),
    })
}

/// `id`'s account; with `lock`, its turn taken alone and its row locked
/// to the end of the transaction.
pub(super) async fn account_row(
    tx: &Tx<'_>,
    id: &AccountId,
    lock: bool,
) -> std::result::Result<Option<Account>, Failure> {
    let statement = if lock {
        tx.prepare_cached(&LINE_ALONE).await?
    } else {
        tx.prepare_cached(&format!(
            "SELECT {ACCOUNT_COLUMNS} FROM accounts WHERE account_id = $1"
        ))
        .await?
    };
    match tx.query_opt(&statement, &[&id.as_str()]).await? {
        Some(row) => Ok(Some(account_from(&row)?)),
        None => Ok(None),
    }
}

/// Records `device` of `account` as current (or its new key), with its
/// mailbox.
pub(super) async fn add_device(
    tx: &Tx<'_>,
    account: &AccountId,
    device: DeviceId,
    key: &IdentityKey,
) -> std::result::Result<(), Failure> {
    let device = i64::from(device.0);
    tx.execute(
        "INSERT INTO devices (account_id, device, device_key) VALUES ($1, $2, $3)
         ON CONFLICT (account_id, device) DO UPDATE SET device_key = excluded.device_key",
        &[&account.as_str(), &device, &&key.as_bytes()[..]],
    )
    .await?;
    open_mailbox(tx, account, device).await
}

async fn insert_codes(
    tx: &Tx<'_>,
    codes: &[CodeHash],
    kind: CodeKind,
    days: u32,
    distributor: Option<u64>,
    now: Timestamp,
) -> std::result::Result<(), Failure> {
    let hashes: Vec<&[u8]> = codes.iter().map(|c| &c.0[..]).collect();
    tx.execute(
        "INSERT INTO activation_codes (code_hash, days, issued_at, kind, distributor_id)
         SELECT h, $2, $3, $4, $5 FROM unnest($1::bytea[]) AS t(h)",
        &[
            &hashes,
            &i64::from(days),
            &big(now),
            &kind.as_str(),
            &distributor.map(big),
        ],
    )
    .await?;
    Ok(())
}

#[async_trait]
impl Accounts for PgStore {
    async fn issue_codes(&self, codes: &[CodeHash], days: u32, now: Timestamp) -> Result<()> {
        transaction!(self, tx => {
            tx.execute(
                "INSERT INTO activation_codes (code_hash, days, issued_at)
                 SELECT h, $2, $3 FROM unnest($1::bytea[]) AS t(h)",
                &[
                    &codes.iter().map(|c| &c.0[..]).collect::<Vec<_>>(),
                    &i64::from(days),
                    &big(now),
                ],
            )
            .await?;
            Ok::<_, Failure>(())
        })
    }

    async fn register(
        &self,
        code: CodeHash,
        id: &AccountId,
        identity_key: &IdentityKey,
        now: Timestamp,
    ) -> Result<Registration> {
        transaction!(self, tx => {
            // Locked: a second redemption of the code waits, then finds it
            // used.
            let row = tx
                .query_opt(
                    "SELECT days, used_by, distributor_id FROM activation_codes
                     WHERE code_hash = $1 AND kind = 'activation' FOR UPDATE",
                    &[&&code.0[..]],
                )
                .await?;
            let Some(row) = row else {
                return Ok(Registration::UnknownCode);
            };
            if row.get::<_, Option<&str>>(1).is_some() {
                return Ok(Registration::CodeUsed);
            }
            let days = unsigned(row.get(0))?;
            let distributor = row.get::<_, Option<i64>>(2).map(unsigned).transpose()?;
            let id_taken = tx
                .query_opt("SELECT 1 FROM accounts WHERE account_id = $1", &[&id.as_str()])
                .await?
                .is_some();
            if id_taken {
                return Ok(Registration::IdTaken);
            }
            let key_taken = tx
                .query_opt(
                    "SELECT 1 FROM accounts WHERE identity_key = $1",
                    &[&&identity_key.as_bytes()[..]],
                )
                .await?
                .is_some();
            if key_taken {
                return Ok(Registration::KeyTaken);
            }
            // Another node registering the same ID or key at this moment
            // makes one insert fail on the unique key; run again, this
            // transaction answers `IdTaken` or `KeyTaken`.
            let expires = now + days * DAY;
            tx.execute(
                "INSERT INTO accounts (account_id, identity_key, created_at,
                                       subscription_expires_at, distributor_id)
                 VALUES ($1, $2, $3, $4, $5)",
                &[
                    &id.as_str(),
                    &&identity_key.as_bytes()[..],
                    &big(now),
                    &big(expires),
                    &distributor.map(big),
                ],
            )
            .await?;
            tx.execute(
                "UPDATE activation_codes SET used_by = $1, used_at = $2 WHERE code_hash = $3",
                &[&id.as_str(), &big(now), &&code.0[..]],
            )
            .await?;
            add_device(&tx, id, DeviceId::FIRST, identity_key).await?;
            Ok::<_, Failure>(Registration::Registered(Account {
                id: id.clone(),
                identity_key: *identity_key,
                created_at: now,
                subscription_expires_at: expires,
                wipe_key: None,
                status: LineStatus::Active,
                distributor,
                last_seen_day: None,
                last_wipe_command: None,
            }))
        })
    }

    async fn account(&self, id: &AccountId) -> Result<Option<Account>> {
        transaction!(read self, tx => account_row(&tx, id, false).await)
    }

    async fn set_wipe_key(&self, id: &AccountId, key: &IdentityKey) -> Result<()> {
        transaction!(self, tx => {
            lock_line(&tx, id.as_str()).await?;
            tx.execute(
                "UPDATE accounts SET wipe_key = $2 WHERE account_id = $1 AND wipe_key IS NULL",
                &[&id.as_str(), &&key.as_bytes()[..]],
            )
            .await?;
            Ok::<_, Failure>(())
        })
    }

    async fn queue_wipe_command(
        &self,
        notice: Notice,
        issued_at: u64,
        now: Timestamp,
        expires_at: Timestamp,
    ) -> Result<Option<Vec<DeviceAddr>>> {
        let Ok(issued_at) = i64::try_from(issued_at) else {
            return Ok(None);
        };
        transaction!(self, tx => {
            // The line's turn first: a stolen device sending from many
            // connections must not hold its own wipe off.
            lock_line(&tx, notice.recipient.as_str()).await?;
            let newer = tx
                .execute(
                    "UPDATE accounts SET last_wipe_issued_at = $2, last_wipe_command = $3
                     WHERE account_id = $1
                       AND (last_wipe_issued_at IS NULL OR last_wipe_issued_at < $2)",
                    &[&notice.recipient.as_str(), &issued_at, &notice.payload],
                )
                .await?;
            if newer != 1 {
                return Ok(None);
            }
            // One waiting command is enough: the newer replaces any still
            // waiting, so they cannot pile up. The account's heads first
            // (see `lock_heads_where`).
            lock_heads_where(&tx, "account_id = $1", &[&notice.recipient.as_str()]).await?;
            delete_mail(
                &tx,
                "account_id = $1 AND kind = $2",
                &[&notice.recipient.as_str(), &(notice.kind as i32)],
            )
            .await?;
            let devices = current_devices(&tx, &notice.recipient).await?;
            let copy = Copy {
                sender: Some(&notice.sender),
                kind: notice.kind,
                group: notice.group_id.as_ref(),
                payload: &notice.payload,
                now,
                expires_at,
            };
            self.store_copies(&tx, &devices, &copy).await?;
            Ok::<_, Failure>(Some(devices))
        })
    }

    async fn touch(&self, id: &AccountId, day: u64) -> Result<()> {
        transaction!(self, tx => {
            lock_line(&tx, id.as_str()).await?;
            tx.execute(
                "UPDATE accounts SET last_seen_day = $2 WHERE account_id = $1",
                &[&id.as_str(), &big(day)],
            )
            .await?;
            Ok::<_, Failure>(())
        })
    }

    async fn revoke(
        &self,
        id: &AccountId,
        proof: Option<&umbra_proto::Signature>,
        now: Timestamp,
        expires_at: Timestamp,
    ) -> Result<Vec<DeviceAddr>> {
        let mut notice = id.as_str().as_bytes().to_vec();
        if let Some(proof) = proof {
            notice.extend_from_slice(proof.as_bytes());
        }
        transaction!(self, tx => self.revoke_in(&tx, id, &notice, now, expires_at).await)
    }
}

impl PgStore {
    /// Ends a line inside an open transaction (see [`Accounts::revoke`]).
    async fn revoke_in(
        &self,
        tx: &Tx<'_>,
        id: &AccountId,
        notice: &[u8],
        now: Timestamp,
        expires_at: Timestamp,
    ) -> std::result::Result<Vec<DeviceAddr>, Failure> {
        // The line's row first (a renewal or another revocation waits),
        // then its groups' rows in order (so no commit moves them
        // meanwhile), then its contacts (before any mailbox head: a
        // contact's acceptance holds its row while it stores a notice),
        // then every mailbox head it touches at once: its own and its
        // groups' members' (see `lock_heads_where`).
        if account_row(tx, id, true).await?.is_none() {
            return Ok(Vec::new());
        }
        let ids = lock_groups_where(
            tx,
            "SELECT DISTINCT group_id FROM group_members WHERE account_id = $1",
            &[&id.as_str()],
        )
        .await?;
        delete_contacts(tx, "requester = $1 OR addressee = $1", &[&id.as_str()]).await?;
        lock_heads_where(
            tx,
            "(account_id, device) IN (
                 SELECT account_id, device FROM mailbox_heads WHERE account_id = $1
                 UNION SELECT account_id, device FROM group_members WHERE group_id = ANY($2))",
            &[&id.as_str(), &ids],
        )
        .await?;
        let mut told = Vec::new();
        for group in ids {
            let group = group_id(group)?;
            tx.execute(
                "DELETE FROM group_members WHERE group_id = $1 AND account_id = $2",
                &[&group.as_bytes(), &id.as_str()],
            )
            .await?;
            // The line's devices know the epoch's delivery key: nobody
            // sends anonymously with it once they are out.
            tx.execute(
                "UPDATE groups SET delivery_key = NULL WHERE group_id = $1",
                &[&group.as_bytes()],
            )
            .await?;
            let members = super::groups::routable(tx, &group).await?;
            let copy = Copy {
                sender: Some(id),
                kind: DeliveryKind::MemberRevoked,
                group: Some(&group),
                payload: notice,
                now,
                expires_at,
            };
            self.store_copies(tx, &members, &copy).await?;
            told.extend(members);
        }
        close_mailboxes(tx, "account_id = $1", &[&id.as_str()]).await?;
        for sql in [
            "DELETE FROM devices WHERE account_id = $1",
            "DELETE FROM key_packages WHERE account_id = $1",
            "DELETE FROM last_resort_key_packages WHERE account_id = $1",
            "DELETE FROM device_log WHERE account_id = $1",
            "UPDATE accounts SET status = 'revoked', wipe_key = NULL WHERE account_id = $1",
        ] {
            tx.execute(sql, &[&id.as_str()]).await?;
        }
        told.sort();
        told.dedup();
        Ok(told)
    }
}

async fn lapsed(tx: &Tx<'_>, cutoff: Timestamp) -> std::result::Result<Vec<AccountId>, Failure> {
    let rows = tx
        .query(
            "SELECT account_id FROM accounts
             WHERE subscription_expires_at < $1 AND status <> 'revoked' ORDER BY account_id",
            &[&big(cutoff)],
        )
        .await?;
    let mut ids = Vec::with_capacity(rows.len());
    for row in rows {
        ids.push(account_id(row.get(0))?);
    }
    Ok(ids)
}

#[async_trait]
impl Distributors for PgStore {
    async fn add_distributor(
        &self,
        name: &str,
        public_key: &IdentityKey,
        quota: u32,
        now: Timestamp,
    ) -> Result<Option<u64>> {
        transaction!(self, tx => {
            let row = tx
                .query_opt(
                    "INSERT INTO distributors (name, public_key, quota, created_at)
                     VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING RETURNING id",
                    &[&name, &&public_key.as_bytes()[..], &i64::from(quota), &big(now)],
                )
                .await?;
            Ok::<_, Failure>(row.map(|row| unsigned(row.get(0))).transpose()?)
        })
    }

    async fn distributors(&self) -> Result<Vec<Distributor>> {
        transaction!(read self, tx => {
            let rows = tx
                .query("SELECT id, name, public_key, quota FROM distributors ORDER BY id", &[])
                .await?;
            let mut all = Vec::with_capacity(rows.len());
            for row in rows {
                all.push(Distributor {
                    id: unsigned(row.get(0))?,
                    name: row.get(1),
                    public_key: IdentityKey::from_slice(row.get(2))
                        .map_err(|e| StoreError::Corrupt(e.to_string()))?,
                    quota: u32::try_from(row.get::<_, i64>(3))
                        .map_err(|_| StoreError::Corrupt("a distributor's quota".into()))?,
                });
            }
            Ok::<_, Failure>(all)
        })
    }

    async fn issue_distributor_codes(
        &self,
        distributor: u64,
        codes: &[CodeHash],
        kind: CodeKind,
        days: u32,
        now: Timestamp,
    ) -> Result<bool> {
        transaction!(self, tx => {
            let taken = tx
                .execute(
                    "UPDATE distributors SET quota = quota - $2 WHERE id = $1 AND quota >= $2",
                    &[&big(distributor), &big(codes.len() as u64)],
                )
                .await?;
            if taken == 0 {
                return Ok(false);
            }
            insert_codes(&tx, codes, kind, days, Some(distributor), now).await?;
            Ok::<_, Failure>(true)
        })
    }

    async fn issue_renewal_codes(
        &self,
        codes: &[CodeHash],
        days: u32,
        now: Timestamp,
    ) -> Result<()> {
        transaction!(self, tx => insert_codes(&tx, codes, CodeKind::Renewal, days, None, now).await)
    }

    async fn lines(&self, distributor: u64) -> Result<Vec<Account>> {
        transaction!(read self, tx => {
            let sql = format!(
                "SELECT {ACCOUNT_COLUMNS} FROM accounts WHERE distributor_id = $1
                 ORDER BY account_id"
            );
            let rows = tx.query(&sql, &[&big(distributor)]).await?;
            let mut lines = Vec::with_capacity(rows.len());
            for row in &rows {
                lines.push(account_from(row)?);
            }
            Ok::<_, Failure>(lines)
        })
    }

    async fn set_line_status(&self, account: &AccountId, status: LineStatus) -> Result<()> {
        transaction!(self, tx => {
            lock_line(&tx, account.as_str()).await?;
            tx.execute(
                "UPDATE accounts SET status = $2 WHERE account_id = $1 AND status <> 'revoked'",
                &[&account.as_str(), &status.as_str()],
            )
            .await?;
            Ok::<_, Failure>(())
        })
    }

    async fn redeem_renewal(
        &self,
        account: &AccountId,
        code: CodeHash,
        now: Timestamp,
    ) -> Result<Renewal> {
        transaction!(self, tx => {
            let row = tx
                .query_opt(
                    "SELECT days, used_by, distributor_id FROM activation_codes
                     WHERE code_hash = $1 AND kind = 'renewal' FOR UPDATE",
                    &[&&code.0[..]],
                )
                .await?;
            let Some(row) = row else {
                return Ok(Renewal::UnknownCode);
            };
            if row.get::<_, Option<&str>>(1).is_some() {
                return Ok(Renewal::CodeUsed);
            }
            let days = unsigned(row.get(0))?;
            let code_distributor = row.get::<_, Option<i64>>(2).map(unsigned).transpose()?;
            let Some(line) = account_row(&tx, account, true).await? else {
                return Ok(Renewal::UnknownCode);
            };
            if code_distributor.is_some() && code_distributor != line.distributor {
                return Ok(Renewal::WrongDistributor);
            }
            let expires = line.subscription_expires_at.max(now) + days * DAY;
            tx.execute(
                "UPDATE accounts SET subscription_expires_at = $2 WHERE account_id = $1",
                &[&account.as_str(), &big(expires)],
            )
            .await?;
            tx.execute(
                "UPDATE activation_codes SET used_by = $1, used_at = $2 WHERE code_hash = $3",
                &[&account.as_str(), &big(now), &&code.0[..]],
            )
            .await?;
            Ok::<_, Failure>(Renewal::Renewed {
                subscription_expires_at: expires,
            })
        })
    }

    async fn lapsed_lines(&self, cutoff: Timestamp) -> Result<Vec<AccountId>> {
        transaction!(read self, tx => lapsed(&tx, cutoff).await)
    }

    async fn revoke_lapsed(
        &self,
        cutoff: Timestamp,
        now: Timestamp,
        expires_at: Timestamp,
    ) -> Result<Vec<(AccountId, Vec<DeviceAddr>)>> {
        // Each line in a transaction of its own: one revocation takes the
        // line, its groups, its contacts and then the mailbox heads it
        // touches, and a second in the same transaction would take a line
        // and groups after heads, against every other transaction's order.
        // A line that cannot be revoked now (the database away, a lock
        // not granted in time) waits for the next sweep; the lines after
        // it are not held back, and those ended are reported.
        let mut ended = Vec::new();
        let mut failed = None;
        for id in self.lapsed_lines(cutoff).await? {
            let told = transaction!(self, tx => {
                // Locked and read again: a renewal that committed meanwhile
                // keeps the line.
                match account_row(&tx, &id, true).await? {
                    Some(line)
                        if line.subscription_expires_at < cutoff
                            && line.status != LineStatus::Revoked => {}
                    _ => return Ok(None),
                }
                let told = self
                    .revoke_in(&tx, &id, id.as_str().as_bytes(), now, expires_at)
                    .await?;
                Ok::<_, Failure>(Some(told))
            });
            match told {
                Ok(Some(told)) => ended.push((id, told)),
                Ok(None) => {}
                Err(error) => {
                    tracing::warn!(%error, "a lapsed line was not revoked; the next sweep tries again");
                    failed.get_or_insert(error);
                }
            }
        }
        match failed {
            Some(error) if ended.is_empty() => Err(error),
            _ => Ok(ended),
        }
    }
}
