//! Contacts and device logs in PostgreSQL.

use async_trait::async_trait;
use deadpool_postgres::Transaction;
use umbra_proto::{AccountId, DeliveryKind, DeviceAddr, DeviceChange, DeviceEntry, IdentityKey};

use super::accounts::add_device;
use super::groups::lock_groups_where;
use super::mailboxes::{Copy, close_mailboxes, current_devices, delete_mail, lock_heads_where};
use super::turns::{LINES_KEY_SHARED, lock_line};
use super::{Failure, PgStore, big, group_id, lock_key, transaction, unsigned};
use crate::{
    ContactAcceptOutcome, ContactRequestOutcome, Contacts, DeviceLogs, Result, StoreError,
    Timestamp,
};

type Tx<'a> = Transaction<'a>;

/// The row between `a` and `b`, in either direction: its requester,
/// whether accepted, and whether declined. With `lock`, the pair is
/// locked first (an advisory lock on the pair, whichever asks), so two
/// nodes handling requests between the same two lines take turns.
async fn contact_row(
    tx: &Tx<'_>,
    a: &AccountId,
    b: &AccountId,
    lock: bool,
) -> std::result::Result<Option<(String, bool, bool)>, Failure> {
    if lock {
        let (low, high) = if a.as_str() <= b.as_str() {
            (a, b)
        } else {
            (b, a)
        };
        let key = lock_key(&[
            b"contact",
            low.as_str().as_bytes(),
            high.as_str().as_bytes(),
        ]);
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&key])
            .await?;
    }
    let statement = tx
        .prepare_cached(
            "SELECT requester, accepted, declined FROM contacts
             WHERE (requester = $1 AND addressee = $2) OR (requester = $2 AND addressee = $1)",
        )
        .await?;
    Ok(tx
        .query_opt(&statement, &[&a.as_str(), &b.as_str()])
        .await?
        .map(|row| (row.get(0), row.get(1), row.get(2))))
}

/// Deletes the contacts `filter` selects (a condition on `contacts` with
/// parameters `params`), their rows locked in sorted order first: a
/// revocation and the sweep of old requests may delete the same rows, and
/// must not each hold one the other waits for.
pub(super) async fn delete_contacts(
    tx: &Tx<'_>,
    filter: &'static str,
    params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
) -> std::result::Result<(), Failure> {
    let sql = format!(
        "DELETE FROM contacts WHERE (requester, addressee) IN (
             SELECT requester, addressee FROM contacts WHERE {filter}
             ORDER BY requester, addressee FOR UPDATE)"
    );
    let statement = tx.prepare_cached(&sql).await?;
    tx.execute(&statement, params).await?;
    Ok(())
}

/// Locks the rows of lines `a` and `b` (their turns shared, then the rows
/// key-shared, in sorted order): a
/// contact's transaction takes them before anything else, as every
/// transaction takes lines first, so a revocation holding one is waited
/// for here rather than met half way (inserting a contact row takes them
/// anyway, for its foreign keys, after the pair's other row). Whether
/// both lines exist and are not revoked, as they are now.
async fn lock_pair(
    tx: &Tx<'_>,
    a: &AccountId,
    b: &AccountId,
) -> std::result::Result<bool, Failure> {
    let statement = tx.prepare_cached(&LINES_KEY_SHARED).await?;
    let rows = tx
        .query(&statement, &[&vec![a.as_str(), b.as_str()]])
        .await?;
    let live = rows
        .iter()
        .filter(|row| row.get::<_, &str>(0) != "revoked")
        .count();
    Ok(live == if a == b { 1 } else { 2 })
}

impl PgStore {
    /// Stores a contact notice from `from` for each current device of `to`.
    async fn tell_account(
        &self,
        tx: &Tx<'_>,
        to: &AccountId,
        from: &AccountId,
        kind: DeliveryKind,
        now: Timestamp,
        expires_at: Timestamp,
    ) -> std::result::Result<Vec<DeviceAddr>, Failure> {
        let devices = current_devices(tx, to).await?;
        let copy = Copy {
            sender: Some(from),
            kind,
            group: None,
            payload: &[],
            now,
            expires_at,
        };
        self.store_copies(tx, &devices, &copy).await?;
        Ok(devices)
    }
}

#[async_trait]
impl Contacts for PgStore {
    async fn request_contact(
        &self,
        from: &AccountId,
        to: &AccountId,
        now: Timestamp,
        expires_at: Timestamp,
    ) -> Result<(ContactRequestOutcome, Vec<DeviceAddr>)> {
        transaction!(self, tx => {
            // Checked again under the lines' locks: a revocation since the
            // caller looked deletes its line's contacts, and no request may
            // come after it.
            if !lock_pair(&tx, from, to).await? {
                return Ok((ContactRequestOutcome::LineGone, Vec::new()));
            }
            match contact_row(&tx, from, to, true).await? {
                Some((_, true, _)) => {
                    return Ok((ContactRequestOutcome::AlreadyContacts, Vec::new()));
                }
                // Pending, or declined: the same answer, and nothing sent.
                Some((requester, false, _)) if requester == from.as_str() => {
                    return Ok((ContactRequestOutcome::AlreadyRequested, Vec::new()));
                }
                // `from` had declined `to`'s request and now asks itself.
                Some((_, false, true)) => {
                    tx.execute(
                        "DELETE FROM contacts WHERE requester = $1 AND addressee = $2",
                        &[&to.as_str(), &from.as_str()],
                    )
                    .await?;
                }
                // `to` had asked `from` already: `from` accepts it instead.
                Some(_) => return Ok((ContactRequestOutcome::AlreadyRequested, Vec::new())),
                None => {}
            }
            tx.execute(
                "INSERT INTO contacts (requester, addressee, accepted, created_at)
                 VALUES ($1, $2, FALSE, $3)",
                &[&from.as_str(), &to.as_str(), &big(now)],
            )
            .await?;
            let told = self
                .tell_account(&tx, to, from, DeliveryKind::ContactRequest, now, expires_at)
                .await?;
            Ok::<_, Failure>((ContactRequestOutcome::Sent, told))
        })
    }

    async fn accept_contact(
        &self,
        acceptor: &AccountId,
        requester: &AccountId,
        now: Timestamp,
        expires_at: Timestamp,
    ) -> Result<(ContactAcceptOutcome, Vec<DeviceAddr>)> {
        transaction!(self, tx => {
            // Whether both lines are live is not needed here: a revocation
            // deletes its line's contacts, so the request read next (after
            // the lines' locks) is gone with the line.
            lock_pair(&tx, acceptor, requester).await?;
            match contact_row(&tx, acceptor, requester, true).await? {
                Some((_, true, _)) => {
                    return Ok((ContactAcceptOutcome::AlreadyContacts, Vec::new()));
                }
                Some((from, false, false)) if from == requester.as_str() => {}
                _ => return Ok((ContactAcceptOutcome::NoRequest, Vec::new())),
            }
            tx.execute(
                "UPDATE contacts SET accepted = TRUE WHERE requester = $1 AND addressee = $2",
                &[&requester.as_str(), &acceptor.as_str()],
            )
            .await?;
            let told = self
                .tell_account(
                    &tx,
                    requester,
                    acceptor,
                    DeliveryKind::ContactAccepted,
                    now,
                    expires_at,
                )
                .await?;
            Ok::<_, Failure>((ContactAcceptOutcome::Accepted, told))
        })
    }

    async fn are_contacts(&self, a: &AccountId, b: &AccountId) -> Result<bool> {
        transaction!(read self, tx => {
            Ok::<_, Failure>(matches!(
                contact_row(&tx, a, b, false).await?,
                Some((_, true, _))
            ))
        })
    }

    async fn decline_contact(&self, decliner: &AccountId, requester: &AccountId) -> Result<bool> {
        transaction!(self, tx => {
            // As in accepting: a revoked line's requests are gone already.
            lock_pair(&tx, decliner, requester).await?;
            contact_row(&tx, decliner, requester, true).await?;
            let declined = tx
                .execute(
                    "UPDATE contacts SET declined = TRUE
                     WHERE requester = $1 AND addressee = $2 AND NOT accepted AND NOT declined",
                    &[&requester.as_str(), &decliner.as_str()],
                )
                .await?;
            lock_heads_where(&tx, "account_id = $1", &[&decliner.as_str()]).await?;
            delete_mail(
                &tx,
                "account_id = $1 AND kind = $2 AND sender = $3",
                &[
                    &decliner.as_str(),
                    &(DeliveryKind::ContactRequest as i32),
                    &requester.as_str(),
                ],
            )
            .await?;
            Ok::<_, Failure>(declined > 0)
        })
    }

    async fn contact_requests_since(&self, from: &AccountId, since: Timestamp) -> Result<u64> {
        transaction!(read self, tx => {
            let row = tx
                .query_one(
                    "SELECT COUNT(*) FROM contacts WHERE requester = $1 AND created_at >= $2",
                    &[&from.as_str(), &big(since)],
                )
                .await?;
            Ok::<_, Failure>(unsigned(row.get(0))?)
        })
    }
}

#[async_trait]
impl DeviceLogs for PgStore {
    async fn device_log(&self, account: &AccountId, from: u64, limit: u32) -> Result<Vec<Vec<u8>>> {
        transaction!(read self, tx => {
            let rows = tx
                .query(
                    "SELECT entry FROM device_log WHERE account_id = $1 AND seq >= $2
                     ORDER BY seq LIMIT $3",
                    &[&account.as_str(), &big(from), &i64::from(limit)],
                )
                .await?;
            Ok::<_, Failure>(rows.iter().map(|row| row.get(0)).collect())
        })
    }

    async fn append_device_entry(
        &self,
        account: &AccountId,
        seq: u64,
        entry: &[u8],
        now: Timestamp,
        expires_at: Timestamp,
    ) -> Result<Option<Vec<DeviceAddr>>> {
        transaction!(self, tx => {
            // The account's row, locked (its turn first), orders appends
            // from several nodes.
            lock_line(&tx, account.as_str()).await?;
            let next: i64 = tx
                .query_one(
                    "SELECT COALESCE(MAX(seq) + 1, 0) FROM device_log WHERE account_id = $1",
                    &[&account.as_str()],
                )
                .await?
                .get(0);
            if Ok(next) != i64::try_from(seq) {
                return Ok(None);
            }
            tx.execute(
                "INSERT INTO device_log (account_id, seq, entry, appended_at)
                 VALUES ($1, $2, $3, $4)",
                &[&account.as_str(), &next, &entry, &big(now)],
            )
            .await?;
            let decoded = DeviceEntry::decode(entry)
                .map_err(|e| StoreError::Corrupt(format!("a device log entry: {e}")))?;
            let removed = match decoded.change {
                DeviceChange::Add { device, key, .. } => {
                    add_device(&tx, account, device, &key).await?;
                    return Ok(Some(Vec::new()));
                }
                DeviceChange::Remove { device } => device,
            };
            let device = i64::from(removed.0);
            // Its groups' rows first (the order every transaction locks
            // in: account, groups, mailboxes), so no message to them is
            // half way meanwhile. The members commit its leaf's removal on
            // the signed entry. It knows their delivery keys: nobody sends
            // anonymously with them meanwhile.
            let ids = lock_groups_where(
                &tx,
                "SELECT DISTINCT group_id FROM group_members WHERE account_id = $1 AND device = $2",
                &[&account.as_str(), &device],
            )
            .await?;
            // Then every mailbox head it touches, at once: the device's and
            // its groups' members' (see `lock_heads_where`).
            lock_heads_where(
                &tx,
                "(account_id, device) IN (
                     SELECT $1::text, $2::bigint
                     UNION SELECT account_id, device FROM group_members WHERE group_id = ANY($3))",
                &[&account.as_str(), &device, &ids],
            )
            .await?;
            tx.execute(
                "DELETE FROM devices WHERE account_id = $1 AND device = $2",
                &[&account.as_str(), &device],
            )
            .await?;
            close_mailboxes(&tx, "account_id = $1 AND device = $2", &[&account.as_str(), &device])
                .await?;
            let mut told = Vec::new();
            for group in ids {
                let group = group_id(group)?;
                tx.execute(
                    "UPDATE groups SET delivery_key = NULL WHERE group_id = $1",
                    &[&group.as_bytes()],
                )
                .await?;
                let members = super::groups::routable(&tx, &group).await?;
                let copy = Copy {
                    sender: Some(account),
                    kind: DeliveryKind::DeviceRemoved,
                    group: Some(&group),
                    payload: entry,
                    now,
                    expires_at,
                };
                self.store_copies(&tx, &members, &copy).await?;
                told.extend(members);
            }
            told.sort();
            told.dedup();
            Ok::<_, Failure>(Some(told))
        })
    }

    async fn device_entries_since(&self, account: &AccountId, since: Timestamp) -> Result<u64> {
        transaction!(read self, tx => {
            let row = tx
                .query_one(
                    "SELECT COUNT(*) FROM device_log WHERE account_id = $1 AND appended_at >= $2",
                    &[&account.as_str(), &big(since)],
                )
                .await?;
            Ok::<_, Failure>(unsigned(row.get(0))?)
        })
    }

    async fn devices(
        &self,
        account: &AccountId,
    ) -> Result<Vec<(umbra_proto::DeviceId, IdentityKey)>> {
        transaction!(read self, tx => {
            let rows = tx
                .query(
                    "SELECT device, device_key FROM devices WHERE account_id = $1 ORDER BY device",
                    &[&account.as_str()],
                )
                .await?;
            let mut devices = Vec::with_capacity(rows.len());
            for row in rows {
                let device: i64 = row.get(0);
                let key = IdentityKey::from_slice(row.get(1))
                    .map_err(|_| StoreError::Corrupt(format!("device {device}'s key")))?;
                let device = u32::try_from(device)
                    .map_err(|_| StoreError::Corrupt(format!("device number {device}")))?;
                devices.push((umbra_proto::DeviceId(device), key));
            }
            Ok::<_, Failure>(devices)
        })
    }
}
