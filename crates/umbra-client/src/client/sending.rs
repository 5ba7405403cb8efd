//! Sending a message into a conversation.

use rusqlite::params;
use umbra_proto::content::{Body, Content};
use umbra_proto::{DeliveryKind, ErrorCode, GroupId, Request};

use crate::error::{ClientError, Result};
use crate::types::{ConversationId, DeliveryState, Event, Message};

use super::{Client, load_group, transit_ttl, unconfirmed_member};

/// How many times one message is sent before giving up on a group whose
/// epoch keeps moving.
const SEND_ATTEMPTS: usize = 4;

impl Client {
    /// `content` encrypted again, once this device has applied the group's
    /// commits up to `epoch`, under the same checks as the first time.
    async fn encrypt_again(
        &self,
        group_id: &[u8],
        epoch: u64,
        content: &Content,
    ) -> Result<Vec<u8>> {
        self.wait_for_epoch(group_id, epoch).await?;
        let _ops = self.inner.ops.lock().await;
        self.with_tx(|tx, provider| {
            let mut group = self.sendable(tx, provider, group_id)?;
            let content = Content {
                disappear_after: group.disappear_after(),
                ..content.clone()
            };
            Ok(group.encrypt(provider, &self.inner.signer, &content.encode())?)
        })
    }

    /// Sends a text message. Returns it once the server has stored it for
    /// every recipient (state `Sent`); on failure it stays in the history as
    /// `Failed`.
    pub async fn send_text(&self, conversation: &ConversationId, text: &str) -> Result<Message> {
        if text.trim().is_empty() {
            return Err(ClientError::Invalid("empty message".into()));
        }
        let id = self
            .send_content(conversation, Body::Text(text.to_owned()))
            .await?;
        self.emit(Event::DeliveryStateChanged {
            message_id: id,
            state: DeliveryState::Sent,
        });
        self.message(conversation, id)
    }

    /// Encrypts and sends one application message. Text is recorded locally
    /// (MLS cannot decrypt one's own messages) in the same transaction as the
    /// ratchet step. Returns the local message ID and whether it was accepted.
    pub(crate) async fn send_content(
        &self,
        conversation: &ConversationId,
        body: Body,
    ) -> Result<i64> {
        self.send_content_with(conversation, body, true).await
    }

    /// Records a text this device is sending, as `sending`, under the
    /// group's timer `ttl`; its local ID.
    pub(super) fn record_outgoing(
        &self,
        tx: &rusqlite::Transaction<'_>,
        group_id: &[u8],
        text: &str,
        ttl: u32,
        uid: Option<&[u8; 16]>,
    ) -> Result<i64> {
        let now = self.now();
        tx.execute(
            "INSERT INTO messages (group_id, sender, direction, body, state, timestamp, ttl, expires_at, uid)
             VALUES (?1, ?2, 'out', ?3, 'sending', ?4, ?5, ?6, ?7)",
            params![
                group_id,
                self.inner.account.as_str(),
                text,
                now,
                ttl,
                (ttl > 0).then(|| now + u64::from(ttl)),
                uid.map(|uid| &uid[..])
            ],
        )?;
        Ok(tx.last_insert_rowid())
    }

    /// The group `group_id` as far as this device may send to it now: a
    /// member, no member's changed key unconfirmed, not rejoining. Checked
    /// on every encryption, a message encrypted again included.
    pub(super) fn sendable(
        &self,
        tx: &rusqlite::Transaction<'_>,
        provider: &umbra_mls::Provider<'_>,
        group_id: &[u8],
    ) -> Result<umbra_mls::Group> {
        let group = load_group(provider, group_id)?;
        if !group.is_active() {
            return Err(ClientError::NotAMember);
        }
        if let Some(account) = unconfirmed_member(tx, &group)? {
            return Err(ClientError::KeyUnconfirmed(account));
        }
        if Self::is_rejoining(tx, group_id)? {
            return Err(ClientError::Rejoining);
        }
        Ok(group)
    }

    /// [`Client::send_content`]; with `catch_up`, a message refused for an
    /// epoch the group has left is encrypted again once this device has
    /// applied the group's commits (never from the task that applies them:
    /// it would wait on itself).
    pub(crate) async fn send_content_with(
        &self,
        conversation: &ConversationId,
        body: Body,
        catch_up: bool,
    ) -> Result<i64> {
        let mut uid = [0u8; 16];
        getrandom::getrandom(&mut uid).map_err(|e| ClientError::Store(e.to_string()))?;
        self.send_content_as(conversation, body, catch_up, uid)
            .await
    }

    /// [`Client::send_content_with`] under the message ID `uid` (a send
    /// made again after its answer was lost keeps its ID, so recipients
    /// that got the first keep one copy).
    pub(crate) async fn send_content_as(
        &self,
        conversation: &ConversationId,
        body: Body,
        catch_up: bool,
        uid: [u8; 16],
    ) -> Result<i64> {
        let group_id = self.group_id_of(conversation)?;
        let ops = self.inner.ops.lock().await;
        // Recorded in the history: texts, and files (under their caption).
        let text = match &body {
            Body::Text(text) => Some(text.clone()),
            Body::Attachment(attachment) => Some(attachment.caption.clone()),
            _ => None,
        };
        let content = Content {
            message_id: text.is_some().then_some(uid),
            body,
            disappear_after: 0,
            // The device's clock (a test's manual one), to the second.
            sent_at_ms: self.now().saturating_mul(1000),
        };
        let (message_id, ciphertext, ttl) = self.with_tx(|tx, provider| {
            let mut group = self.sendable(tx, provider, &group_id)?;
            let content = Content {
                disappear_after: group.disappear_after(),
                ..content.clone()
            };
            let ciphertext = group.encrypt(provider, &self.inner.signer, &content.encode())?;
            let ttl = group.disappear_after();
            let message_id = match &text {
                Some(text) => self.record_outgoing(tx, &group_id, text, ttl, Some(&uid))?,
                None => 0,
            };
            if let Body::Attachment(attachment) = &content.body {
                super::attachments::record_attachment(
                    tx,
                    message_id,
                    attachment,
                    crate::types::AttachmentState::Sent,
                )?;
            }
            Ok((message_id, ciphertext, ttl))
        })?;
        drop(ops);
        let mut ciphertext = ciphertext;
        let mut attempts = 1;
        let sent = loop {
            let sent = self
                .request(Request::SendMessage {
                    group_id: GroupId::new(group_id.clone())?,
                    message: ciphertext,
                    kind: DeliveryKind::Application,
                    ttl_seconds: transit_ttl(ttl),
                })
                .await;
            // A commit moved the group on while this was on its way: once
            // this device has applied it, the same message goes again in
            // the new epoch (members it added could not read the old one).
            match sent {
                Err(ClientError::Server {
                    code: ErrorCode::StaleEpoch,
                    current_epoch,
                    ..
                }) if catch_up && attempts < SEND_ATTEMPTS => {
                    attempts += 1;
                    match self.encrypt_again(&group_id, current_epoch, &content).await {
                        Ok(again) => ciphertext = again,
                        // Recorded as failed below, like any failed send.
                        Err(error) => break Err(error),
                    }
                }
                other => break other,
            }
        };
        let state = if sent.is_ok() {
            DeliveryState::Sent
        } else {
            DeliveryState::Failed
        };
        if message_id != 0 {
            self.db().execute(
                "UPDATE messages SET state = ?2 WHERE id = ?1",
                params![message_id, state.as_str()],
            )?;
        }
        match sent {
            Ok(_) => Ok(message_id),
            Err(error) => {
                if message_id != 0 {
                    self.emit(Event::DeliveryStateChanged {
                        message_id,
                        state: DeliveryState::Failed,
                    });
                }
                Err(error)
            }
        }
    }
}
