//! Mailboxes in PostgreSQL: copies stored under each mailbox's head row,
//! read, acknowledged and expired.

use std::future::Future;

use async_trait::async_trait;
use deadpool_postgres::Transaction;
use umbra_proto::{AccountId, DeliveryKind, DeviceAddr, GroupId};

use super::queue::Work;
use super::{Failure, PgStore, big, device_addr, group_id, transaction, unsigned};
use crate::{Mailboxes, Notice, Result, StoreError, StoredDelivery, Timestamp};

type Tx<'a> = Transaction<'a>;

/// One delivery to store for several mailboxes.
pub(super) struct Copy<'a> {
    pub sender: Option<&'a AccountId>,
    pub kind: DeliveryKind,
    pub group: Option<&'a GroupId>,
    pub payload: &'a [u8],
    pub now: Timestamp,
    pub expires_at: Timestamp,
}

impl PgStore {
    /// Stores `copy` in the mailbox of each of `recipients` (distinct
    /// devices), each under its mailbox's next ID; returns the IDs in the
    /// order of `recipients`, `None` where an application message did not
    /// fit under the mailbox cap (the device gets, instead, one
    /// `MailboxFull` notice counting what it missed).
    ///
    /// The head rows are locked in sorted order and held to the end of the
    /// transaction: two transactions storing for the same mailbox take
    /// their IDs, and become visible, one after the other.
    pub(super) async fn store_copies(
        &self,
        tx: &Tx<'_>,
        recipients: &[DeviceAddr],
        copy: &Copy<'_>,
    ) -> std::result::Result<Vec<Option<u64>>, Failure> {
        if recipients.is_empty() {
            return Ok(Vec::new());
        }
        debug_assert!(
            {
                let mut seen: Vec<&DeviceAddr> = recipients.iter().collect();
                seen.sort();
                seen.windows(2).all(|pair| pair.first() != pair.last())
            },
            "recipients are distinct devices"
        );
        let accounts: Vec<&str> = recipients.iter().map(|r| r.account.as_str()).collect();
        let devices: Vec<i64> = recipients.iter().map(|r| i64::from(r.device.0)).collect();
        let size = big(copy.payload.len() as u64);
        let capped = copy.kind == DeliveryKind::Application && self.limits.mailbox_bytes > 0;
        let cap = big(self.limits.mailbox_bytes);
        // One statement: lock the open heads in sorted order, take each
        // an ID and add the size where the copy fits under the cap, and
        // store the copies under those IDs. Under READ COMMITTED the
        // locked rows are the latest versions (a head another transaction
        // moved meanwhile is read again), so the IDs are the heads' next.
        // Returns every open head, with its copy's ID or NULL where the
        // mailbox was full.
        let store = tx
            .prepare_cached(
                "WITH locked AS (
                     SELECT h.account_id, h.device, h.next_id, h.bytes
                     FROM mailbox_heads h
                     JOIN unnest($1::text[], $2::bigint[]) AS t(account_id, device)
                       ON h.account_id = t.account_id AND h.device = t.device
                     WHERE NOT h.closed
                     ORDER BY h.account_id, h.device
                     FOR UPDATE OF h
                 ), taken AS (
                     UPDATE mailbox_heads h SET next_id = l.next_id + 1, bytes = l.bytes + $3
                     FROM locked l
                     WHERE h.account_id = l.account_id AND h.device = l.device
                       AND NOT ($4 AND l.bytes + $3 > $5)
                     RETURNING h.account_id, h.device, l.next_id AS id
                 ), stored AS (
                     INSERT INTO mailbox (account_id, device, id, sender, kind, group_id,
                                          payload, sent_at, expires_at)
                     SELECT account_id, device, id, $6, $7, $8, $9, $10, $11 FROM taken
                     RETURNING account_id, device, id
                 )
                 SELECT l.account_id, l.device, s.id
                 FROM locked l LEFT JOIN stored s
                   ON s.account_id = l.account_id AND s.device = l.device",
            )
            .await?;
        let rows = tx
            .query(
                &store,
                &[
                    &accounts,
                    &devices,
                    &size,
                    &capped,
                    &cap,
                    &copy.sender.map(AccountId::as_str),
                    &(copy.kind as i32),
                    &copy.group.map(GroupId::as_bytes),
                    &copy.payload,
                    &big(copy.now),
                    &big(copy.expires_at),
                ],
            )
            .await?;
        let mut heads = std::collections::HashMap::with_capacity(rows.len());
        for row in rows {
            let address = device_addr(row.get(0), row.get(1))?;
            heads.insert(address, row.get::<_, Option<i64>>(2));
        }
        let mut ids = Vec::with_capacity(recipients.len());
        let mut full = Vec::new();
        for recipient in recipients {
            // Every current device has an open head row (opened with the
            // device); one without (removed or revoked, perhaps after this
            // transaction read it as current) is no mailbox to store in.
            match heads.get(recipient) {
                None => ids.push(None),
                Some(None) => {
                    full.push(recipient);
                    ids.push(None);
                }
                Some(Some(id)) => ids.push(Some(unsigned(*id)?)),
            }
        }
        for recipient in full {
            note_mailbox_full(tx, recipient, copy.now, copy.expires_at).await?;
        }
        Ok(ids)
    }
}

/// Tells `recipient`'s device that one more message was not kept because
/// its mailbox was full: one notice carrying the total since the device
/// last acknowledged one (a big-endian u64), under a new ID so that a
/// device which already read the previous one reads this one too. It
/// lives as long as the longest-lived copy it counts. (The embedded
/// store's rule, one message at a time.)
async fn note_mailbox_full(
    tx: &Tx<'_>,
    recipient: &DeviceAddr,
    now: Timestamp,
    expires_at: Timestamp,
) -> std::result::Result<(), Failure> {
    let (account, device) = (recipient.account.as_str(), i64::from(recipient.device.0));
    let earlier = tx.query_opt(DELETE_NOTICE, &[&account, &device]).await?;
    let (count, expires_at, freed) = match earlier {
        Some(row) => {
            let payload: Vec<u8> = row.get(0);
            let until: i64 = row.get(1);
            (
                notice_count(&payload),
                until.max(big(expires_at)),
                big(payload.len() as u64),
            )
        }
        None => (0, big(expires_at), 0),
    };
    let total = count.saturating_add(1).to_be_bytes();
    tx.execute(
        "WITH head AS (
             UPDATE mailbox_heads SET next_id = next_id + 1, bytes = bytes - $3 + $4
             WHERE account_id = $1 AND device = $2
             RETURNING next_id - 1 AS id
         )
         INSERT INTO mailbox (account_id, device, id, sender, kind, group_id, payload, sent_at,
                              expires_at)
         SELECT $1, $2, head.id, $1, $5, NULL, $6, $7, $8 FROM head",
        &[
            &account,
            &device,
            &freed,
            &big(total.len() as u64),
            &(DeliveryKind::MailboxFull as i32),
            &&total[..],
            &big(now),
            &expires_at,
        ],
    )
    .await?;
    Ok(())
}

/// The count a `MailboxFull` notice carries (0 for a payload that is no
/// count).
pub(super) fn notice_count(payload: &[u8]) -> u64 {
    <[u8; 8]>::try_from(payload).map_or(0, u64::from_be_bytes)
}

/// A device's `MailboxFull` notice.
#[derive(Clone, Copy)]
pub(super) struct FullNotice {
    pub id: i64,
    /// How many messages it counts.
    pub count: u64,
    pub sent_at: i64,
    pub expires_at: i64,
    /// Its payload's size.
    pub size: i64,
}

/// Reads a device's `MailboxFull` notice. The kind is written out, as the
/// partial index `mailbox_full_notices` names it: a full mailbox holds as
/// many copies as its cap allows, and a parameter would leave PostgreSQL's
/// generic plan reading them all.
pub(super) const STORED_NOTICE: &str = "SELECT id, payload, sent_at, expires_at FROM mailbox
                                        WHERE account_id = $1 AND device = $2 AND kind = 10";

/// Deletes a device's `MailboxFull` notice, returning it (the kind written
/// out, as in [`STORED_NOTICE`]).
pub(super) const DELETE_NOTICE: &str = "DELETE FROM mailbox
                                        WHERE account_id = $1 AND device = $2 AND kind = 10
                                        RETURNING payload, expires_at";
const _: () = assert!(DeliveryKind::MailboxFull as i32 == 10);

/// `device`'s `MailboxFull` notice as stored (there is one at most).
pub(super) async fn stored_notice(
    tx: &Tx<'_>,
    device: &DeviceAddr,
) -> std::result::Result<Option<FullNotice>, Failure> {
    let statement = tx.prepare_cached(STORED_NOTICE).await?;
    let row = tx
        .query_opt(
            &statement,
            &[&device.account.as_str(), &i64::from(device.device.0)],
        )
        .await?;
    Ok(row.map(|row| {
        let payload: &[u8] = row.get(1);
        FullNotice {
            id: row.get(0),
            count: notice_count(payload),
            sent_at: row.get(2),
            expires_at: row.get(3),
            size: big(payload.len() as u64),
        }
    }))
}

/// Locks the mailbox heads `filter` selects (a condition on
/// `mailbox_heads` with parameters `params`), in sorted order, to the end
/// of the transaction.
///
/// Every transaction that stores or deletes copies takes all the heads
/// it will touch this way, at once and before deleting any copy: two
/// transactions then never each hold a head (or a copy) the other waits
/// for. (Heads locked in two steps, or a copy deleted before its head is
/// locked, closed cycles PostgreSQL could only break by aborting one.)
pub(super) async fn lock_heads_where(
    tx: &Tx<'_>,
    filter: &'static str,
    params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
) -> std::result::Result<(), Failure> {
    let sql = format!(
        "SELECT 1 FROM mailbox_heads WHERE {filter} ORDER BY account_id, device FOR UPDATE"
    );
    let statement = tx.prepare_cached(&sql).await?;
    tx.query(&statement, params).await?;
    Ok(())
}

/// Locks the mailbox heads of `devices` (see [`lock_heads_where`]).
pub(super) async fn lock_heads_of(
    tx: &Tx<'_>,
    devices: &[&DeviceAddr],
) -> std::result::Result<(), Failure> {
    if devices.is_empty() {
        return Ok(());
    }
    let accounts: Vec<&str> = devices.iter().map(|d| d.account.as_str()).collect();
    let numbers: Vec<i64> = devices.iter().map(|d| i64::from(d.device.0)).collect();
    lock_heads_where(
        tx,
        "(account_id, device) IN (SELECT * FROM unnest($1::text[], $2::bigint[]))",
        &[&accounts, &numbers],
    )
    .await
}

/// Deletes the mailbox rows `filter` selects (a condition on `mailbox`
/// with parameters `params`) and takes their bytes off their mailboxes'
/// counts; returns how many it deleted. The caller has locked their
/// heads ([`lock_heads_where`]).
pub(super) async fn delete_mail(
    tx: &Tx<'_>,
    filter: &'static str,
    params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
) -> std::result::Result<u64, Failure> {
    let sql = format!(
        "WITH gone AS (
             DELETE FROM mailbox WHERE {filter}
             RETURNING account_id, device, octet_length(payload) AS n
         ), sums AS (
             SELECT account_id, device, SUM(n)::BIGINT AS s, COUNT(*) AS c
             FROM gone GROUP BY account_id, device
         ), counted AS (
             UPDATE mailbox_heads h SET bytes = GREATEST(h.bytes - sums.s, 0)
             FROM sums WHERE h.account_id = sums.account_id AND h.device = sums.device
         )
         SELECT COALESCE(SUM(c), 0)::BIGINT FROM sums"
    );
    let statement = tx.prepare_cached(&sql).await?;
    let deleted: i64 = tx.query_one(&statement, params).await?.get(0);
    Ok(unsigned(deleted)?)
}

/// Closes the mailboxes `filter` selects (a condition on
/// `mailbox_heads`: a device removed, a line revoked) and deletes what
/// they hold: nothing is stored in them after this transaction, even by
/// one that read the device as current before it. The caller has locked
/// their heads ([`lock_heads_where`]).
pub(super) async fn close_mailboxes(
    tx: &Tx<'_>,
    filter: &'static str,
    params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
) -> std::result::Result<(), Failure> {
    let sql = format!("UPDATE mailbox_heads SET closed = TRUE WHERE {filter}");
    tx.execute(&sql, params).await?;
    delete_mail(tx, filter, params).await?;
    Ok(())
}

/// Makes the mailbox of a device that just became current (its delivery
/// IDs start at 1; a head row kept from before goes on where it was).
pub(super) async fn open_mailbox(
    tx: &Tx<'_>,
    account: &AccountId,
    device: i64,
) -> std::result::Result<(), Failure> {
    let statement = tx
        .prepare_cached(
            "INSERT INTO mailbox_heads (account_id, device, next_id) VALUES ($1, $2, 1)
             ON CONFLICT (account_id, device) DO UPDATE SET closed = FALSE",
        )
        .await?;
    tx.execute(&statement, &[&account.as_str(), &device])
        .await?;
    Ok(())
}

/// `account`'s current devices, in order.
pub(super) async fn current_devices(
    tx: &Tx<'_>,
    account: &AccountId,
) -> std::result::Result<Vec<DeviceAddr>, Failure> {
    let statement = tx
        .prepare_cached("SELECT device FROM devices WHERE account_id = $1 ORDER BY device")
        .await?;
    let mut devices = Vec::new();
    for row in tx.query(&statement, &[&account.as_str()]).await? {
        devices.push(device_addr(account.as_str(), row.get(0))?);
    }
    Ok(devices)
}

pub(super) async fn is_current(
    tx: &Tx<'_>,
    device: &DeviceAddr,
) -> std::result::Result<bool, Failure> {
    let statement = tx
        .prepare_cached("SELECT 1 FROM devices WHERE account_id = $1 AND device = $2")
        .await?;
    Ok(tx
        .query_opt(
            &statement,
            &[&device.account.as_str(), &i64::from(device.device.0)],
        )
        .await?
        .is_some())
}

#[async_trait]
impl Mailboxes for PgStore {
    async fn pending(
        &self,
        recipient: &DeviceAddr,
        after: u64,
        limit: usize,
        now: Timestamp,
    ) -> Result<Vec<StoredDelivery>> {
        let limit = big(limit as u64);
        transaction!(read self, tx => {
            let statement = tx
                .prepare_cached(
                    "SELECT id, sender, kind, group_id, payload, sent_at FROM mailbox
                     WHERE account_id = $1 AND device = $2 AND id > $3 AND expires_at > $4
                     ORDER BY id LIMIT $5",
                )
                .await?;
            let rows = tx
                .query(
                    &statement,
                    &[
                        &recipient.account.as_str(),
                        &i64::from(recipient.device.0),
                        &big(after),
                        &big(now),
                        &limit,
                    ],
                )
                .await?;
            let mut held = Vec::with_capacity(rows.len());
            for row in rows {
                let kind: i32 = row.get(2);
                held.push(StoredDelivery {
                    id: unsigned(row.get(0))?,
                    sender: row
                        .get::<_, Option<&str>>(1)
                        .map(super::account_id)
                        .transpose()?,
                    kind: DeliveryKind::try_from(kind)
                        .map_err(|_| StoreError::Corrupt(format!("delivery kind {kind}")))?,
                    group_id: row.get::<_, Option<Vec<u8>>>(3).map(group_id).transpose()?,
                    payload: row.get(4),
                    sent_at: unsigned(row.get(5))?,
                });
            }
            Ok::<_, Failure>(held)
        })
    }

    async fn notice(
        &self,
        notice: Notice,
        now: Timestamp,
        expires_at: Timestamp,
    ) -> Result<Vec<(DeviceAddr, u64)>> {
        transaction!(self, tx => {
            let devices = match notice.device {
                Some(device) => {
                    let device = DeviceAddr::new(notice.recipient.clone(), device);
                    // A device removed meanwhile gets nothing.
                    if is_current(&tx, &device).await? { vec![device] } else { Vec::new() }
                }
                None => current_devices(&tx, &notice.recipient).await?,
            };
            let copy = Copy {
                sender: Some(&notice.sender),
                kind: notice.kind,
                group: notice.group_id.as_ref(),
                payload: &notice.payload,
                now,
                expires_at,
            };
            let ids = self.store_copies(&tx, &devices, &copy).await?;
            Ok::<_, Failure>(
                devices
                    .into_iter()
                    .zip(ids)
                    .filter_map(|(device, id)| Some((device, id?)))
                    .collect(),
            )
        })
    }

    fn dense_ids(&self) -> bool {
        true
    }

    fn away(&self) -> Option<tokio::sync::watch::Receiver<bool>> {
        Some(self.away.clone())
    }

    fn batching(&self) -> Option<crate::Batching> {
        self.queues.is_some().then(|| crate::Batching {
            fan_outs: self.fan_out_stats(),
            acks: self.ack_stats(),
        })
    }

    async fn depth(&self) -> Result<crate::MailboxDepth> {
        let (copies, bytes) = transaction!(read self, tx => {
            let row = tx
                .query_one(
                    "SELECT COUNT(*), COALESCE(SUM(octet_length(payload)), 0)::BIGINT FROM mailbox",
                    &[],
                )
                .await?;
            Ok::<_, Failure>((row.get::<_, i64>(0), row.get::<_, i64>(1)))
        })?;
        Ok(crate::MailboxDepth {
            copies: u64::try_from(copies).unwrap_or(0),
            bytes: u64::try_from(bytes).unwrap_or(0),
        })
    }

    async fn ack(&self, recipient: &DeviceAddr, ids: &[u64]) -> Result<usize> {
        // IDs beyond the column's range name nothing stored.
        let ids: Vec<i64> = ids
            .iter()
            .filter_map(|id| i64::try_from(*id).ok())
            .collect();
        if ids.is_empty() {
            return Ok(0);
        }
        let ack = Ack {
            recipient: recipient.clone(),
            ids,
        };
        match &self.queues {
            Some(queues) => queues.acks.run(ack).await,
            None => Ok(self
                .ack_batch(std::slice::from_ref(&ack))
                .await?
                .pop()
                .unwrap_or(0)),
        }
    }

    async fn expire(&self, now: Timestamp) -> Result<usize> {
        // In batches, each its own transaction: after a long stop the
        // backlog may be large, and one transaction would outlast its time
        // limit (and be rolled back) every time.
        let mut deleted = 0;
        loop {
            let (found, batch) = transaction!(self, tx => {
                let rows = tx
                    .query(
                        "SELECT account_id, device, id FROM mailbox WHERE expires_at <= $1
                         LIMIT $2",
                        &[&big(now), &big(EXPIRY_BATCH)],
                    )
                    .await?;
                let mut accounts = Vec::with_capacity(rows.len());
                let mut devices = Vec::with_capacity(rows.len());
                let mut ids = Vec::with_capacity(rows.len());
                for row in &rows {
                    accounts.push(row.get::<_, &str>(0));
                    devices.push(row.get::<_, i64>(1));
                    ids.push(row.get::<_, i64>(2));
                }
                // Their heads first (see `lock_heads_where`); a copy
                // acknowledged meanwhile is simply not there to delete.
                lock_heads_where(
                    &tx,
                    "(account_id, device) IN (SELECT * FROM unnest($1::text[], $2::bigint[]))",
                    &[&accounts, &devices],
                )
                .await?;
                let deleted = delete_mail(
                    &tx,
                    "(account_id, device, id) IN (
                         SELECT * FROM unnest($1::text[], $2::bigint[], $3::bigint[]))",
                    &[&accounts, &devices, &ids],
                )
                .await?;
                Ok::<_, Failure>((rows.len() as u64, deleted))
            })?;
            deleted += batch;
            if found < EXPIRY_BATCH {
                break;
            }
        }
        transaction!(self, tx => {
            tx.execute(
                "DELETE FROM group_commits WHERE committed_at <= $1",
                &[&big(now.saturating_sub(crate::COMMIT_HASH_LIFETIME))],
            )
            .await?;
            super::contacts::delete_contacts(
                &tx,
                "NOT accepted AND created_at <= $1",
                &[&big(now.saturating_sub(crate::CONTACT_REQUEST_LIFETIME))],
            )
            .await?;
            tx.execute(
                "DELETE FROM token_allowance WHERE day < $1",
                &[&big(now / crate::DAY)],
            )
            .await?;
            Ok::<_, Failure>(())
        })?;
        Ok(deleted as usize)
    }
}

/// Expired copies deleted per transaction by `expire`.
const EXPIRY_BATCH: u64 = 5000;

/// One device's acknowledgement of the copies it was handed.
pub(crate) struct Ack {
    recipient: DeviceAddr,
    ids: Vec<i64>,
}

impl Ack {
    /// `recipient`'s acknowledgement of the copies `ids` (as stored).
    pub(crate) fn new(recipient: DeviceAddr, ids: Vec<i64>) -> Self {
        Ack { recipient, ids }
    }
}

impl Work for Ack {
    type Outcome = usize;
    const NAME: &'static str = "acknowledgement";

    fn bytes(&self) -> usize {
        self.ids.len() * 8
    }

    fn run<'a>(
        store: &'a PgStore,
        batch: &'a [Self],
    ) -> impl Future<Output = Result<Vec<usize>>> + Send + 'a {
        store.ack_batch(batch)
    }
}

impl PgStore {
    /// Deletes what each of `acks` acknowledges, in one transaction; how
    /// many copies each deleted (a copy two of them name counts for the
    /// first). A lone acknowledgement runs as before batching.
    pub(crate) async fn ack_batch(&self, acks: &[Ack]) -> Result<Vec<usize>> {
        match acks {
            [] => Ok(Vec::new()),
            [ack] => {
                let deleted = transaction!(self, tx => {
                    let statement = tx.prepare_cached(ACK_ALONE).await?;
                    let row = tx
                        .query_one(
                            &statement,
                            &[
                                &ack.recipient.account.as_str(),
                                &i64::from(ack.recipient.device.0),
                                &ack.ids,
                            ],
                        )
                        .await?;
                    Ok::<_, Failure>(unsigned(row.get(0))?)
                })?;
                Ok(vec![deleted as usize])
            }
            several => transaction!(self, tx => ack_together(&tx, several).await),
        }
    }
}

/// A lone acknowledgement, in one statement (one round trip where a
/// lock and then a delete took two): the head is locked first, as every
/// transaction deleting copies locks it (see [`lock_heads_where`]). Its
/// lock is the delete's gate, a condition on no row, which PostgreSQL
/// evaluates once before the delete reads any copy; then the copies go and
/// their bytes come off the head's count.
pub(super) const ACK_ALONE: &str = "WITH head AS MATERIALIZED (
         SELECT 1 FROM mailbox_heads WHERE account_id = $1 AND device = $2 FOR UPDATE
     ), gone AS (
         DELETE FROM mailbox
         WHERE (SELECT COUNT(*) FROM head) >= 0
           AND account_id = $1 AND device = $2 AND id = ANY($3)
         RETURNING octet_length(payload) AS n
     ), counted AS (
         UPDATE mailbox_heads h SET bytes = GREATEST(h.bytes - (SELECT SUM(n) FROM gone), 0)
         WHERE h.account_id = $1 AND h.device = $2 AND EXISTS (SELECT 1 FROM gone)
     )
     SELECT COUNT(*) FROM gone";

/// Several acknowledgements in one transaction, in one statement as a
/// lone one ([`ACK_ALONE`]): their mailboxes' heads locked first, in
/// sorted order, as a fan-out batch locks them (before any copy is
/// deleted: a fan-out meeting a full mailbox deletes its notice while
/// holding the head, and an acknowledgement deleting that notice first
/// and then waiting for the head would close a cycle); then every copy
/// named is deleted and the byte counts lowered.
async fn ack_together(tx: &Tx<'_>, acks: &[Ack]) -> std::result::Result<Vec<usize>, Failure> {
    let mut recipients: Vec<&DeviceAddr> = acks.iter().map(|a| &a.recipient).collect();
    recipients.sort_unstable();
    recipients.dedup();
    let head_accounts: Vec<&str> = recipients.iter().map(|d| d.account.as_str()).collect();
    let head_devices: Vec<i64> = recipients.iter().map(|d| i64::from(d.device.0)).collect();
    let mut accounts = Vec::new();
    let mut devices = Vec::new();
    let mut ids = Vec::new();
    for ack in acks {
        for id in &ack.ids {
            accounts.push(ack.recipient.account.as_str());
            devices.push(i64::from(ack.recipient.device.0));
            ids.push(*id);
        }
    }
    let statement = tx.prepare_cached(ACKS_TOGETHER).await?;
    let mut counts = vec![0usize; acks.len()];
    let rows = tx
        .query(
            &statement,
            &[&head_accounts, &head_devices, &accounts, &devices, &ids],
        )
        .await?;
    for row in rows {
        let address = device_addr(row.get(0), row.get(1))?;
        let id: i64 = row.get(2);
        if let Some(n) = acks
            .iter()
            .position(|a| a.recipient == address && a.ids.contains(&id))
            && let Some(count) = counts.get_mut(n)
        {
            *count += 1;
        }
    }
    Ok(counts)
}

/// [`ack_together`]'s statement: the heads (`$1`, `$2`) locked in sorted
/// order, the gate of the delete as in [`ACK_ALONE`]; the copies (`$3`,
/// `$4`, `$5`) deleted, their bytes taken off their heads; the copies
/// deleted returned.
pub(super) const ACKS_TOGETHER: &str = "WITH heads AS MATERIALIZED (
         SELECT 1 FROM mailbox_heads
         WHERE (account_id, device) IN (SELECT * FROM unnest($1::text[], $2::bigint[]))
         ORDER BY account_id, device FOR UPDATE
     ), gone AS (
         DELETE FROM mailbox m
         USING unnest($3::text[], $4::bigint[], $5::bigint[]) AS t(account_id, device, id)
         WHERE (SELECT COUNT(*) FROM heads) >= 0
           AND m.account_id = t.account_id AND m.device = t.device AND m.id = t.id
         RETURNING m.account_id, m.device, m.id, octet_length(m.payload) AS n
     ), sums AS (
         SELECT account_id, device, SUM(n)::BIGINT AS n FROM gone GROUP BY account_id, device
     ), counted AS (
         UPDATE mailbox_heads h SET bytes = GREATEST(h.bytes - sums.n, 0)
         FROM sums WHERE h.account_id = sums.account_id AND h.device = sums.device
     )
     SELECT account_id, device, id FROM gone";
