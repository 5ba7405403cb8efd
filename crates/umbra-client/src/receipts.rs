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

use rusqlite::{Transaction, params};
use umbra_proto::content::{Body, MAX_RECEIPT_IDS, ReceiptKind};

use crate::client::Client;
use crate::error::Result;
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
    /// tells their senders they were read, waiting until the receipts are
    /// sent. [`Client::mark_shown`] does the same without waiting.
    pub async fn mark_read(&self, message_ids: &[i64]) -> Result<()> {
        for (conversation, uids) in self.mark_shown_only(message_ids)? {
            self.send_receipt(&conversation, ReceiptKind::Read, uids)
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
