//! Fan-outs batched per node (through the node's [`super::queue`]): the
//! messages its connections send at about the same moment are checked
//! and stored in one transaction of seven round trips (begin, the
//! senders' lines, the groups, their members, the mailbox heads, every
//! copy in one statement, commit) where each message alone took six. A
//! lone message runs as before, in a transaction of its own.
//!
//! Locks are taken in the order every transaction takes them (senders'
//! lines, then groups, then mailbox heads), each kind at once for the
//! whole batch, sorted: two batches, or a batch and a commit, cannot wait
//! on each other in a cycle. What a batch stores is what its messages one
//! after the other, each in its own transaction, would have: each message
//! is checked against its group's epoch and members and its sender's line
//! as they were when the batch locked them, and a mailbox gets the
//! batch's copies under consecutive IDs in the order the messages were
//! queued. A message refused (not a member, a stale epoch, a suspended
//! line) is told so; the others in its batch are stored. A copy that
//! meets a full mailbox is not kept, and the mailbox's one `MailboxFull`
//! notice is replaced by one counting it, planned in memory too: what a
//! device does with its own mailbox changes nothing for the other
//! messages of a batch.

use std::collections::HashMap;
use std::future::Future;

use deadpool_postgres::Transaction;
use umbra_proto::{DeliveryKind, DeviceAddr, GroupId};

use super::groups::{GROUPS_SHARED, Message, checked, lock_lines, routable_in, stored};
use super::mailboxes::{FullNotice, stored_notice};
use super::queue::Work;
use super::{Failure, PgStore, big, device_addr, transaction, unsigned};
use crate::{FanOutOutcome, Result, Sender, Timestamp};

type Tx<'a> = Transaction<'a>;

/// A message to fan out, owned: it waits in the queue.
pub(crate) struct FanOut {
    pub group: GroupId,
    pub sender: Sender,
    pub kind: DeliveryKind,
    pub payload: Vec<u8>,
    pub epoch: u64,
    pub now: Timestamp,
    pub expires_at: Timestamp,
}

impl std::fmt::Debug for FanOut {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The payload's length, not its bytes.
        // Neither the payload nor the sender: the schema keeps no link
        // from a group message to its sender, and no log should either.
        f.debug_struct("FanOut")
            .field("group", &self.group)
            .field("kind", &self.kind)
            .field("payload_bytes", &self.payload.len())
            .field("epoch", &self.epoch)
            .finish_non_exhaustive()
    }
}

impl FanOut {
    fn message(&self) -> Message<'_> {
        Message {
            group: &self.group,
            sender: &self.sender,
            kind: self.kind,
            payload: &self.payload,
            epoch: self.epoch,
            now: self.now,
        }
    }
}

impl Work for FanOut {
    type Outcome = FanOutOutcome;
    const NAME: &'static str = "fan-out";

    fn bytes(&self) -> usize {
        self.payload.len()
    }

    fn run<'a>(
        store: &'a PgStore,
        batch: &'a [Self],
    ) -> impl Future<Output = Result<Vec<FanOutOutcome>>> + Send + 'a {
        store.fan_out_batch(batch)
    }
}

impl PgStore {
    /// Checks and stores `fan_outs` in one transaction, as if each had run
    /// in its own one after the other, in order; one outcome per message.
    /// What the node's queue runs; a lone message takes the single path.
    pub(crate) async fn fan_out_batch(&self, fan_outs: &[FanOut]) -> Result<Vec<FanOutOutcome>> {
        match fan_outs {
            [] => Ok(Vec::new()),
            [one] => {
                let message = one.message();
                let outcome = transaction!(self, tx => {
                    self.fan_out_in(&tx, &message, one.expires_at).await
                })?;
                Ok(vec![outcome])
            }
            several => transaction!(self, tx => self.fan_out_batch_in(&tx, several).await),
        }
    }

    async fn fan_out_batch_in(
        &self,
        tx: &Tx<'_>,
        fan_outs: &[FanOut],
    ) -> std::result::Result<Vec<FanOutOutcome>, Failure> {
        // The senders' lines, then the groups, then the mailbox heads:
        // each kind locked at once, in sorted order.
        let mut accounts: Vec<&str> = fan_outs
            .iter()
            .filter_map(|f| f.sender.device().map(|s| s.account.as_str()))
            .collect();
        accounts.sort_unstable();
        accounts.dedup();
        let lines = lock_lines(tx, &accounts).await?;
        let mut groups: Vec<&[u8]> = fan_outs.iter().map(|f| f.group.as_bytes()).collect();
        groups.sort_unstable();
        groups.dedup();
        let epochs = lock_groups(tx, &groups).await?;
        let known: Vec<&[u8]> = groups
            .into_iter()
            .filter(|g| epochs.contains_key(*g))
            .collect();
        let members = routable_in(tx, &known).await?;
        // Each message checked: its recipients, or why it is refused.
        let checks: Vec<std::result::Result<Vec<DeviceAddr>, FanOutOutcome>> = fan_outs
            .iter()
            .map(|fan_out| {
                let group = fan_out.group.as_bytes();
                let Some((current, key)) = epochs.get(group) else {
                    return Err(FanOutOutcome::UnknownGroup);
                };
                let line = fan_out
                    .sender
                    .device()
                    .map(|s| lines.get(s.account.as_str()).copied());
                let members = members.get(group).map_or(&[][..], Vec::as_slice);
                checked(&fan_out.message(), *current, members, line, key.as_deref())
            })
            .collect();
        let mut devices: Vec<&DeviceAddr> = checks.iter().flatten().flatten().collect();
        devices.sort_unstable();
        devices.dedup();
        let mut heads = lock_heads(tx, &devices).await?;
        // Each copy its mailbox's next ID, message after message, as one
        // transaction each would give them; a copy meeting a full mailbox
        // its notice instead.
        let mut plan = Plan::default();
        let mut ids_of = Vec::with_capacity(fan_outs.len());
        for (n, (fan_out, check)) in fan_outs.iter().zip(&checks).enumerate() {
            let Ok(recipients) = check else {
                ids_of.push(Vec::new());
                continue;
            };
            let size = big(fan_out.payload.len() as u64);
            let capped = fan_out.kind == DeliveryKind::Application && self.limits.mailbox_bytes > 0;
            let mut ids = Vec::with_capacity(recipients.len());
            for recipient in recipients {
                // No open head: removed or revoked since it was read as
                // current; nothing is stored for it.
                let Some(head) = heads.get_mut(recipient) else {
                    ids.push(None);
                    continue;
                };
                if capped && head.bytes.saturating_add(size) > big(self.limits.mailbox_bytes) {
                    plan.note_full(tx, recipient, head, fan_out).await?;
                    ids.push(None);
                    continue;
                }
                let id = head.take_id()?;
                plan.copies.push((recipient, id, n));
                ids.push(Some(unsigned(id)?));
                head.bytes = head.bytes.saturating_add(size);
            }
            ids_of.push(ids);
        }
        let noted = heads.values().any(|h| h.notice.is_some());
        if noted {
            store_notices(tx, &plan.dropped, &heads).await?;
        }
        if noted || !plan.copies.is_empty() {
            store_planned(tx, fan_outs, &plan.copies, &heads).await?;
        }
        Ok(fan_outs
            .iter()
            .zip(checks)
            .zip(ids_of)
            .map(|((fan_out, check), ids)| match check {
                Ok(recipients) => stored(&fan_out.message(), recipients, ids),
                Err(refused) => refused,
            })
            .collect())
    }
}

/// What a batch stores and deletes, each copy under the ID it was given.
#[derive(Default)]
struct Plan<'a> {
    /// The recipient, the copy's ID, and the message's place in the batch.
    copies: Vec<(&'a DeviceAddr, i64, usize)>,
    /// `MailboxFull` notices stored before the batch and replaced in it.
    dropped: Vec<(&'a DeviceAddr, i64)>,
}

impl<'a> Plan<'a> {
    /// A copy of `fan_out` met `device`'s mailbox (`head`) full: its
    /// notice is replaced by one counting this copy too, under the next
    /// ID (so that a device which read the old one reads the new one),
    /// living as long as the longest-lived copy it counts; as the
    /// one-at-a-time path does (`note_mailbox_full`). The notice stored
    /// before the batch is read (under the held head) the first time.
    async fn note_full(
        &mut self,
        tx: &Tx<'_>,
        device: &'a DeviceAddr,
        head: &mut Head,
        fan_out: &FanOut,
    ) -> std::result::Result<(), Failure> {
        let earlier = match head.notice.take() {
            Some(planned) => Some(planned),
            None => {
                let stored = stored_notice(tx, device).await?;
                if let Some(notice) = &stored {
                    self.dropped.push((device, notice.id));
                }
                stored
            }
        };
        let expires_at = big(fan_out.expires_at);
        let (count, expires_at, freed) = match earlier {
            Some(notice) => (notice.count, notice.expires_at.max(expires_at), notice.size),
            None => (0, expires_at, 0),
        };
        let notice = FullNotice {
            id: head.take_id()?,
            count: count.saturating_add(1),
            sent_at: big(fan_out.now),
            expires_at,
            size: NOTICE_BYTES,
        };
        head.bytes = head.bytes.saturating_sub(freed).saturating_add(notice.size);
        head.notice = Some(notice);
        Ok(())
    }
}

/// A `MailboxFull` notice's size: the count, a u64.
const NOTICE_BYTES: i64 = 8;

/// A mailbox head as a batch holds it: locked, and moved in memory until
/// the batch writes it back.
struct Head {
    next_id: i64,
    bytes: i64,
    /// The `MailboxFull` notice the batch stores for it (replacing any
    /// stored before), once a copy met it full.
    notice: Option<FullNotice>,
}

impl Head {
    /// The head's next ID, moving it on.
    fn take_id(&mut self) -> std::result::Result<i64, Failure> {
        let id = self.next_id;
        self.next_id = id.checked_add(1).ok_or_else(|| {
            crate::StoreError::Corrupt("a mailbox ran out of delivery IDs".into())
        })?;
        Ok(id)
    }
}

/// Replaces the notices a batch replaced: deletes `dropped` and stores
/// every head's planned notice, in one statement.
async fn store_notices(
    tx: &Tx<'_>,
    dropped: &[(&DeviceAddr, i64)],
    heads: &HashMap<&DeviceAddr, Head>,
) -> std::result::Result<(), Failure> {
    let gone_accounts: Vec<&str> = dropped.iter().map(|d| d.0.account.as_str()).collect();
    let gone_devices: Vec<i64> = dropped.iter().map(|d| i64::from(d.0.device.0)).collect();
    let gone_ids: Vec<i64> = dropped.iter().map(|d| d.1).collect();
    let mut accounts = Vec::new();
    let mut devices = Vec::new();
    let mut ids = Vec::new();
    let mut payloads = Vec::new();
    let mut sent = Vec::new();
    let mut expires = Vec::new();
    for (device, head) in heads {
        if let Some(notice) = &head.notice {
            accounts.push(device.account.as_str());
            devices.push(i64::from(device.device.0));
            ids.push(notice.id);
            payloads.push(notice.count.to_be_bytes().to_vec());
            sent.push(notice.sent_at);
            expires.push(notice.expires_at);
        }
    }
    let statement = tx
        .prepare_cached(
            "WITH dropped AS (
                 DELETE FROM mailbox m
                 USING unnest($1::text[], $2::bigint[], $3::bigint[]) AS d(account_id, device, id)
                 WHERE m.account_id = d.account_id AND m.device = d.device AND m.id = d.id
             )
             INSERT INTO mailbox (account_id, device, id, sender, kind, group_id, payload,
                                  sent_at, expires_at)
             SELECT account_id, device, id, account_id, $4, NULL, payload, sent_at, expires_at
             FROM unnest($5::text[], $6::bigint[], $7::bigint[], $8::bytea[], $9::bigint[],
                         $10::bigint[])
                  AS n(account_id, device, id, payload, sent_at, expires_at)",
        )
        .await?;
    tx.execute(
        &statement,
        &[
            &gone_accounts,
            &gone_devices,
            &gone_ids,
            &(DeliveryKind::MailboxFull as i32),
            &accounts,
            &devices,
            &ids,
            &payloads,
            &sent,
            &expires,
        ],
    )
    .await?;
    Ok(())
}

/// Stores a batch's copies and moves their mailboxes' heads, in one
/// statement: the heads are locked (by [`lock_heads`]) so the values
/// written back are the ones this transaction read, moved on.
async fn store_planned(
    tx: &Tx<'_>,
    fan_outs: &[FanOut],
    copies: &[(&DeviceAddr, i64, usize)],
    heads: &HashMap<&DeviceAddr, Head>,
) -> std::result::Result<(), Failure> {
    let mut head_accounts = Vec::with_capacity(heads.len());
    let mut head_devices = Vec::with_capacity(heads.len());
    let mut next_ids = Vec::with_capacity(heads.len());
    let mut bytes = Vec::with_capacity(heads.len());
    for (device, head) in heads {
        head_accounts.push(device.account.as_str());
        head_devices.push(i64::from(device.device.0));
        next_ids.push(head.next_id);
        bytes.push(head.bytes);
    }
    let accounts: Vec<&str> = copies.iter().map(|c| c.0.account.as_str()).collect();
    let devices: Vec<i64> = copies.iter().map(|c| i64::from(c.0.device.0)).collect();
    let ids: Vec<i64> = copies.iter().map(|c| c.1).collect();
    // WITH ORDINALITY counts from 1.
    let messages: Vec<i64> = copies.iter().map(|c| c.2 as i64 + 1).collect();
    let kinds: Vec<i32> = fan_outs.iter().map(|f| f.kind as i32).collect();
    let groups: Vec<&[u8]> = fan_outs.iter().map(|f| f.group.as_bytes()).collect();
    // A message with no copy stored (refused, or every copy not kept)
    // sends no payload.
    let mut payloads: Vec<&[u8]> = vec![&[]; fan_outs.len()];
    for (_, _, n) in copies {
        if let (Some(payload), Some(fan_out)) = (payloads.get_mut(*n), fan_outs.get(*n)) {
            *payload = &fan_out.payload;
        }
    }
    let sent: Vec<i64> = fan_outs.iter().map(|f| big(f.now)).collect();
    let expires: Vec<i64> = fan_outs.iter().map(|f| big(f.expires_at)).collect();
    let statement = tx
        .prepare_cached(
            "WITH moved AS (
                 UPDATE mailbox_heads h SET next_id = t.next_id, bytes = t.bytes
                 FROM unnest($1::text[], $2::bigint[], $3::bigint[], $4::bigint[])
                      AS t(account_id, device, next_id, bytes)
                 WHERE h.account_id = t.account_id AND h.device = t.device
             )
             INSERT INTO mailbox (account_id, device, id, sender, kind, group_id, payload,
                                  sent_at, expires_at)
             SELECT c.account_id, c.device, c.id, NULL, m.kind, m.group_id, m.payload,
                    m.sent_at, m.expires_at
             FROM unnest($5::text[], $6::bigint[], $7::bigint[], $8::bigint[])
                  AS c(account_id, device, id, message)
             JOIN unnest($9::int[], $10::bytea[], $11::bytea[], $12::bigint[], $13::bigint[])
                  WITH ORDINALITY AS m(kind, group_id, payload, sent_at, expires_at, n)
               ON m.n = c.message",
        )
        .await?;
    tx.execute(
        &statement,
        &[
            &head_accounts,
            &head_devices,
            &next_ids,
            &bytes,
            &accounts,
            &devices,
            &ids,
            &messages,
            &kinds,
            &groups,
            &payloads,
            &sent,
            &expires,
        ],
    )
    .await?;
    Ok(())
}

/// The epochs and delivery keys of `groups` (distinct) that exist, their
/// turns and rows locked (shared) in sorted order to the end of the
/// transaction.
async fn lock_groups(
    tx: &Tx<'_>,
    groups: &[&[u8]],
) -> std::result::Result<HashMap<Vec<u8>, (u64, Option<Vec<u8>>)>, Failure> {
    // Their turns first (shared, in the order of their keys: see
    // `turns`), then their rows.
    let statement = tx.prepare_cached(&GROUPS_SHARED).await?;
    let mut epochs = HashMap::with_capacity(groups.len());
    for row in tx.query(&statement, &[&groups]).await? {
        epochs.insert(
            row.get::<_, Vec<u8>>(0),
            (unsigned(row.get(1))?, row.get(2)),
        );
    }
    Ok(epochs)
}

/// Locks the open mailbox heads of `devices` (distinct, sorted) in the
/// order `store_copies` locks them, to the end of the transaction, and
/// reads them. A device with no open head (removed, revoked) has no entry.
async fn lock_heads<'a>(
    tx: &Tx<'_>,
    devices: &[&'a DeviceAddr],
) -> std::result::Result<HashMap<&'a DeviceAddr, Head>, Failure> {
    let mut heads = HashMap::with_capacity(devices.len());
    if devices.is_empty() {
        return Ok(heads);
    }
    let accounts: Vec<&str> = devices.iter().map(|d| d.account.as_str()).collect();
    let numbers: Vec<i64> = devices.iter().map(|d| i64::from(d.device.0)).collect();
    let statement = tx
        .prepare_cached(
            "SELECT h.account_id, h.device, h.next_id, h.bytes FROM mailbox_heads h
             JOIN unnest($1::text[], $2::bigint[]) AS t(account_id, device)
               ON h.account_id = t.account_id AND h.device = t.device
             WHERE NOT h.closed
             ORDER BY h.account_id, h.device
             FOR UPDATE OF h",
        )
        .await?;
    let by_address: HashMap<DeviceAddr, &'a DeviceAddr> =
        devices.iter().map(|d| ((*d).clone(), *d)).collect();
    for row in tx.query(&statement, &[&accounts, &numbers]).await? {
        let address = device_addr(row.get(0), row.get(1))?;
        if let Some(device) = by_address.get(&address) {
            heads.insert(
                *device,
                Head {
                    next_id: row.get(2),
                    bytes: row.get(3),
                    notice: None,
                },
            );
        }
    }
    Ok(heads)
}
