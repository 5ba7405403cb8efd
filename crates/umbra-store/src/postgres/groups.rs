//! Groups in PostgreSQL: one commit per epoch under the group's row lock,
//! and fan-out to the members' mailboxes.

use std::collections::HashMap;

use async_trait::async_trait;
use deadpool_postgres::Transaction;
use umbra_proto::tokens::DELIVERY_KEY_BYTES;
use umbra_proto::{AccountId, DeliveryKind, DeviceAddr, GroupId};

use super::batch::FanOut;
use super::mailboxes::{Copy, is_current, lock_heads_of};
use super::turns::{LINE_SHARED, LINES_SHARED, Turn, turns};
use super::{Failure, PgStore, big, device_addr, transaction, unsigned};
use crate::Sender;
use crate::{
    CommitOutcome, CommitRecord, Durable, FanOutOutcome, GroupState, Groups, LineStatus, Result,
    StoredDelivery, Timestamp,
};

type Tx<'a> = Transaction<'a>;

async fn leaves(
    tx: &Tx<'_>,
    group: &GroupId,
    sql: &str,
) -> std::result::Result<Vec<DeviceAddr>, Failure> {
    let statement = tx.prepare_cached(sql).await?;
    let mut leaves = Vec::new();
    for row in tx.query(&statement, &[&group.as_bytes()]).await? {
        leaves.push(device_addr(row.get(0), row.get(1))?);
    }
    Ok(leaves)
}

/// Leaves as the two arrays (accounts, devices) a statement unnests.
fn columns(list: &[DeviceAddr]) -> (Vec<&str>, Vec<i64>) {
    (
        list.iter().map(|l| l.account.as_str()).collect(),
        list.iter().map(|l| i64::from(l.device.0)).collect(),
    )
}

/// Every leaf of the group, ordered by account and device.
async fn members(tx: &Tx<'_>, group: &GroupId) -> std::result::Result<Vec<DeviceAddr>, Failure> {
    leaves(
        tx,
        group,
        "SELECT account_id, device FROM group_members WHERE group_id = $1
         ORDER BY account_id, device",
    )
    .await
}

/// The leaves a delivery to the group goes to: those of devices still
/// current in their account.
pub(super) async fn routable(
    tx: &Tx<'_>,
    group: &GroupId,
) -> std::result::Result<Vec<DeviceAddr>, Failure> {
    leaves(
        tx,
        group,
        "SELECT m.account_id, m.device FROM group_members m
         JOIN devices d ON d.account_id = m.account_id AND d.device = m.device
         WHERE m.group_id = $1 ORDER BY m.account_id, m.device",
    )
    .await
}

/// A commit's or proposal's read of its group (see [`epoch`]).
pub(super) static EPOCH: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    format!(
        "WITH {} SELECT epoch FROM groups
         WHERE (SELECT COUNT(*) FROM turns) >= 0 AND group_id = $1 FOR UPDATE",
        turns(Turn::Group, "SELECT $1::bytea AS group_id", false)
    )
});
/// A fan-out's read of its group (see [`epoch_and_key`]).
static EPOCH_AND_KEY: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    format!(
        "WITH {} SELECT epoch, delivery_key FROM groups
         WHERE (SELECT COUNT(*) FROM turns) >= 0 AND group_id = $1 FOR SHARE",
        turns(Turn::Group, "SELECT $1::bytea AS group_id", true)
    )
});
/// A group's row shared by a blob's creation (it must not hold a
/// waiting commit off either: any line may name any group here).
pub(super) static GROUP_SHARED: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    format!(
        "WITH {} SELECT 1 FROM groups
         WHERE (SELECT COUNT(*) FROM turns) >= 0 AND group_id = $1 FOR SHARE",
        turns(Turn::Group, "SELECT $1::bytea AS group_id", true)
    )
});
/// A fan-out batch's read of its groups (`$1`, distinct).
pub(super) static GROUPS_SHARED: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    format!(
        "WITH {} SELECT group_id, epoch, delivery_key FROM groups
         WHERE (SELECT COUNT(*) FROM turns) >= 0 AND group_id = ANY($1::bytea[])
         ORDER BY group_id FOR SHARE",
        turns(Turn::Group, "SELECT unnest($1::bytea[]) AS group_id", true)
    )
});

/// Locks the groups `mine` selects (a query yielding `group_id`, with
/// parameters `params`): their turns alone, then their rows, sorted, to
/// the end of the transaction; returns their IDs. What a revocation or a
/// device's removal takes before it changes the groups' members.
pub(super) async fn lock_groups_where(
    tx: &Tx<'_>,
    mine: &'static str,
    params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
) -> std::result::Result<Vec<Vec<u8>>, Failure> {
    let sql = format!(
        "WITH mine AS MATERIALIZED ({mine}), {}
         SELECT g.group_id FROM groups g
         WHERE (SELECT COUNT(*) FROM turns) >= 0 AND g.group_id IN (SELECT group_id FROM mine)
         ORDER BY g.group_id FOR UPDATE",
        turns(Turn::Group, "SELECT group_id FROM mine", false)
    );
    let statement = tx.prepare_cached(&sql).await?;
    Ok(tx
        .query(&statement, params)
        .await?
        .iter()
        .map(|row| row.get(0))
        .collect())
}

/// The group's epoch, its row locked to the end of the transaction to
/// move it (a commit, a proposal), its turn taken first; `None` for no
/// such group.
async fn epoch(tx: &Tx<'_>, group: &GroupId) -> std::result::Result<Option<u64>, Failure> {
    let statement = tx.prepare_cached(&EPOCH).await?;
    match tx.query_opt(&statement, &[&group.as_bytes()]).await? {
        Some(row) => Ok(Some(unsigned(row.get(0))?)),
        None => Ok(None),
    }
}

/// The group's epoch and delivery key, its row locked shared to the end
/// of the transaction (beside other readers: no commit moves the epoch
/// meanwhile; a fan-out), its turn shared first; `None` for no such
/// group.
async fn epoch_and_key(
    tx: &Tx<'_>,
    group: &GroupId,
) -> std::result::Result<Option<(u64, Option<Vec<u8>>)>, Failure> {
    let statement = tx.prepare_cached(&EPOCH_AND_KEY).await?;
    match tx.query_opt(&statement, &[&group.as_bytes()]).await? {
        Some(row) => Ok(Some((unsigned(row.get(0))?, row.get(1)))),
        None => Ok(None),
    }
}

async fn is_member(
    tx: &Tx<'_>,
    group: &GroupId,
    leaf: &DeviceAddr,
) -> std::result::Result<bool, Failure> {
    let statement = tx
        .prepare_cached(
            "SELECT 1 FROM group_members WHERE group_id = $1 AND account_id = $2 AND device = $3",
        )
        .await?;
    Ok(tx
        .query_opt(
            &statement,
            &[
                &group.as_bytes(),
                &leaf.account.as_str(),
                &i64::from(leaf.device.0),
            ],
        )
        .await?
        .is_some())
}

/// The first of `devices` that is not one of its account's current
/// devices, if any (one statement).
async fn first_former(
    tx: &Tx<'_>,
    devices: &[DeviceAddr],
) -> std::result::Result<Option<DeviceAddr>, Failure> {
    if devices.is_empty() {
        return Ok(None);
    }
    let (accounts, numbers) = columns(devices);
    let statement = tx
        .prepare_cached(
            "SELECT t.a, t.d FROM unnest($1::text[], $2::bigint[]) WITH ORDINALITY AS t(a, d, n)
             WHERE NOT EXISTS (SELECT 1 FROM devices WHERE account_id = t.a AND device = t.d)
             ORDER BY t.n LIMIT 1",
        )
        .await?;
    match tx.query_opt(&statement, &[&accounts, &numbers]).await? {
        Some(row) => Ok(Some(device_addr(row.get(0), row.get(1))?)),
        None => Ok(None),
    }
}

/// The lines of `accounts` (distinct) that exist, as [`line`] reads one,
/// their turns shared and then their rows locked (shared) in sorted order
/// to the end of the transaction.
pub(super) async fn lock_lines(
    tx: &Tx<'_>,
    accounts: &[&str],
) -> std::result::Result<HashMap<String, (LineStatus, u64)>, Failure> {
    let mut lines = HashMap::with_capacity(accounts.len());
    if accounts.is_empty() {
        return Ok(lines);
    }
    let statement = tx.prepare_cached(&LINES_SHARED).await?;
    for row in tx.query(&statement, &[&accounts]).await? {
        let status: &str = row.get(1);
        let status = LineStatus::parse(status)
            .ok_or_else(|| crate::StoreError::Corrupt(format!("line status {status:?}")))?;
        lines.insert(row.get::<_, String>(0), (status, unsigned(row.get(2))?));
    }
    Ok(lines)
}

/// [`routable`] for each of `groups`: a group with no routable leaf has
/// no entry.
pub(super) async fn routable_in(
    tx: &Tx<'_>,
    groups: &[&[u8]],
) -> std::result::Result<HashMap<Vec<u8>, Vec<DeviceAddr>>, Failure> {
    let mut members: HashMap<Vec<u8>, Vec<DeviceAddr>> = HashMap::with_capacity(groups.len());
    if groups.is_empty() {
        return Ok(members);
    }
    let statement = tx
        .prepare_cached(
            "SELECT m.group_id, m.account_id, m.device FROM group_members m
             JOIN devices d ON d.account_id = m.account_id AND d.device = m.device
             WHERE m.group_id = ANY($1::bytea[]) ORDER BY m.group_id, m.account_id, m.device",
        )
        .await?;
    for row in tx.query(&statement, &[&groups]).await? {
        members
            .entry(row.get(0))
            .or_default()
            .push(device_addr(row.get(1), row.get(2))?);
    }
    Ok(members)
}

/// A line's state as a send checks it, its turn shared and its row locked
/// to the end of the transaction (a suspension or revocation waits for the
/// send, or the send for it): `None` for no such account.
async fn line(
    tx: &Tx<'_>,
    account: &AccountId,
) -> std::result::Result<Option<(LineStatus, u64)>, Failure> {
    let statement = tx.prepare_cached(&LINE_SHARED).await?;
    let Some(row) = tx.query_opt(&statement, &[&account.as_str()]).await? else {
        return Ok(None);
    };
    let status: &str = row.get(0);
    let status = LineStatus::parse(status)
        .ok_or_else(|| crate::StoreError::Corrupt(format!("line status {status:?}")))?;
    Ok(Some((status, unsigned(row.get(1))?)))
}

#[async_trait]
impl Groups for PgStore {
    async fn create_group(
        &self,
        group: &GroupId,
        creator: &DeviceAddr,
        public_state: &[u8],
        group_info: &[u8],
        delivery_key: Option<&[u8; DELIVERY_KEY_BYTES]>,
        now: Timestamp,
    ) -> Result<bool> {
        transaction!(self, tx => {
            let inserted = tx
                .execute(
                    "INSERT INTO groups (group_id, epoch, created_at, public_state, group_info,
                                         created_by, delivery_key)
                     VALUES ($1, 0, $2, $3, $4, $5, $6) ON CONFLICT DO NOTHING",
                    &[
                        &group.as_bytes(),
                        &big(now),
                        &public_state,
                        &group_info,
                        &creator.account.as_str(),
                        &delivery_key.map(|key| &key[..]),
                    ],
                )
                .await?;
            if inserted == 0 {
                return Ok(false);
            }
            tx.execute(
                "INSERT INTO group_members (group_id, account_id, device) VALUES ($1, $2, $3)",
                &[
                    &group.as_bytes(),
                    &creator.account.as_str(),
                    &i64::from(creator.device.0),
                ],
            )
            .await?;
            Ok::<_, Failure>(true)
        })
    }

    async fn delivery_key(
        &self,
        group: &GroupId,
    ) -> Result<Option<(u64, Option<[u8; DELIVERY_KEY_BYTES]>)>> {
        transaction!(read self, tx => {
            let statement = tx
                .prepare_cached("SELECT epoch, delivery_key FROM groups WHERE group_id = $1")
                .await?;
            let Some(row) = tx.query_opt(&statement, &[&group.as_bytes()]).await? else {
                return Ok(None);
            };
            let key: Option<Vec<u8>> = row.get(1);
            Ok::<_, Failure>(Some((
                unsigned(row.get(0))?,
                key.and_then(|key| key.try_into().ok()),
            )))
        })
    }

    async fn group(&self, group: &GroupId) -> Result<Option<GroupState>> {
        transaction!(read self, tx => {
            let row = tx
                .query_opt(
                    "SELECT epoch, public_state FROM groups WHERE group_id = $1",
                    &[&group.as_bytes()],
                )
                .await?;
            let Some(row) = row else {
                return Ok(None);
            };
            let epoch: i64 = row.get(0);
            let proposals = tx
                .query(
                    "SELECT message FROM group_proposals
                     WHERE group_id = $1 AND epoch = $2 ORDER BY seq",
                    &[&group.as_bytes(), &epoch],
                )
                .await?
                .iter()
                .map(|row| row.get(0))
                .collect();
            Ok::<_, Failure>(Some(GroupState {
                epoch: unsigned(epoch)?,
                members: members(&tx, group).await?,
                public_state: row.get(1),
                proposals,
            }))
        })
    }

    async fn groups_created(&self, creator: &AccountId) -> Result<u64> {
        transaction!(read self, tx => {
            let row = tx
                .query_one(
                    "SELECT COUNT(*) FROM groups WHERE created_by = $1",
                    &[&creator.as_str()],
                )
                .await?;
            Ok::<_, Failure>(unsigned(row.get(0))?)
        })
    }

    async fn group_info(&self, group: &GroupId) -> Result<Option<Vec<u8>>> {
        transaction!(read self, tx => {
            let row = tx
                .query_opt(
                    "SELECT group_info FROM groups WHERE group_id = $1",
                    &[&group.as_bytes()],
                )
                .await?;
            Ok::<_, Failure>(row.map(|row| row.get(0)))
        })
    }

    async fn accept_commit(
        &self,
        commit: &CommitRecord,
        now: Timestamp,
        expires_at: Timestamp,
    ) -> Result<CommitOutcome> {
        transaction!(self, tx => self.accept_commit_in(&tx, commit, now, expires_at).await)
    }

    async fn add_proposal(&self, group: &GroupId, at: u64, message: &[u8]) -> Result<bool> {
        transaction!(self, tx => {
            // Under the group's lock: a commit cannot move the epoch (and
            // forget the epoch's proposals) between the check and the insert.
            if epoch(&tx, group).await? != Some(at) {
                return Ok(false);
            }
            tx.execute(
                "INSERT INTO group_proposals (group_id, seq, epoch, message)
                 VALUES ($1, (SELECT COALESCE(MAX(seq), 0) + 1 FROM group_proposals
                              WHERE group_id = $1), $2, $3)",
                &[&group.as_bytes(), &big(at), &message],
            )
            .await?;
            Ok::<_, Failure>(true)
        })
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
        self.fan_out_queued(FanOut {
            group: group.clone(),
            sender: Sender::Device(sender.clone()),
            kind,
            payload: payload.to_vec(),
            epoch,
            now,
            expires_at,
        })
        .await
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
        self.fan_out_queued(FanOut {
            group: group.clone(),
            sender: Sender::Anonymous(*delivery_key),
            kind: DeliveryKind::Application,
            payload: payload.to_vec(),
            epoch,
            now,
            expires_at,
        })
        .await
    }
}

impl PgStore {
    /// Through the node's batching queue, or alone on a handle without one.
    async fn fan_out_queued(&self, fan_out: FanOut) -> Result<FanOutOutcome> {
        match &self.queues {
            Some(queues) => queues.fan_outs.run(fan_out).await,
            None => {
                let mut outcomes = self.fan_out_batch(std::slice::from_ref(&fan_out)).await?;
                outcomes.pop().ok_or_else(|| {
                    crate::StoreError::Backend("a fan-out came back without an outcome".into())
                })
            }
        }
    }
}

/// A message to fan out (see the embedded store's, which this follows).
pub(super) struct Message<'a> {
    pub group: &'a GroupId,
    pub sender: &'a Sender,
    pub kind: DeliveryKind,
    pub payload: &'a [u8],
    pub epoch: u64,
    pub now: Timestamp,
}

impl PgStore {
    async fn accept_commit_in(
        &self,
        tx: &Tx<'_>,
        commit: &CommitRecord,
        now: Timestamp,
        expires_at: Timestamp,
    ) -> std::result::Result<CommitOutcome, Failure> {
        let group = &commit.group_id;
        // The lines it adds first, shared (in the order every transaction
        // locks: lines, then groups): a revocation or a device's removal
        // waits for this commit, or this commit for it, and then finds it
        // a former device (below). Without, a line revoked meanwhile kept
        // its new leaf's membership, and the group's members were never
        // told.
        let mut lines: Vec<&str> = commit.adds.iter().map(|a| a.account.as_str()).collect();
        lines.sort_unstable();
        lines.dedup();
        lock_lines(tx, &lines).await?;
        // The group's row is locked until this transaction ends: a second
        // commit for the same epoch waits here, then reads the epoch this
        // one moved to, and is stale.
        let Some(current) = epoch(tx, group).await? else {
            return Ok(CommitOutcome::UnknownGroup);
        };
        let Ok(at) = i64::try_from(commit.epoch) else {
            return Ok(CommitOutcome::Stale {
                current_epoch: current,
            });
        };
        let hash = commit.hash();
        let accepted = tx
            .query_opt(
                "SELECT hash FROM group_commits WHERE group_id = $1 AND epoch = $2",
                &[&group.as_bytes(), &at],
            )
            .await?;
        if accepted.is_some_and(|row| row.get::<_, &[u8]>(0) == &hash[..]) {
            return Ok(CommitOutcome::Duplicate {
                epoch: commit.epoch.saturating_add(1),
            });
        }
        if !is_member(tx, group, &commit.sender).await? {
            return Ok(CommitOutcome::NotAMember);
        }
        if current != commit.epoch {
            return Ok(CommitOutcome::Stale {
                current_epoch: current,
            });
        }
        if let Some(device) = first_former(tx, &commit.adds).await? {
            return Ok(CommitOutcome::AddsFormerDevice { device });
        }
        let before = routable(tx, group).await?;
        let (accounts, devices) = columns(&commit.removed);
        tx.execute(
            "DELETE FROM group_members m USING unnest($2::text[], $3::bigint[]) AS t(a, d)
             WHERE m.group_id = $1 AND m.account_id = t.a AND m.device = t.d",
            &[&group.as_bytes(), &accounts, &devices],
        )
        .await?;
        let (accounts, devices) = columns(&commit.added);
        tx.execute(
            "INSERT INTO group_members (group_id, account_id, device)
             SELECT $1, t.a, t.d FROM unnest($2::text[], $3::bigint[]) AS t(a, d)
             ON CONFLICT DO NOTHING",
            &[&group.as_bytes(), &accounts, &devices],
        )
        .await?;
        tx.execute(
            "UPDATE groups SET epoch = $2, public_state = $3, group_info = $4, delivery_key = $5
             WHERE group_id = $1",
            &[
                &group.as_bytes(),
                &(at + 1),
                &commit.public_state,
                &commit.group_info,
                &commit.delivery_key.as_ref().map(|key| &key[..]),
            ],
        )
        .await?;
        tx.execute(
            "DELETE FROM group_proposals WHERE group_id = $1",
            &[&group.as_bytes()],
        )
        .await?;
        tx.execute(
            "INSERT INTO group_commits (group_id, epoch, hash, committed_at)
             VALUES ($1, $2, $3, $4)",
            &[&group.as_bytes(), &at, &&hash[..], &big(now)],
        )
        .await?;
        let told: Vec<DeviceAddr> = before
            .iter()
            .filter(|m| **m != commit.sender)
            .cloned()
            .collect();
        let mut welcomed = Vec::new();
        if commit.welcome.is_some() {
            for added in commit.added.iter().filter(|a| !before.contains(a)) {
                // A leaf left in the tree by a line that ended (or a
                // removed device) gets nothing: no one would read it.
                if is_current(tx, added).await? && !welcomed.contains(added) {
                    welcomed.push(added.clone());
                }
            }
        }
        // Every head the commit stores under, at once (see
        // `lock_heads_where`): with a Welcome, two sets of them (without,
        // storing the commit locks its one set).
        if !welcomed.is_empty() {
            let heads: Vec<&DeviceAddr> = told.iter().chain(&welcomed).collect();
            lock_heads_of(tx, &heads).await?;
        }
        let copy = Copy {
            sender: None,
            kind: DeliveryKind::Commit,
            group: Some(group),
            payload: &commit.commit,
            now,
            expires_at,
        };
        self.store_copies(tx, &told, &copy).await?;
        let mut recipients = told;
        let welcomed_count = welcomed.len();
        if let Some(welcome) = &commit.welcome {
            let copy = Copy {
                kind: DeliveryKind::Welcome,
                payload: welcome,
                ..copy
            };
            self.store_copies(tx, &welcomed, &copy).await?;
            recipients.extend(welcomed);
        }
        Ok(CommitOutcome::Accepted {
            epoch: commit.epoch + 1,
            recipients,
            welcomed: welcomed_count,
        })
    }

    /// Checks a message against the group and its sender's line, and
    /// stores a copy for every other current member device, in one
    /// transaction holding the line's and the group's rows (shared): no
    /// commit, suspension or revocation lands between the check and the
    /// copies, so a message is stored for exactly the members of the epoch
    /// it was checked in, before the next commit, as on one node.
    pub(super) async fn fan_out_in(
        &self,
        tx: &Tx<'_>,
        message: &Message<'_>,
        expires_at: Timestamp,
    ) -> std::result::Result<FanOutOutcome, Failure> {
        // Locks in the order every transaction takes them: the sender's
        // line, then the group, then (storing) the mailboxes' heads.
        let line = match message.sender.device() {
            Some(sender) => Some(line(tx, &sender.account).await?),
            None => None,
        };
        // The group's key read with its epoch, under its lock: no
        // revocation withdraws it before the copies are stored.
        let Some((current, key)) = epoch_and_key(tx, message.group).await? else {
            return Ok(FanOutOutcome::UnknownGroup);
        };
        let members = routable(tx, message.group).await?;
        let recipients = match checked(message, current, &members, line, key.as_deref()) {
            Ok(recipients) => recipients,
            Err(refused) => return Ok(refused),
        };
        let copy = Copy {
            sender: None,
            kind: message.kind,
            group: Some(message.group),
            payload: message.payload,
            now: message.now,
            expires_at,
        };
        let ids = self.store_copies(tx, &recipients, &copy).await?;
        Ok(stored(message, recipients, ids))
    }
}

/// A fan-out's check, once the sender's line (`line`: its state, `None`
/// for no such account; `None` itself for an anonymous message) and the
/// group (its epoch `current` and routable `members`) were read and
/// locked: the devices to store a copy for, or the outcome that refuses
/// the message.
pub(super) fn checked(
    message: &Message<'_>,
    current: u64,
    members: &[DeviceAddr],
    line: Option<Option<(LineStatus, u64)>>,
    key: Option<&[u8]>,
) -> std::result::Result<Vec<DeviceAddr>, FanOutOutcome> {
    let device = message.sender.device();
    let sender = line.map(|line| {
        let member = device.is_some_and(|s| members.contains(s));
        (member, line)
    });
    crate::check_fan_out(current, message.epoch, message.kind, message.now, sender)?;
    if let Sender::Anonymous(expected) = message.sender
        && key != Some(&expected[..])
    {
        return Err(FanOutOutcome::KeyWithdrawn);
    }
    Ok(members
        .iter()
        .filter(|m| Some(*m) != device)
        .cloned()
        .collect())
}

/// A stored fan-out's outcome: a delivery for each of `recipients` whose
/// copy has an ID in `ids` (a copy not kept, its mailbox full, has none,
/// and is not handed over either).
pub(super) fn stored(
    message: &Message<'_>,
    recipients: Vec<DeviceAddr>,
    ids: Vec<Option<u64>>,
) -> FanOutOutcome {
    let deliveries = recipients
        .into_iter()
        .zip(ids)
        .filter_map(|(recipient, id)| {
            let delivery = StoredDelivery {
                id: id?,
                sender: None,
                kind: message.kind,
                group_id: Some(message.group.clone()),
                payload: message.payload.to_vec(),
                sent_at: message.now,
            };
            Some((recipient, delivery))
        })
        .collect();
    FanOutOutcome::Stored {
        deliveries,
        durable: Durable::ready(),
    }
}
