//! Delivery and read receipts. Each text carries its own random 16-byte ID
//! inside MLS; a recipient's device answers "delivered" as it applies the
//! text and "read" once the text is shown. Receipts are MLS application
//! messages like any other: the server sees only that something was sent.
//! In a group, the first member's receipt moves the state (it means "at
//! least one has it / has seen it").
//!
//! An account's other devices are members too, so they get its read
//! receipts: a text read on one device is read on all of them (its state
//! becomes `Read` and its disappearing countdown starts, as if shown here).
//!
//! Receipts do not leave as their message is applied or shown: that moment
//! would tell the server which message a receipt answers, and so who talks
//! to whom (the attack on Signal's sealed sender in "Improving Signal's
//! Sealed Sender", NDSS 2021). They wait in the store (`pending_receipts`)
//! until their conversation's batch is due, a random time within
//! `ClientOptions::receipt_delay` after its first receipt, and then all of
//! one kind go in one message. A device that was closed sends what is due
//! when it next connects.

use std::ops::RangeInclusive;
use std::sync::atomic::Ordering;
use std::time::Duration;

use rusqlite::{Transaction, params};
use tracing::debug;
use umbra_proto::content::{Body, MAX_RECEIPT_IDS, ReceiptKind};

use crate::client::Client;
use crate::error::{ClientError, Result};
use crate::types::{ConversationId, DeliveryState, Event};

fn rank(state: &str) -> Option<u8> {
    match state {
        "sending" => Some(0),
        "sent" => Some(1),
        "delivered" => Some(2),
        "read" => Some(3),
        _ => None,
    }
}

impl Client {
    /// Moves our own texts forward to `kind` (never backwards); a read
    /// receipt `from_own` account (another of its devices) marks the texts
    /// it names read here too.
    pub(crate) fn apply_receipt(
        &self,
        tx: &Transaction<'_>,
        group_id: &[u8],
        (kind, from_own): (ReceiptKind, bool),
        uids: &[[u8; 16]],
        events: &mut Vec<Event>,
    ) -> Result<()> {
        if from_own {
            if kind == ReceiptKind::Read {
                for uid in uids {
                    let id: Option<i64> = tx
                        .prepare_cached(
                            "SELECT id FROM messages
                             WHERE uid = ?1 AND group_id = ?2 AND direction = 'in' AND shown_at IS NULL",
                        )?
                        .query_row(params![&uid[..], group_id], |row| row.get(0))
                        .ok();
                    if let Some(message_id) = id {
                        Self::mark_row_read(tx, message_id, self.now())?;
                        events.push(Event::DeliveryStateChanged {
                            message_id,
                            state: DeliveryState::Read,
                        });
                    }
                }
            }
            return Ok(());
        }
        let state = match kind {
            ReceiptKind::Read => DeliveryState::Read,
            _ => DeliveryState::Delivered,
        };
        let new_rank = rank(state.as_str()).unwrap_or(0);
        for uid in uids {
            let found: Option<(i64, String)> = tx
                .prepare_cached(
                    "SELECT id, state FROM messages
                     WHERE uid = ?1 AND group_id = ?2 AND direction = 'out'",
                )?
                .query_row(params![&uid[..], group_id], |row| {
                    Ok((row.get(0)?, row.get(1)?))
                })
                .ok();
            let Some((message_id, current)) = found else {
                continue;
            };
            if rank(&current).is_some_and(|current| current < new_rank) {
                tx.execute(
                    "UPDATE messages SET state = ?2 WHERE id = ?1",
                    params![message_id, state.as_str()],
                )?;
                events.push(Event::DeliveryStateChanged { message_id, state });
            }
        }
        Ok(())
    }

    /// Receipts of `kind` for `uids` in `conversation`: kept for their
    /// batch, or sent at once when the receipt delay is zero (`inline`:
    /// from the task that applies deliveries).
    pub(crate) async fn receipt(
        &self,
        conversation: &ConversationId,
        kind: ReceiptKind,
        uids: Vec<[u8; 16]>,
        inline: bool,
    ) -> Result<()> {
        if uids.is_empty() {
            return Ok(());
        }
        if !self.receipts_wait() {
            return if inline {
                self.send_receipt_inline(conversation, kind, uids).await
            } else {
                self.send_receipt(conversation, kind, uids).await
            };
        }
        self.keep_receipts(conversation, kind, &uids)
    }

    /// Whether receipts wait for a batch (a receipt delay is set).
    pub(crate) fn receipts_wait(&self) -> bool {
        !self.inner_options().receipt_delay.end().is_zero()
    }

    /// Keeps receipts for their conversation's batch.
    pub(crate) fn keep_receipts(
        &self,
        conversation: &ConversationId,
        kind: ReceiptKind,
        uids: &[[u8; 16]],
    ) -> Result<()> {
        let delay = &self.inner_options().receipt_delay;
        let group_id = conversation
            .group_id()
            .ok_or_else(|| ClientError::UnknownConversation(conversation.to_string()))?;
        let mut db = self.db();
        let tx = db.transaction()?;
        // A batch waiting in this conversation takes these along; one
        // already due is being sent, or was just missed, so these start a
        // batch of their own rather than leave at once.
        let now = self.now();
        let due: Option<u64> = tx.query_row(
            "SELECT MIN(due_at) FROM pending_receipts
             WHERE group_id = ?1 AND kind = ?2 AND due_at > ?3",
            params![&group_id, kind as i32, now],
            |row| row.get(0),
        )?;
        let due = match due {
            Some(due) => due,
            None => now + random_delay(delay)?,
        };
        for uid in uids {
            tx.prepare_cached(
                "INSERT OR IGNORE INTO pending_receipts (group_id, kind, uid, due_at)
                 VALUES (?1, ?2, ?3, ?4)",
            )?
            .execute(params![&group_id, kind as i32, &uid[..], due])?;
        }
        tx.commit()?;
        Ok(())
    }

    /// Sends every batch of receipts that is due: one message per
    /// conversation and kind. A batch that cannot go now (the conversation
    /// is blocked on a changed key, the connection dropped) waits another
    /// random delay; one for a conversation that is gone is dropped.
    pub(crate) async fn flush_receipts(&self) -> Result<()> {
        if !self.is_connected() {
            return Ok(());
        }
        let flushing = self.receipts_flushing();
        if flushing.swap(true, Ordering::SeqCst) {
            return Ok(());
        }
        // Cleared however the flush ends, a cancelled one included.
        struct Flushing<'a>(&'a std::sync::atomic::AtomicBool);
        impl Drop for Flushing<'_> {
            fn drop(&mut self) {
                self.0.store(false, Ordering::SeqCst);
            }
        }
        let _flushing = Flushing(flushing);
        self.flush_due_receipts().await
    }

    async fn flush_due_receipts(&self) -> Result<()> {
        let now = self.now();
        let rows: Vec<(Vec<u8>, i32, Vec<u8>)> = {
            let db = self.db();
            let mut statement = db.prepare_cached(
                "SELECT group_id, kind, uid FROM pending_receipts WHERE due_at <= ?1
                 ORDER BY group_id, kind",
            )?;
            statement
                .query_map([now], |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)))?
                .collect::<rusqlite::Result<_>>()?
        };
        let mut batches: Vec<(Vec<u8>, i32, Vec<[u8; 16]>)> = Vec::new();
        for (group_id, kind, uid) in rows {
            let Ok(uid) = <[u8; 16]>::try_from(uid.as_slice()) else {
                continue;
            };
            match batches.last_mut() {
                Some((g, k, uids)) if *g == group_id && *k == kind => uids.push(uid),
                _ => batches.push((group_id, kind, vec![uid])),
            }
        }
        for (group_id, kind, uids) in batches {
            let conversation = ConversationId::from_group(&group_id);
            let receipt_kind = ReceiptKind::try_from(kind).unwrap_or(ReceiptKind::Delivered);
            let sent = self
                .send_receipt(&conversation, receipt_kind, uids.clone())
                .await;
            // Exactly the receipts of this batch: one kept meanwhile joined
            // no batch that is being sent.
            let mut db = self.db();
            let tx = db.transaction()?;
            match sent {
                Ok(()) | Err(ClientError::UnknownConversation(_) | ClientError::NotAMember) => {
                    for uid in &uids {
                        tx.prepare_cached(
                            "DELETE FROM pending_receipts
                             WHERE group_id = ?1 AND kind = ?2 AND uid = ?3",
                        )?
                        .execute(params![&group_id, kind, &uid[..]])?;
                    }
                }
                Err(error) => {
                    debug!(%error, "receipts wait for another try");
                    let later = self.now() + random_delay(&self.inner_options().receipt_delay)?;
                    for uid in &uids {
                        tx.prepare_cached(
                            "UPDATE pending_receipts SET due_at = ?4
                             WHERE group_id = ?1 AND kind = ?2 AND uid = ?3",
                        )?
                        .execute(params![
                            &group_id,
                            kind,
                            &uid[..],
                            later
                        ])?;
                    }
                }
            }
            tx.commit()?;
        }
        Ok(())
    }

    pub(crate) async fn send_receipt(
        &self,
        conversation: &ConversationId,
        kind: ReceiptKind,
        message_ids: Vec<[u8; 16]>,
    ) -> Result<()> {
        self.send_receipt_with(conversation, kind, message_ids, true)
            .await
    }

    /// [`Client::send_receipt`] from the task that applies deliveries: a
    /// receipt refused for an epoch the group has left goes again from a
    /// task of its own, once the commit that waits behind it is applied.
    pub(crate) async fn send_receipt_inline(
        &self,
        conversation: &ConversationId,
        kind: ReceiptKind,
        message_ids: Vec<[u8; 16]>,
    ) -> Result<()> {
        let sent = self
            .send_receipt_with(conversation, kind, message_ids.clone(), false)
            .await;
        if let Err(error) = &sent
            && error.server_code() == Some(umbra_proto::ErrorCode::StaleEpoch)
        {
            let (client, conversation) = (self.clone(), conversation.clone());
            tokio::spawn(async move {
                let _ = client.send_receipt(&conversation, kind, message_ids).await;
            });
            return Ok(());
        }
        sent
    }

    async fn send_receipt_with(
        &self,
        conversation: &ConversationId,
        kind: ReceiptKind,
        message_ids: Vec<[u8; 16]>,
        catch_up: bool,
    ) -> Result<()> {
        for chunk in message_ids.chunks(MAX_RECEIPT_IDS) {
            self.send_content_with(
                conversation,
                Body::Receipt {
                    kind,
                    message_ids: chunk.to_vec(),
                },
                catch_up,
            )
            .await?;
        }
        Ok(())
    }

    /// Marks these messages shown (their disappearing countdown starts) and
    /// tells their senders they were read: the receipts are sent, or with
    /// a receipt delay kept for their batch, before this returns.
    /// [`Client::mark_shown`] does the same without waiting.
    pub async fn mark_read(&self, message_ids: &[i64]) -> Result<()> {
        for (conversation, uids) in self.mark_shown_only(message_ids)? {
            self.receipt(&conversation, ReceiptKind::Read, uids, false)
                .await?;
        }
        Ok(())
    }

    /// Marks one received text read (state `read`), shown at `now`: its
    /// disappearing countdown starts.
    fn mark_row_read(tx: &Transaction<'_>, id: i64, now: u64) -> Result<()> {
        tx.execute(
            "UPDATE messages SET shown_at = ?2, state = 'read',
                    expires_at = CASE WHEN ttl > 0 THEN MIN(?2 + ttl, expires_at) END
             WHERE id = ?1",
            params![id, now],
        )?;
        Ok(())
    }

    /// Marks messages shown and returns, per conversation, the IDs of the
    /// texts that were newly shown (for read receipts).
    pub(crate) fn mark_shown_only(
        &self,
        message_ids: &[i64],
    ) -> Result<Vec<(ConversationId, Vec<[u8; 16]>)>> {
        let now = self.now();
        let mut db = self.db();
        let tx = db.transaction()?;
        let mut read: Vec<(ConversationId, Vec<[u8; 16]>)> = Vec::new();
        for id in message_ids {
            let row: Option<(Vec<u8>, Option<Vec<u8>>)> = tx
                .query_row(
                    "SELECT group_id, uid FROM messages
                     WHERE id = ?1 AND direction = 'in' AND shown_at IS NULL",
                    [id],
                    |row| Ok((row.get(0)?, row.get(1)?)),
                )
                .ok();
            let Some((group_id, uid)) = row else {
                continue;
            };
            Self::mark_row_read(&tx, *id, now)?;
            if let Some(uid) = uid.and_then(|u| <[u8; 16]>::try_from(u.as_slice()).ok()) {
                let conversation = ConversationId::from_group(&group_id);
                match read.iter_mut().find(|(c, _)| *c == conversation) {
                    Some((_, uids)) => uids.push(uid),
                    None => read.push((conversation, vec![uid])),
                }
            }
        }
        tx.commit()?;
        Ok(read)
    }
}

/// A random whole number of seconds within `range`.
fn random_delay(range: &RangeInclusive<Duration>) -> Result<u64> {
    let (low, high) = (range.start().as_secs(), range.end().as_secs());
    if high <= low {
        return Ok(low);
    }
    let mut bytes = [0u8; 8];
    getrandom::getrandom(&mut bytes).map_err(|e| ClientError::Store(e.to_string()))?;
    Ok(low + u64::from_le_bytes(bytes) % (high - low + 1))
}
